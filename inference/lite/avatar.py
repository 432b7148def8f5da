"""A prepared lite avatar: its frames, mouth geometry and on-disk form.

On disk, in one folder per avatar (only safe formats, nothing unpickled)::

    avatar.json    metadata: id, name, size, frame count, preparation version hash, source kind,
                   ``faces`` (``inference.face.FaceReport``: frames with no face or a fallback mouth)
    geometry.npz   float32 arrays ``face`` (N x 4) and ``mouth`` (N x 3), bool ``detected`` (N),
                   read with ``allow_pickle=False``
    frames/000000.png ...  the N frames (RGB, lossless)

A video avatar of N frames loops forward then backward: ``cycle_length`` is ``2N - 2`` and loop
position ``i`` shows frame ``i`` going up, then ``2N - 2 - i`` coming back.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from inference.engine import AvatarInfo, PreparedAvatar
from inference.face import FaceReport
from inference.lite.prepare import FORMAT_VERSION, Prepared, PrepareParams
from inference.lite.rig import MouthRig

log = logging.getLogger(__name__)

META_FILE = "avatar.json"
GEOMETRY_FILE = "geometry.npz"
FRAMES_DIR = "frames"
ENGINE = "lite"
AVATAR_FILES = (META_FILE, GEOMETRY_FILE, FRAMES_DIR)


def cycle_length(frames: int) -> int:
    return max(1, 2 * frames - 2)


class LiteAvatar(PreparedAvatar):
    """Immutable once built: frames are read-only arrays, shared by every session using it."""

    def __init__(
        self,
        info: AvatarInfo,
        frames: np.ndarray,
        face: np.ndarray,
        mouth: np.ndarray,
        *,
        version: str = "",
        meta: dict[str, Any] | None = None,
    ) -> None:
        if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
            raise ValueError("frames must be N x H x W x 3 uint8")
        n = frames.shape[0]
        if face.shape != (n, 4) or mouth.shape != (n, 3):
            raise ValueError("geometry does not match the frames")
        self.info = info
        self.version = version
        self.meta = dict(meta or {})
        self.frames = frames
        self.frames.flags.writeable = False
        self.face = np.array(face, np.float32)
        self.mouth = np.array(mouth, np.float32)
        self.face.flags.writeable = False
        self.mouth.flags.writeable = False
        self.rig = MouthRig(self.face, self.mouth, frames)
        self._cycle = cycle_length(n)

    @property
    def cycle_length(self) -> int:
        return self._cycle

    @property
    def face_report(self) -> FaceReport | None:
        """How the faces were found (``None`` for an avatar prepared before this was kept)."""
        faces = self.meta.get("faces")
        return FaceReport(**faces) if isinstance(faces, dict) else None

    @property
    def frame_count(self) -> int:
        return int(self.frames.shape[0])

    def frame_index(self, cycle_index: int) -> int:
        """The stored frame shown at loop position ``cycle_index`` (forward then backward)."""
        i = int(cycle_index) % self._cycle
        n = self.frame_count
        return i if i < n else self._cycle - i

    def idle_frame(self, cycle_index: int) -> np.ndarray:
        """The rest frame (read-only: copy it before drawing on it)."""
        frame: np.ndarray = self.frames[self.frame_index(cycle_index)]
        return frame


def save_avatar(
    directory: Path,
    avatar_id: str,
    name: str,
    prepared: Prepared,
    *,
    version: str,
    params: PrepareParams,
) -> dict[str, Any]:
    """Write a prepared avatar into ``directory`` (created; normally a temporary folder that the
    caller renames into place once this returns). Returns the metadata written."""
    directory.mkdir(parents=True, exist_ok=True)
    frames_dir = directory / FRAMES_DIR
    frames_dir.mkdir(exist_ok=True)
    for k, frame in enumerate(prepared.frames):
        path = frames_dir / f"{k:06d}.png"
        if not cv2.imwrite(
            str(path), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 3]
        ):
            raise OSError(f"could not write {path}")
    np.savez(
        directory / GEOMETRY_FILE,
        face=prepared.face.astype(np.float32),
        mouth=prepared.mouth.astype(np.float32),
        detected=prepared.detected.astype(bool),
    )
    n, h, w = prepared.frames.shape[:3]
    meta = {
        "format": FORMAT_VERSION,
        "engine": ENGINE,
        "id": avatar_id,
        "name": name,
        "frames": int(n),
        "cycle_length": cycle_length(n),
        "width": int(w),
        "height": int(h),
        "version": version,
        "params": {
            "max_size": params.max_size,
            "max_frames": params.max_frames,
            "smoothing_frames": params.smoothing_frames,
        },
        "source": {"kind": prepared.source_kind, "fps": prepared.source_fps},
        "faces_detected": int(prepared.detected.sum()),
        "faces": prepared.faces.to_json(),
        "created_at": time.time(),
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def read_meta(directory: Path) -> dict[str, Any] | None:
    """The avatar's metadata, or ``None`` when there is no readable lite avatar there."""
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("engine") != ENGINE:
        return None
    return meta


def info_from_meta(meta: dict[str, Any], ready: bool = True) -> AvatarInfo:
    return AvatarInfo(
        id=str(meta["id"]),
        name=str(meta.get("name", meta["id"])),
        frames=int(meta["frames"]),
        width=int(meta["width"]),
        height=int(meta["height"]),
        ready=ready,
    )


def load_avatar(directory: Path, expected_version: str) -> LiteAvatar | None:
    """Load an avatar from its folder; ``None`` if it is missing, damaged, or prepared by other
    code or parameters (its version is not ``expected_version``)."""
    meta = read_meta(directory)
    if meta is None or meta.get("version") != expected_version:
        return None
    try:
        n, w, h = int(meta["frames"]), int(meta["width"]), int(meta["height"])
        with np.load(directory / GEOMETRY_FILE, allow_pickle=False) as geo:
            face = np.asarray(geo["face"], np.float32)
            mouth = np.asarray(geo["mouth"], np.float32)
        frames = np.empty((n, h, w, 3), np.uint8)
        for k in range(n):
            bgr = cv2.imread(str(directory / FRAMES_DIR / f"{k:06d}.png"), cv2.IMREAD_COLOR)
            if bgr is None or bgr.shape != (h, w, 3):
                log.warning("avatar %s: frame %d missing or of the wrong size", directory.name, k)
                return None
            cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=frames[k])
        return LiteAvatar(
            info_from_meta(meta), frames, face, mouth, version=str(meta.get("version", "")), meta=meta
        )
    except (OSError, KeyError, ValueError) as exc:
        log.warning("avatar %s could not be loaded: %s", directory.name, exc)
        return None
