"""Avatar preparations: at most one at a time per avatar, each with a status and, when it failed, a
reason a person can act on (what ``GET /v1/avatars/{id}`` reports)."""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from enum import StrEnum


class AvatarBusy(RuntimeError):
    """The avatar is being prepared already."""


class JobStatus(StrEnum):
    PREPARING = "preparing"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class PreparationJob:
    """One preparation of one avatar. ``refresh`` marks a preparation of the engine's data again
    from the stored source (stale, incomplete or damaged), as opposed to one from a new source:
    when a refresh fails the avatar cannot be served, when a new source fails the old avatar stays."""

    avatar_id: str
    name: str
    refresh: bool
    status: JobStatus = JobStatus.PREPARING
    reason: str | None = None
    started_at: float = dataclasses.field(default_factory=time.time)
    finished_at: float | None = None

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

    def succeed(self, job: PreparationJob) -> PreparationJob:
        return self._finish(job, JobStatus.READY, None)

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

    def _finish(self, job: PreparationJob, status: JobStatus, reason: str | None) -> PreparationJob:
        done = dataclasses.replace(job, status=status, reason=reason, finished_at=time.time())
        with self._lock:
            if self._latest.get(job.avatar_id) is not job:
                raise RuntimeError(f"the preparation of {job.avatar_id!r} was finished twice")
            self._latest[job.avatar_id] = done
        return done
