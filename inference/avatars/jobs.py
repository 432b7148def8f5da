"""Avatar preparations: at most one at a time per avatar, each with a status, its progress and,
when it failed, a reason a person can act on (what ``GET /v1/avatars/{id}`` reports)."""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from inference.face import FaceReport

Progress = Callable[[int, int], None]
"""``progress(done, total)``: a preparation's steps done so far (frames, for the engines)."""

_serials = itertools.count(1)


class AvatarBusy(RuntimeError):
    """The avatar is being prepared already."""


class JobStatus(StrEnum):
    PREPARING = "preparing"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class PreparationJob:
    """One preparation of one avatar (a snapshot: every change makes a new one with the same
    ``serial``). ``refresh`` marks a preparation of the engine's data again from the stored
    source (stale, incomplete or damaged), as opposed to one from a new source: when a refresh
    fails the avatar cannot be served, when a new source fails the old avatar stays."""

    avatar_id: str
    name: str
    refresh: bool
    serial: int = dataclasses.field(default_factory=lambda: next(_serials))
    status: JobStatus = JobStatus.PREPARING
    reason: str | None = None
    done: int = 0
    total: int = 0
    started_at: float = dataclasses.field(default_factory=time.time)
    finished_at: float | None = None
    faces: FaceReport | None = None
    """How faces were found (a finished preparation of an engine that looks for faces)."""

    @property
    def id(self) -> str:
        """The job's id, as the API shows it."""
        return f"{self.avatar_id}-{self.serial}"

    @property
    def progress(self) -> float:
        """Share of the work done, 0 to 1 (1 once finished)."""
        if self.status is not JobStatus.PREPARING:
            return 1.0
        return min(1.0, self.done / self.total) if self.total > 0 else 0.0

    @property
    def unservable(self) -> bool:
        """The avatar's data could not be made current: it must not be listed as ready."""
        return self.refresh and self.status is JobStatus.FAILED


class PreparationJobs:
    """The latest preparation job of each avatar. Thread-safe; jobs are immutable snapshots."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[str, PreparationJob] = {}

    def begin(self, avatar_id: str, name: str, *, refresh: bool = False) -> PreparationJob:
        """Start a job; ``AvatarBusy`` if one for this avatar is running."""
        with self._lock:
            current = self._latest.get(avatar_id)
            if current is not None and current.status is JobStatus.PREPARING:
                raise AvatarBusy(f"avatar {avatar_id!r} is being prepared already")
            job = PreparationJob(avatar_id, name, refresh)
            self._latest[avatar_id] = job
            return job

    def report(self, job: PreparationJob, done: int, total: int) -> None:
        """Progress of a running job (ignored once it finished or was replaced)."""
        with self._lock:
            current = self._latest.get(job.avatar_id)
            if current is not None and current.serial == job.serial and current.status is JobStatus.PREPARING:
                self._latest[job.avatar_id] = dataclasses.replace(current, done=done, total=total)

    def succeed(self, job: PreparationJob, faces: FaceReport | None = None) -> PreparationJob:
        return self._finish(job, JobStatus.READY, None, faces)

    def fail(self, job: PreparationJob, reason: str) -> PreparationJob:
        return self._finish(job, JobStatus.FAILED, reason)

    def get(self, avatar_id: str) -> PreparationJob | None:
        with self._lock:
            return self._latest.get(avatar_id)

    def running(self) -> dict[str, PreparationJob]:
        with self._lock:
            return {k: j for k, j in self._latest.items() if j.status is JobStatus.PREPARING}

    def is_running(self, avatar_id: str) -> bool:
        job = self.get(avatar_id)
        return job is not None and job.status is JobStatus.PREPARING

    def forget(self, avatar_id: str) -> None:
        """Drop a finished job (the avatar was deleted)."""
        with self._lock:
            job = self._latest.get(avatar_id)
            if job is not None and job.status is not JobStatus.PREPARING:
                del self._latest[avatar_id]

    def _finish(
        self, job: PreparationJob, status: JobStatus, reason: str | None, faces: FaceReport | None = None
    ) -> PreparationJob:
        with self._lock:
            current = self._latest.get(job.avatar_id)
            if current is None or current.serial != job.serial or current.status is not JobStatus.PREPARING:
                raise RuntimeError(f"the preparation of {job.avatar_id!r} was finished twice")
            done = dataclasses.replace(current, status=status, reason=reason, faces=faces, finished_at=time.time())
            self._latest[job.avatar_id] = done
        return done
