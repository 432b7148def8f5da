"""``AvatarStore``: the server's one door to avatars, over the layout, the cache and the jobs.

Every method is thread-safe. Everything but ``is_preparing`` and ``job`` touches files, and
``prepare`` and a first ``get`` do slow work (decoding, face detection, reading frames, maybe
preparing again): call them from a worker thread (``asyncio.to_thread``), never on an event loop.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import time
from pathlib import Path

from inference.avatars.cache import AvatarCache
from inference.avatars.jobs import AvatarBusy, JobStatus, PreparationJob, PreparationJobs
from inference.avatars.layout import (
    AvatarLayout,
    AvatarRecord,
    FaceBox,
    engine_folder_name,
    is_avatar_id,
    replace_dir,
    source_name,
    stage_dir,
    validate_avatar_id,
)
from inference.engine import AvatarInfo, PreparedAvatar, Renderer

log = logging.getLogger(__name__)

DEFAULT_AVATAR_ID = "astronaut"
DEFAULT_AVATAR_NAME = "Astronaut"
DEFAULT_AVATAR_SOURCE = Path(__file__).resolve().parent.parent / "assets" / "astronaut.png"


class AvatarStore:
    """Avatars under ``root`` for ``renderer``; at most ``cache_size`` kept loaded."""

    def __init__(self, root: Path | str, renderer: Renderer, *, cache_size: int = 8) -> None:
        self.layout = AvatarLayout(root)
        self.root = self.layout.root
        self.renderer = renderer
        self.engine = engine_folder_name(renderer.name)
        self.jobs = PreparationJobs()
        self._cache = AvatarCache(cache_size)
        self._lock = threading.Lock()
        self._id_locks: dict[str, threading.Lock] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        self.layout.clean_leftovers()

    # ----- queries -----

    def list(self) -> list[AvatarInfo]:
        """Every avatar, prepared (``ready``) or being prepared (not ``ready``), by name."""
        found: dict[str, AvatarInfo] = {}
        for avatar_id in self.layout.ids():
            info = self.info(avatar_id)
            if info is not None:
                found[avatar_id] = info
        for avatar_id, job in self.jobs.running().items():
            found.setdefault(avatar_id, AvatarInfo(avatar_id, job.name, 0, 0, 0, False))
        return sorted(found.values(), key=lambda i: (i.name.lower(), i.id))

    def info(self, avatar_id: str) -> AvatarInfo | None:
        """``None`` for an id that is not an avatar's; ``ready`` is false while it is being
        prepared and after its data could not be prepared again (``job`` says why)."""
        if not is_avatar_id(avatar_id):
            return None
        job = self.jobs.get(avatar_id)
        record = self.layout.read_record(avatar_id)
        if record is None:
            if job is not None and job.status is JobStatus.PREPARING:
                return AvatarInfo(avatar_id, job.name, 0, 0, 0, False)
            return None
        ready = job is None or not (job.status is JobStatus.PREPARING or job.unservable)
        return AvatarInfo(record.id, record.name, record.frames, record.width, record.height, ready)

    def job(self, avatar_id: str) -> PreparationJob | None:
        """The latest preparation of the avatar since this store started, if any."""
        return self.jobs.get(avatar_id)

    def revision(self, avatar_id: str) -> str | None:
        """Changes whenever the avatar is prepared again (what a cache of its clips keys on)."""
        return self.layout.revision(avatar_id)

    def is_preparing(self, avatar_id: str) -> bool:
        return self.jobs.is_running(avatar_id)

    def get(self, avatar_id: str) -> PreparedAvatar | None:
        """The loaded avatar; ``None`` if there is none, it is being prepared, or its data is stale
        or damaged and preparing it again failed (logged, and the job's reason says why)."""
        if not is_avatar_id(avatar_id) or self.jobs.is_running(avatar_id):
            return None
        avatar = self._cache.get(avatar_id)
        if avatar is not None:
            return avatar
        if not self.layout.store_file(avatar_id).is_file():
            return None  # (and no lock is made for ids that do not exist)
        with self._id_lock(avatar_id):
            if self.jobs.is_running(avatar_id):
                return None
            avatar = self._cache.get(avatar_id)
            if avatar is None:
                avatar = self._load(avatar_id)
                if avatar is not None:
                    self._cache.put(avatar_id, avatar)
            return avatar

    # ----- changes -----

    def prepare(
        self, avatar_id: str, name: str, source_path: Path | str, *, face_box: FaceBox | None = None
    ) -> AvatarInfo:
        """Prepare (or replace) an avatar from an image or video file; returns its info, ready.

        Listed as not ready meanwhile; on failure nothing of it is left and an avatar it was to
        replace stays as it was. Raises ``InvalidAvatarId``, ``AvatarBusy``, ``FileNotFoundError``
        or the renderer's error (``ValueError`` for a source it cannot use)."""
        validate_avatar_id(avatar_id)
        source = Path(source_path)
        if not source.is_file():
            raise FileNotFoundError(f"avatar source {source} not found")
        name = str(name).strip() or avatar_id
        job = self.jobs.begin(avatar_id, name)
        try:
            with self._id_lock(avatar_id):
                avatar = self._prepare_new(avatar_id, name, source, face_box)
                self._cache.put(avatar_id, avatar)
        except BaseException as exc:
            self.jobs.fail(job, _reason(exc))
            raise
        self.jobs.succeed(job)
        return dataclasses.replace(avatar.info, ready=True)

    def delete(self, avatar_id: str) -> bool:
        """Remove an avatar from disk and memory (sessions using it keep their copy)."""
        validate_avatar_id(avatar_id)
        if self.jobs.is_running(avatar_id):  # (a preparation holds the id lock: do not wait for it)
            raise AvatarBusy(f"avatar {avatar_id!r} is being prepared")
        with self._id_lock(avatar_id):
            if self.jobs.is_running(avatar_id):  # one that began meanwhile, waiting for the lock
                raise AvatarBusy(f"avatar {avatar_id!r} is being prepared")
            self._cache.discard(avatar_id)
            self.jobs.forget(avatar_id)
            return self.layout.remove(avatar_id)

    def ensure_default(self) -> AvatarInfo:
        """Prepare the shipped default avatar unless a current one is there already."""
        avatar = self.get(DEFAULT_AVATAR_ID)
        if avatar is not None:
            return dataclasses.replace(avatar.info, ready=True)
        try:
            return self.prepare(DEFAULT_AVATAR_ID, DEFAULT_AVATAR_NAME, DEFAULT_AVATAR_SOURCE)
        except AvatarBusy:  # someone else is preparing it right now
            return AvatarInfo(DEFAULT_AVATAR_ID, DEFAULT_AVATAR_NAME, 0, 0, 0, False)

    # ----- internals -----

    def _id_lock(self, avatar_id: str) -> threading.Lock:
        with self._lock:
            return self._id_locks.setdefault(avatar_id, threading.Lock())

    def _prepare_new(self, avatar_id: str, name: str, source: Path, face_box: FaceBox | None) -> PreparedAvatar:
        """Prepare from a (new) source in a stage, then swap it in whole: the old source and
        every engine's data made from it go together."""
        stage = stage_dir(self.root, avatar_id)
        started = time.monotonic()
        try:
            copy = stage / source_name(source)
            shutil.copyfile(source, copy)
            avatar = self.renderer.prepare_avatar_dir(stage / self.engine, avatar_id, name, copy, face_box=face_box)
            record = self._record(avatar, copy.name, face_box, time.monotonic() - started)
            self.layout.write_record(stage, record)
            replace_dir(stage, self.layout.folder(avatar_id))
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        log.info("avatar %s prepared by the %s engine in %.2f s", avatar_id, self.engine, record.prepare_seconds)
        return avatar

    def _load(self, avatar_id: str) -> PreparedAvatar | None:
        """Load from disk; data that is stale, incomplete or damaged is prepared again from the
        stored source, never served as it is. Runs under the avatar's id lock."""
        record = self.layout.read_record(avatar_id)
        if record is None:
            return None
        directory = self.layout.engine_dir(avatar_id, self.engine)
        avatar = self.renderer.load_avatar_dir(directory)
        if avatar is not None:
            return avatar
        problem = self.renderer.avatar_problem(directory) or "damaged (its files cannot be read)"
        try:
            job = self.jobs.begin(avatar_id, record.name, refresh=True)
        except AvatarBusy:
            return None
        log.warning("avatar %s: its %s data is %s; preparing it again from its source", avatar_id, self.engine, problem)
        try:
            avatar = self._prepare_engine_data(record)
        except Exception as exc:
            reason = f"its {self.engine} data is {problem}, and preparing it again failed: {_reason(exc)}"
            self.jobs.fail(job, reason)
            log.error("avatar %s cannot be served: %s", avatar_id, reason)
            return None
        except BaseException as exc:
            self.jobs.fail(job, _reason(exc))
            raise
        self.jobs.succeed(job)
        return avatar

    def _prepare_engine_data(self, record: AvatarRecord) -> PreparedAvatar:
        """Prepare this engine's data again from the stored source and swap it in; the record
        is written again, so the revision changes (clips made from the old data are not reused)."""
        source = self.layout.source_of(record)
        folder = self.layout.folder(record.id)
        stage = stage_dir(folder, self.engine)
        started = time.monotonic()
        try:
            avatar = self.renderer.prepare_avatar_dir(stage, record.id, record.name, source, face_box=record.face_box)
            replace_dir(stage, folder / self.engine)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        seconds = time.monotonic() - started
        self.layout.write_record(folder, self._record(avatar, record.source, record.face_box, seconds))
        return avatar

    def _record(self, avatar: PreparedAvatar, source: str, face_box: FaceBox | None, seconds: float) -> AvatarRecord:
        info = avatar.info
        return AvatarRecord(
            id=info.id,
            name=info.name,
            frames=info.frames,
            width=info.width,
            height=info.height,
            source=source,
            face_box=face_box,
            prepared_by=self.engine,
            prepared_at=time.time(),
            prepare_seconds=round(seconds, 3),
        )


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
