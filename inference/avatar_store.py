"""Prepared avatars on disk and in memory: list, load (LRU cache), prepare, the shipped default.

Layout: one folder per avatar, ``<root>/<avatar_id>/``, holding

* ``store.json``: what the store knows (id, name, size, source file, face hint);
* ``source.<ext>``: a copy of the image or video the avatar was made from, so that an engine can
  prepare it again when its preparation changed (stale), or prepare it for the first time after
  the server switched engines;
* ``<engine>/``: each engine's prepared data, named after ``Renderer.name`` (``lite/``,
  ``musetalk/``); an engine's folder is replaced whole, never left half written.

A new avatar (or a new source for an existing id) is staged in ``<root>/.tmp-*`` and renamed into
place, so a failed preparation leaves nothing and a replaced avatar stays as it was until the new
one is complete. Dot-folders are never listed; stale ones are cleaned at start.

Renderers with ``prepare_avatar_dir(directory, avatar_id, name, source, **hints)`` and
``load_avatar_dir(directory, *, allow_stale=False)`` (the lite and MuseTalk renderers) are handed
their engine folder, so the store alone decides the layout. Others get
``prepare_avatar(avatar_id, name, source)``/``load_avatar(avatar_id)`` and must keep their files in
``<their avatar_root>/<avatar_id>/<name>/`` with ``avatar_root`` this store's root, written
atomically.

Every method is thread-safe. ``prepare`` and a first ``get`` do slow work (decoding, face
detection, reading frames, maybe preparing): call them from a worker thread, not an event loop.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from inference.engine import AvatarInfo, PreparedAvatar, Renderer

log = logging.getLogger(__name__)

AVATAR_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
STORE_FILE = "store.json"
SOURCE_STEM = "source"

DEFAULT_AVATAR_ID = "astronaut"
DEFAULT_AVATAR_NAME = "Astronaut"
DEFAULT_AVATAR_SOURCE = Path(__file__).resolve().parent / "assets" / "astronaut.png"


class InvalidAvatarId(ValueError):
    """An avatar id that is not ``^[a-z0-9][a-z0-9_-]{0,63}$``."""


class AvatarBusy(RuntimeError):
    """The avatar is being prepared already."""


def validate_avatar_id(avatar_id: object) -> str:
    if not isinstance(avatar_id, str) or not AVATAR_ID_RE.fullmatch(avatar_id):
        raise InvalidAvatarId(f"invalid avatar id {avatar_id!r}: use 1-64 of a-z, 0-9, '_' and '-'")
    return avatar_id


class AvatarStore:
    """Avatars under ``root`` for ``renderer``; at most ``cache_size`` kept loaded (LRU)."""

    def __init__(self, root: Path, renderer: Renderer, *, cache_size: int = 8) -> None:
        self.root = Path(root)
        self.renderer = renderer
        self.cache_size = max(1, int(cache_size))
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, PreparedAvatar] = OrderedDict()
        self._preparing: dict[str, AvatarInfo] = {}
        self._id_locks: dict[str, threading.Lock] = {}
        self._clean_leftovers()

    # ----- queries -----

    def list(self) -> list[AvatarInfo]:
        """Every avatar, prepared (``ready``) or being prepared (not ``ready``), by name."""
        with self._lock:
            preparing = dict(self._preparing)
        found: dict[str, AvatarInfo] = {}
        for folder in self.root.iterdir() if self.root.is_dir() else []:
            if not folder.is_dir() or not AVATAR_ID_RE.fullmatch(folder.name):
                continue
            meta = self._read_store_meta(folder)
            if meta is None:
                continue
            info = _info(meta, ready=folder.name not in preparing)
            found[info.id] = info
        for avatar_id, info in preparing.items():
            found.setdefault(avatar_id, info)
            if found[avatar_id].ready:
                found[avatar_id] = _replace_ready(found[avatar_id], False)
        return sorted(found.values(), key=lambda i: (i.name.lower(), i.id))

    def info(self, avatar_id: str) -> AvatarInfo | None:
        try:
            validate_avatar_id(avatar_id)
        except InvalidAvatarId:
            return None
        with self._lock:
            preparing = self._preparing.get(avatar_id)
        if preparing is not None:
            return _replace_ready(preparing, False)
        meta = self._read_store_meta(self.root / avatar_id)
        return None if meta is None else _info(meta, ready=True)

    def revision(self, avatar_id: str) -> str | None:
        """Changes whenever the avatar is prepared again (what a cache of its clips keys on)."""
        try:
            return str((self.root / validate_avatar_id(avatar_id) / STORE_FILE).stat().st_mtime_ns)
        except (InvalidAvatarId, OSError):
            return None

    def is_preparing(self, avatar_id: str) -> bool:
        with self._lock:
            return avatar_id in self._preparing

    def get(self, avatar_id: str) -> PreparedAvatar | None:
        """The loaded avatar, or ``None`` if there is none (or it is still being prepared). Loads it
        from disk if needed, and prepares it again first if it is stale."""
        try:
            validate_avatar_id(avatar_id)
        except InvalidAvatarId:
            return None
        with self._lock:
            if avatar_id in self._preparing:
                return None
            avatar = self._cache.get(avatar_id)
            if avatar is not None:
                self._cache.move_to_end(avatar_id)
                return avatar
        if not (self.root / avatar_id / STORE_FILE).is_file():
            return None  # (and no lock is made for ids that do not exist)
        with self._id_lock(avatar_id):
            with self._lock:
                if avatar_id in self._preparing:
                    return None
                avatar = self._cache.get(avatar_id)
                if avatar is not None:
                    return avatar
            avatar = self._load(avatar_id)
            if avatar is not None:
                self._remember(avatar_id, avatar)
            return avatar

    # ----- changes -----

    def prepare(
        self,
        avatar_id: str,
        name: str,
        source_path: Path | str,
        *,
        face_box: tuple[float, float, float, float] | None = None,
    ) -> AvatarInfo:
        """Prepare (or replace) an avatar from an image or video file; returns its info, ready.

        Listed as not ready meanwhile; on failure nothing of it is left and an avatar it was to
        replace stays as it was. Raises ``InvalidAvatarId``, ``AvatarBusy``, or the renderer's
        error (``ValueError`` for a source it cannot use)."""
        validate_avatar_id(avatar_id)
        source = Path(source_path)
        if not source.is_file():
            raise FileNotFoundError(f"avatar source {source} not found")
        name = str(name).strip() or avatar_id
        with self._lock:
            if avatar_id in self._preparing:
                raise AvatarBusy(f"avatar {avatar_id!r} is being prepared already")
            self._preparing[avatar_id] = AvatarInfo(avatar_id, name, 0, 0, 0, False)
        try:
            with self._id_lock(avatar_id):
                avatar = self._prepare_new(avatar_id, name, source, face_box)
                with self._lock:
                    self._cache.pop(avatar_id, None)
                self._remember(avatar_id, avatar)
        finally:
            with self._lock:
                self._preparing.pop(avatar_id, None)
        return _replace_ready(avatar.info, True)

    def delete(self, avatar_id: str) -> bool:
        """Remove an avatar from disk and memory (sessions using it keep their copy)."""
        validate_avatar_id(avatar_id)
        with self._lock:
            if avatar_id in self._preparing:
                raise AvatarBusy(f"avatar {avatar_id!r} is being prepared")
        with self._id_lock(avatar_id):
            with self._lock:
                self._cache.pop(avatar_id, None)
            folder = self.root / avatar_id
            if not folder.is_dir():
                return False
            trash = Path(tempfile.mkdtemp(prefix=f".old-{avatar_id}-", dir=self.root))
            folder.replace(trash / avatar_id)
            shutil.rmtree(trash, ignore_errors=True)
            return True

    def ensure_default(self) -> AvatarInfo:
        """Prepare the shipped default avatar unless a current one is there already."""
        avatar = self.get(DEFAULT_AVATAR_ID)
        if avatar is not None:
            return _replace_ready(avatar.info, True)
        try:
            return self.prepare(DEFAULT_AVATAR_ID, DEFAULT_AVATAR_NAME, DEFAULT_AVATAR_SOURCE)
        except AvatarBusy:  # someone else is preparing it right now
            return AvatarInfo(DEFAULT_AVATAR_ID, DEFAULT_AVATAR_NAME, 0, 0, 0, False)

    # ----- internals -----

    def _id_lock(self, avatar_id: str) -> threading.Lock:
        with self._lock:
            return self._id_locks.setdefault(avatar_id, threading.Lock())

    def _remember(self, avatar_id: str, avatar: PreparedAvatar) -> None:
        with self._lock:
            self._cache[avatar_id] = avatar
            self._cache.move_to_end(avatar_id)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _dir_protocol(self) -> bool:
        return hasattr(self.renderer, "prepare_avatar_dir") and hasattr(self.renderer, "load_avatar_dir")

    @property
    def engine(self) -> str:
        """The renderer's folder name inside each avatar folder."""
        name = str(getattr(self.renderer, "name", "") or "engine")
        if not AVATAR_ID_RE.fullmatch(name):
            raise ValueError(f"renderer name {name!r} cannot name a folder")
        return name

    def _engine_prepare(
        self,
        directory: Path,
        avatar_id: str,
        name: str,
        source: Path,
        face_box: tuple[float, float, float, float] | None,
    ) -> PreparedAvatar:
        if self._dir_protocol():
            hints: dict[str, Any] = {"face_box": face_box} if face_box is not None else {}
            return self.renderer.prepare_avatar_dir(directory, avatar_id, name, source, **hints)  # type: ignore[attr-defined]
        return self.renderer.prepare_avatar(avatar_id, name, str(source))

    def _prepare_new(
        self, avatar_id: str, name: str, source: Path, face_box: tuple[float, float, float, float] | None
    ) -> PreparedAvatar:
        """Prepare an avatar from a (new) source and put it in place, replacing any old one."""
        final = self.root / avatar_id
        existed = final.exists()
        stage = Path(tempfile.mkdtemp(prefix=f".tmp-{avatar_id}-", dir=self.root))
        started = time.monotonic()
        try:
            suffix = source.suffix.lower() if re.fullmatch(r"\.[a-z0-9]{1,5}", source.suffix.lower()) else ""
            copy = stage / f"{SOURCE_STEM}{suffix}"
            shutil.copyfile(source, copy)
            avatar = self._engine_prepare(stage / self.engine, avatar_id, name, copy, face_box)
            meta = self._store_meta(avatar, copy.name, face_box, time.monotonic() - started)
            if self._dir_protocol():
                (stage / STORE_FILE).write_text(json.dumps(meta, indent=2))
                _replace_dir(stage, final)  # the old source and every engine's old data go together
            else:
                # the renderer wrote <root>/<id>/<engine>/ itself: bring the source and store.json
                # next to it, then drop what belonged to the old source
                final.mkdir(exist_ok=True)
                copy.replace(final / copy.name)
                _write_atomic(final / STORE_FILE, json.dumps(meta, indent=2))
                for child in final.iterdir():
                    if child.name not in {self.engine, STORE_FILE, copy.name} and not child.name.startswith(
                        "."
                    ):
                        _remove(child)
                shutil.rmtree(stage, ignore_errors=True)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            if not existed and final.exists() and not (final / STORE_FILE).exists():
                shutil.rmtree(final, ignore_errors=True)
            raise
        log.info("avatar %s prepared in %.2f s", avatar_id, meta["prepare_seconds"])
        return avatar

    def _prepare_engine_data(self, avatar_id: str, meta: dict[str, Any]) -> PreparedAvatar | None:
        """Prepare this engine's data again from the stored source (stale, damaged or missing)."""
        folder = self.root / avatar_id
        source = folder / str(meta.get("source", ""))
        if source.parent != folder or not source.is_file():
            return None
        face = meta.get("face_box")
        hint = (
            (float(face[0]), float(face[1]), float(face[2]), float(face[3]))
            if isinstance(face, list) and len(face) == 4
            else None
        )
        name = str(meta.get("name") or avatar_id)
        log.info("avatar %s: preparing its %s data from the stored source", avatar_id, self.engine)
        if not self._dir_protocol():
            return self._engine_prepare(folder, avatar_id, name, source, hint)
        stage = Path(tempfile.mkdtemp(prefix=f".tmp-{self.engine}-", dir=folder))
        try:
            avatar = self._engine_prepare(stage, avatar_id, name, source, hint)
            _replace_dir(stage, folder / self.engine)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        return avatar

    def _load(self, avatar_id: str) -> PreparedAvatar | None:
        """Load from disk, preparing the engine's data first when it is stale or missing. Runs
        under the avatar's id lock."""
        folder = self.root / avatar_id
        meta = self._read_store_meta(folder)
        if meta is None:
            return None
        if self._dir_protocol():
            avatar = self.renderer.load_avatar_dir(folder / self.engine)  # type: ignore[attr-defined]
        else:
            avatar = self.renderer.load_avatar(avatar_id)
        if avatar is not None:
            return avatar
        with self._lock:
            if avatar_id in self._preparing:
                return None
            self._preparing[avatar_id] = _info(meta, ready=False)
        try:
            avatar = self._prepare_engine_data(avatar_id, meta)
            if avatar is not None:
                return avatar
        except Exception:
            log.exception("avatar %s could not be prepared again", avatar_id)
        finally:
            with self._lock:
                self._preparing.pop(avatar_id, None)
        if self._dir_protocol():  # better an avatar prepared the old way than none
            return self.renderer.load_avatar_dir(folder / self.engine, allow_stale=True)  # type: ignore[attr-defined]
        return None

    def _store_meta(
        self,
        avatar: PreparedAvatar,
        source_name: str,
        face_box: tuple[float, float, float, float] | None,
        seconds: float,
    ) -> dict[str, Any]:
        return {
            "id": avatar.info.id,
            "name": avatar.info.name,
            "frames": avatar.info.frames,
            "width": avatar.info.width,
            "height": avatar.info.height,
            "source": source_name,
            "face_box": list(face_box) if face_box is not None else None,
            "prepared_by": self.engine,
            "prepared_at": time.time(),
            "prepare_seconds": round(seconds, 3),
        }

    @staticmethod
    def _read_store_meta(folder: Path) -> dict[str, Any] | None:
        try:
            meta = json.loads((folder / STORE_FILE).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("id") != folder.name:
            return None
        return meta

    def _clean_leftovers(self, older_than_s: float = 3600.0) -> None:
        """Remove temporary folders left by a crash during a preparation (old ones only, in case
        another process shares the folder and is preparing right now)."""
        now = time.time()
        candidates = list(self.root.iterdir())
        for folder in list(candidates):
            if folder.is_dir() and AVATAR_ID_RE.fullmatch(folder.name):
                candidates.extend(folder.iterdir())
        for folder in candidates:
            if folder.name.startswith((".tmp-", ".old-")) and folder.is_dir():
                try:
                    if now - folder.stat().st_mtime > older_than_s:
                        shutil.rmtree(folder, ignore_errors=True)
                except OSError:
                    pass


def _info(meta: dict[str, Any], ready: bool) -> AvatarInfo:
    return AvatarInfo(
        id=str(meta["id"]),
        name=str(meta.get("name") or meta["id"]),
        frames=int(meta.get("frames") or 0),
        width=int(meta.get("width") or 0),
        height=int(meta.get("height") or 0),
        ready=ready,
    )


def _replace_ready(info: AvatarInfo, ready: bool) -> AvatarInfo:
    return AvatarInfo(info.id, info.name, info.frames, info.width, info.height, ready)


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, replacing an existing ``dst`` without a moment of a half one."""
    old: Path | None = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-{dst.name}-", dir=dst.parent))
        dst.replace(old / dst.name)
    try:
        src.replace(dst)
    except BaseException:
        if old is not None:
            (old / dst.name).replace(dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
