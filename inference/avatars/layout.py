"""Avatars on disk: the one avatar-id rule, the folder layout and the one atomic folder swap.

One folder per avatar, ``<root>/<avatar_id>/``, holding

* ``store.json``: the store's record (id, name, size, source file, face hint);
* ``source.<ext>``: a copy of the image or video the avatar was made from, so that an engine can
  prepare it again when its preparation changed, or for the first time after a switch of engines;
* ``<engine>/``: each engine's prepared data, named after ``Renderer.name`` (``lite/``,
  ``musetalk/``), always replaced whole.

Work in progress is staged in dot-folders (``.tmp-*``) and swapped in with ``replace_dir``; what
is replaced waits in ``.old-*`` until the new one is in place. Dot-folders are never listed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeGuard

AVATAR_ID_PATTERN = r"[a-z0-9][a-z0-9_-]{0,63}"
"""An avatar id: 1 to 64 of ``a-z``, ``0-9``, ``_`` and ``-``, not starting with ``_`` or ``-``.
It names a folder, so it can never be ``..``, hold a separator or start with a dot."""

STORE_FILE = "store.json"
SOURCE_STEM = "source"
STAGE_PREFIX = ".tmp-"
TRASH_PREFIX = ".old-"

_AVATAR_ID = re.compile(AVATAR_ID_PATTERN)
_SUFFIX = re.compile(r"\.[a-z0-9]{1,5}")

FaceBox = tuple[float, float, float, float]


class InvalidAvatarId(ValueError):
    """A string that is not an avatar id (see ``AVATAR_ID_PATTERN``)."""


def is_avatar_id(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and _AVATAR_ID.fullmatch(value) is not None


def validate_avatar_id(value: object) -> str:
    """``value`` if it is an avatar id, else ``InvalidAvatarId``."""
    if not is_avatar_id(value):
        raise InvalidAvatarId(f"invalid avatar id {value!r}: use 1-64 of a-z, 0-9, '_' and '-'")
    return value


def engine_folder_name(name: str) -> str:
    """A renderer's name as the folder of its data: it must follow the avatar-id rule too."""
    if not is_avatar_id(name):
        raise ValueError(f"renderer name {name!r} cannot name a folder")
    return name


def stage_dir(parent: Path, label: str) -> Path:
    """A new, empty staging folder inside ``parent`` (which must exist)."""
    return Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{label}-", dir=parent))


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``, replacing any folder there, never leaving ``dst`` half
    written: the old one is moved aside first and deleted only once the new one is in place."""
    old: Path | None = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{TRASH_PREFIX}{dst.name}-", dir=dst.parent))
        os.replace(dst, old / dst.name)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:
            os.replace(old / dst.name, dst)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_file_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def source_name(source: Path) -> str:
    """The name the copy of ``source`` gets in the avatar folder (it keeps a plain extension)."""
    suffix = source.suffix.lower()
    return SOURCE_STEM + (suffix if _SUFFIX.fullmatch(suffix) else "")


@dataclass(frozen=True)
class AvatarRecord:
    """What ``store.json`` holds."""

    id: str
    name: str
    frames: int
    width: int
    height: int
    source: str
    face_box: FaceBox | None
    prepared_by: str
    prepared_at: float
    prepare_seconds: float

    def to_json(self) -> str:
        data = asdict(self)
        data["face_box"] = list(self.face_box) if self.face_box is not None else None
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> AvatarRecord:
        """Raises ``ValueError`` (or ``KeyError``/``TypeError``) for a record that is not one."""
        data: Any = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        face = data.get("face_box")
        box: FaceBox | None = None
        if isinstance(face, list) and len(face) == 4:
            box = (float(face[0]), float(face[1]), float(face[2]), float(face[3]))
        avatar_id = validate_avatar_id(data["id"])
        return cls(
            id=avatar_id,
            name=str(data.get("name") or avatar_id),
            frames=int(data.get("frames") or 0),
            width=int(data.get("width") or 0),
            height=int(data.get("height") or 0),
            source=str(data.get("source") or ""),
            face_box=box,
            prepared_by=str(data.get("prepared_by") or ""),
            prepared_at=float(data.get("prepared_at") or 0.0),
            prepare_seconds=float(data.get("prepare_seconds") or 0.0),
        )


class AvatarLayout:
    """Paths under one avatar root; every id is checked against the one rule before it names a
    path."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def folder(self, avatar_id: str) -> Path:
        return self.root / validate_avatar_id(avatar_id)

    def engine_dir(self, avatar_id: str, engine: str) -> Path:
        return self.folder(avatar_id) / engine_folder_name(engine)

    def store_file(self, avatar_id: str) -> Path:
        return self.folder(avatar_id) / STORE_FILE

    def ids(self) -> list[str]:
        """Ids of the folders under the root that look like avatars (with or without a record)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and is_avatar_id(p.name))

    def read_record(self, avatar_id: str) -> AvatarRecord | None:
        """The avatar's record; ``None`` when it has none, or one that is unreadable or another's."""
        try:
            record = AvatarRecord.from_json(self.store_file(avatar_id).read_text())
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return record if record.id == avatar_id else None

    def write_record(self, folder: Path, record: AvatarRecord) -> None:
        """Write ``store.json`` into ``folder`` (an avatar folder or a stage), atomically."""
        write_file_atomic(folder / STORE_FILE, record.to_json())

    def revision(self, avatar_id: str) -> str | None:
        """Changes whenever the record is written again, that is whenever the avatar is prepared."""
        try:
            return str(self.store_file(avatar_id).stat().st_mtime_ns)
        except (InvalidAvatarId, OSError):
            return None

    def source_of(self, record: AvatarRecord) -> Path:
        """The stored source of an avatar; ``FileNotFoundError`` if it is not there."""
        folder = self.folder(record.id)
        source = folder / record.source
        if not record.source or source.parent != folder or not source.is_file():
            raise FileNotFoundError(f"the stored source {record.source!r} of avatar {record.id!r} is missing")
        return source

    def remove(self, avatar_id: str) -> bool:
        """Delete an avatar folder (moved aside first, so it vanishes at once); ``False`` if none."""
        folder = self.folder(avatar_id)
        if not folder.is_dir():
            return False
        trash = Path(tempfile.mkdtemp(prefix=f"{TRASH_PREFIX}{avatar_id}-", dir=self.root))
        os.replace(folder, trash / avatar_id)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def clean_leftovers(self, older_than_s: float = 3600.0) -> None:
        """Remove staging and trash folders left by a crash (old ones only, in case another
        process shares the root and is preparing right now)."""
        if not self.root.is_dir():
            return
        now = time.time()
        parents = [self.root, *(self.root / i for i in self.ids())]
        for parent in parents:
            for child in parent.iterdir():
                if not child.name.startswith((STAGE_PREFIX, TRASH_PREFIX)) or not child.is_dir():
                    continue
                try:
                    if now - child.stat().st_mtime > older_than_s:
                        shutil.rmtree(child, ignore_errors=True)
                except OSError:
                    continue
