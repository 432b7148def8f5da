"""The server process's memory allocator, chosen before any worker thread starts.

Under churn (clients joining, leaving, resuming) the Python heap stays flat but resident memory
grows: freed memory is kept by the allocators (CPython's pymalloc arenas, glibc's per-thread
arenas) rather than reused or returned. Measured in docs/reliability.md: jemalloc for every
allocation (``LD_PRELOAD`` plus ``PYTHONMALLOC=malloc``) grew least, so it is the default. Both
must be in place when the process starts, so ``serve`` re-executes itself with them set (logged),
and with ``server.jemalloc_conf`` as ``MALLOC_CONF`` (unless that is set): a background thread
gives freed pages back within a second, even while the server is idle, so that a burst of
uploads does not stay resident.
Where the library is missing it says so and caps glibc's arenas instead
(``mallopt(M_ARENA_MAX)``, the same as ``MALLOC_ARENA_MAX``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path

from stream_server.settings import ServerSettings

log = logging.getLogger(__name__)
M_ARENA_MAX = -8


def apply_allocator(settings: ServerSettings) -> None:
    """Does not return when it re-executes the process under jemalloc."""
    if settings.allocator == "jemalloc":
        library = Path(settings.jemalloc_library)
        preloaded = os.environ.get("LD_PRELOAD", "")
        if str(library) in preloaded.split() and os.environ.get("PYTHONMALLOC") == "malloc":
            log.info("allocator: jemalloc (%s)", library)
            return
        if library.is_file():
            log.info("allocator: re-executing under jemalloc (%s, PYTHONMALLOC=malloc)", library)
            env = {
                "MALLOC_CONF": settings.jemalloc_conf,
                **os.environ,
                "LD_PRELOAD": f"{library} {preloaded}".strip(),
                "PYTHONMALLOC": "malloc",
            }
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
        log.warning(
            "allocator: %s not found (apt-get install libjemalloc2, or set server.jemalloc_library); "
            "using glibc with %d arenas",
            library,
            settings.malloc_arena_max,
        )
    limit_malloc_arenas(settings.malloc_arena_max)


def limit_malloc_arenas(arenas: int) -> None:
    if os.environ.get("MALLOC_ARENA_MAX"):
        log.info("allocator: glibc, MALLOC_ARENA_MAX=%s from the environment", os.environ["MALLOC_ARENA_MAX"])
        return
    if arenas <= 0:
        log.info("allocator: glibc with its default arenas (server.malloc_arena_max = 0)")
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:
        log.warning("server.malloc_arena_max not applied: the C library has no mallopt (not glibc)")
        return
    if mallopt(M_ARENA_MAX, arenas) != 1:
        log.warning("server.malloc_arena_max not applied: mallopt(M_ARENA_MAX, %d) failed", arenas)
        return
    log.info("allocator: glibc with at most %d arenas (server.malloc_arena_max)", arenas)
