"""Preparations run one at a time per node, on one low-priority thread, never on the event loop.

``submit`` registers the job at once (the avatar reads ``preparing`` with progress 0 while it
waits its turn) and refuses beyond ``max_pending`` jobs, so uploads cannot pile up work.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from inference.avatars.jobs import PreparationJob
from inference.avatars.layout import FaceBox
from inference.avatars.store import AvatarStore

log = logging.getLogger(__name__)

PREPARATION_NICENESS = 10
"""How much lower than the frame workers the preparation thread runs (Linux thread niceness)."""


class PreparationsFull(RuntimeError):
    """As many preparations wait already as the node takes."""


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PREPARATION_NICENESS)
    except (AttributeError, OSError) as exc:
        log.warning("avatar preparations run at normal priority: %s", exc)


class AvatarPreparer:
    def __init__(self, store: AvatarStore, *, max_pending: int = 8) -> None:
        self.store = store
        self.max_pending = max_pending
        self._executor = ThreadPoolExecutor(1, "avatar-prepare", initializer=_lower_priority)
        self._lock = threading.Lock()
        self._pending: dict[Future[None], tuple[PreparationJob, Path, bool]] = {}

    def submit(
        self, avatar_id: str, name: str, source: Path, *, face_box: FaceBox | None = None, owned: bool = True
    ) -> PreparationJob:
        """Queue a preparation; ``owned`` sources are deleted once it ran. Raises
        ``PreparationsFull``, ``InvalidAvatarId`` or ``AvatarBusy`` (then nothing is queued)."""
        with self._lock:
            self._pending = {f: w for f, w in self._pending.items() if not f.done()}
            if len(self._pending) >= self.max_pending:
                raise PreparationsFull(f"{len(self._pending)} avatar preparations are waiting already")
            job = self.store.begin_preparation(avatar_id, name)
            future = self._executor.submit(self._run, job, source, face_box, owned)
            self._pending[future] = (job, source, owned)
        return job

    def _run(self, job: PreparationJob, source: Path, face_box: FaceBox | None, owned: bool) -> None:
        try:
            self.store.run_preparation(job, source, face_box=face_box)
        except Exception as exc:  # the job records the reason; the API reports it
            log.warning("preparing avatar %s failed: %s", job.avatar_id, exc)
        finally:
            if owned:
                source.unlink(missing_ok=True)

    def shutdown(self) -> None:
        """Wait for the preparation running now; those still waiting fail, saying why."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            waiting = [w for f, w in self._pending.items() if f.cancelled()]
        for job, source, owned in waiting:
            self.store.jobs.fail(job, "the server stopped before this preparation ran: upload it again")
            if owned:
                source.unlink(missing_ok=True)
        self._executor.shutdown(wait=True)
