"""The server process's malloc setting, applied before any worker thread starts.

glibc gives each thread that contends for the heap an arena of its own (up to 8 per core), and
memory freed in one arena is rarely returned or reused by another, so a server whose encoder,
frame-worker and executor threads come and go sees its resident memory grow under churn while
the Python heap stays flat. ``server.malloc_arena_max`` caps the arenas (``mallopt(M_ARENA_MAX)``,
the same as ``MALLOC_ARENA_MAX`` in the environment, which wins when set). See
docs/reliability.md for the measurements behind the default.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)
M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int) -> None:
    if os.environ.get("MALLOC_ARENA_MAX"):
        log.info("malloc arenas: MALLOC_ARENA_MAX=%s from the environment", os.environ["MALLOC_ARENA_MAX"])
        return
    if arenas <= 0:
        log.info("malloc arenas: the C library's default (server.malloc_arena_max = 0)")
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:
        log.warning("server.malloc_arena_max not applied: the C library has no mallopt (not glibc)")
        return
    if mallopt(M_ARENA_MAX, arenas) != 1:
        log.warning("server.malloc_arena_max not applied: mallopt(M_ARENA_MAX, %d) failed", arenas)
        return
    log.info("malloc arenas limited to %d (server.malloc_arena_max)", arenas)
