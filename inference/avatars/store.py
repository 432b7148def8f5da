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
from collections.abc import Callable
from pathlib import Path

from inference.avatars.cache import CacheStats, HostAvatarCache
from inference.avatars.jobs import AvatarBusy, JobStatus, PreparationJob, PreparationJobs, Progress
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
    """Avatars under ``root`` for ``renderer``: at most ``host_cache_bytes`` of them kept loaded
    in host memory, at most ``disk_bytes`` of prepared data on disk (0: no limit; the coldest
    avatars' data goes first and is prepared again from the stored source when next used). Hot
    avatars (``is_hot``) are kept in both while colder ones can go."""

    def __init__(
        self,
        root: Path | str,
        renderer: Renderer,
        *,
        host_cache_bytes: int = 2 << 30,
        disk_bytes: int = 0,
        is_hot: Callable[[str], bool] | None = None,
    ) -> None:
        self.layout = AvatarLayout(root)
        self.root = self.layout.root
        self.renderer = renderer
        self.engine = engine_folder_name(renderer.name)
        self.jobs = PreparationJobs()
        self.is_hot: Callable[[str], bool] = is_hot or (lambda avatar_id: False)
        self._cache = HostAvatarCache(host_cache_bytes, lambda avatar_id: self.is_hot(avatar_id))
        self.disk_bytes = disk_bytes
        self.disk_stats = CacheStats()
        """Loads from disk (hits), loads that had to prepare again (misses), data dropped (evictions)."""
        self._last_used: dict[str, float] = {}
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
            self._last_used[avatar_id] = time.monotonic()
            return avatar
        if not self.layout.store_file(avatar_id).is_file():
            return None  # (and no lock is made for ids that do not exist)
        with self._id_lock(avatar_id):
            if self.jobs.is_running(avatar_id):
                return None
            avatar = self._cache.peek(avatar_id)
            if avatar is None:
                avatar = self._load(avatar_id)
                if avatar is not None:
                    self._cache.put(avatar_id, avatar)
        if avatar is not None:  # (a load may have prepared the data again: the disk may have grown)
            self._last_used[avatar_id] = time.monotonic()
            self._enforce_disk_budget(keep=avatar_id)
        return avatar

    @property
    def host_stats(self) -> CacheStats:
        return self._cache.stats

    # ----- changes -----

    def prepare(
        self, avatar_id: str, name: str, source_path: Path | str, *, face_box: FaceBox | None = None
    ) -> AvatarInfo:
        """Prepare (or replace) an avatar from an image or video file; returns its info, ready.

        Listed as not ready meanwhile; on failure nothing of it is left and an avatar it was to
        replace stays as it was. Raises ``InvalidAvatarId``, ``AvatarBusy``, ``FileNotFoundError``
        or the renderer's error (``ValueError`` for a source it cannot use)."""
        job = self.begin_preparation(avatar_id, name)
        return self.run_preparation(job, source_path, face_box=face_box)

    def begin_preparation(self, avatar_id: str, name: str) -> PreparationJob:
        """Register a preparation (the avatar is ``preparing`` from now on) to be run later by
        ``run_preparation``. Raises ``InvalidAvatarId`` or ``AvatarBusy``."""
        validate_avatar_id(avatar_id)
        return self.jobs.begin(avatar_id, str(name).strip() or avatar_id)

    def run_preparation(
        self, job: PreparationJob, source_path: Path | str, *, face_box: FaceBox | None = None
    ) -> AvatarInfo:
        """Run a job ``begin_preparation`` registered; it ends ``ready`` or ``failed`` with the
        reason, and the error is raised again."""
        source = Path(source_path)
        avatar_id = job.avatar_id
        try:
            if not source.is_file():
                raise FileNotFoundError(f"avatar source {source} not found")
            with self._id_lock(avatar_id):
                avatar = self._prepare_new(
                    avatar_id, job.name, source, face_box, lambda done, total: self.jobs.report(job, done, total)
                )
                self._cache.put(avatar_id, avatar)
        except BaseException as exc:
            self.jobs.fail(job, _reason(exc))
            raise
        self.jobs.succeed(job, avatar.face_report)
        self._last_used[avatar_id] = time.monotonic()
        self._enforce_disk_budget(keep=avatar_id)
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
            self._last_used.pop(avatar_id, None)
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

    def _prepare_new(
        self, avatar_id: str, name: str, source: Path, face_box: FaceBox | None, progress: Progress
    ) -> PreparedAvatar:
        """Prepare from a (new) source in a stage, then swap it in whole: the old source and
        every engine's data made from it go together."""
        stage = stage_dir(self.root, avatar_id)
        started = time.monotonic()
        try:
            copy = stage / source_name(source)
            shutil.copyfile(source, copy)
            avatar = self.renderer.prepare_avatar_dir(
                stage / self.engine, avatar_id, name, copy, face_box=face_box, progress=progress
            )
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
            self.disk_stats.hits += 1
            return avatar
        self.disk_stats.misses += 1
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
        self.jobs.succeed(job, avatar.face_report)
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

    def _enforce_disk_budget(self, keep: str) -> None:
        """Drop the prepared data of the coldest avatars (not ``keep``, hot ones last) until the
        engine data on disk fits ``disk_bytes``. Records and sources stay: a dropped avatar is
        listed as before and prepared again from its source when it is next used."""
        if self.disk_bytes <= 0:
            return
        sizes = {i: _tree_bytes(self.layout.engine_dir(i, self.engine)) for i in self.layout.ids()}
        total = sum(sizes.values())
        order = sorted(
            (i for i, size in sizes.items() if size > 0 and i != keep),
            key=lambda i: (self.is_hot(i), self._last_used.get(i, 0.0)),
        )
        for avatar_id in order:
            if total <= self.disk_bytes:
                break
            if self.jobs.is_running(avatar_id):
                continue
            with self._id_lock(avatar_id):
                shutil.rmtree(self.layout.engine_dir(avatar_id, self.engine), ignore_errors=True)
            total -= sizes[avatar_id]
            self.disk_stats.evictions += 1
            log.info("avatar %s: its %s data was dropped to keep avatars.disk_bytes", avatar_id, self.engine)

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


def _tree_bytes(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
