"""A prepared MuseTalk avatar, and how it is stored on disk.

On disk (``<folder>/``): ``avatar.json`` (boxes, which frames have a face, how the faces were found
(``faces``: frames with no face or a fallback box), the preparation hash),
``latents.safetensors`` ([N, 8, 32, 32]: masked then reference latent per source frame),
``masks.npz`` (one uint8 blending weight per face frame, loaded with ``allow_pickle=False``) and
``frames/NNNNN.png``. Frames without a face keep their place (zero latents, no mask) so indices of
frames, latents and masks never drift apart; they are shown unchanged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from inference.engine import AvatarInfo, PreparedAvatar
from inference.face import FaceReport
from inference.musetalk.face import Box

FORMAT = 1
META_FILE = "avatar.json"
LATENTS_FILE = "latents.safetensors"
MASKS_FILE = "masks.npz"
FRAMES_DIR = "frames"
AVATAR_FILES = (META_FILE, LATENTS_FILE, MASKS_FILE, FRAMES_DIR)

log = logging.getLogger(__name__)


@dataclass
class AvatarData:
    """Everything preparation computes for the source frames (before the loop is made)."""

    frames: np.ndarray  # [N, H, W, 3] uint8 RGB
    latents: torch.Tensor  # [N, 8, 32, 32]
    boxes: list[Box | None]
    alphas: list[np.ndarray | None]  # blending weight over each face box, float32 [h, w]
    mask_kind: str  # "parsing" or "geometric"
    faces: FaceReport | None = None  # how the faces were found (None: prepared before this was kept)


class MuseTalkAvatar(PreparedAvatar):
    """Immutable and shared by every session using it; latents live on the model's device, frames
    are read-only. ``info.frames`` is the number of source frames; the loop (``cycle_length``,
    ``2N - 2``) plays them forward then backward, as the lite engine's avatars do."""

    def __init__(self, avatar_id: str, name: str, data: AvatarData, version: str) -> None:
        n, h, w = data.frames.shape[:3]
        self.data = data
        self.data.frames.flags.writeable = False
        self.version = version
        self.source_frames = n
        self.info = AvatarInfo(id=avatar_id, name=name, frames=n, width=w, height=h, ready=True)
        self.has_face = np.array([b is not None for b in data.boxes], dtype=bool)
        self.alphas = [a[..., None] if a is not None else None for a in data.alphas]
        self._latents: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def face_report(self) -> FaceReport | None:
        return self.data.faces

    def source_index(self, cycle_index: int) -> int:
        """The source frame at loop position ``cycle_index``: forward then backward, never a jump
        nor a repeated frame at the turns."""
        cycle = self.cycle_length
        i = cycle_index % cycle
        return i if i < self.source_frames else cycle - i

    def idle_frame(self, cycle_index: int) -> np.ndarray:
        """The source frame at loop position ``cycle_index`` (shared and read-only)."""
        frame: np.ndarray = self.data.frames[self.source_index(cycle_index)]
        return frame

    def to(self, device: torch.device, dtype: torch.dtype) -> MuseTalkAvatar:
        self.data.latents = self.data.latents.to(device=device, dtype=dtype)
        return self

    @property
    def nbytes(self) -> int:
        """Host memory: the frames and blending weights (latents count where they live)."""
        alphas = sum(a.nbytes for a in self.data.alphas if a is not None)
        latents = self.data.latents
        on_host = latents.element_size() * latents.nelement() if latents.device.type == "cpu" else 0
        return int(self.data.frames.nbytes + alphas + on_host)

    def release_on(self, device: torch.device, dtype: torch.dtype) -> None:
        """Drop the copy of the latents ``latents_on`` made for ``device`` (its worker's device
        cache evicted this avatar); the primary latents stay."""
        self._latents.pop((device, dtype), None)

    def latents_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The latents on ``device`` in ``dtype``: an avatar loaded once is shared by workers on
        several GPUs, and each gets its own copy once instead of a transfer every batch."""
        latents = self.data.latents
        if latents.device == device and latents.dtype == dtype:
            return latents
        key = (device, dtype)
        copy = self._latents.get(key)
        if copy is None:
            copy = self._latents[key] = latents.to(device=device, dtype=dtype)
        return copy


def save_avatar(folder: Path, avatar: MuseTalkAvatar) -> None:
    """Write into ``folder`` (created; normally a staging folder the caller swaps into place)."""
    from safetensors.torch import save_file

    data = avatar.data
    (folder / FRAMES_DIR).mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(data.frames):
        path = folder / FRAMES_DIR / f"{i:05d}.png"
        if not cv2.imwrite(str(path), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {path}")
    save_file({"latents": data.latents.detach().float().cpu().contiguous()}, str(folder / LATENTS_FILE))
    masks: dict[str, Any] = {
        f"m{i:05d}": np.round(a * 255).astype(np.uint8) for i, a in enumerate(data.alphas) if a is not None
    }
    np.savez_compressed(folder / MASKS_FILE, **masks)
    meta = {
        "format": FORMAT,
        "version": avatar.version,
        "id": avatar.info.id,
        "name": avatar.info.name,
        "frames": len(data.frames),
        "width": avatar.info.width,
        "height": avatar.info.height,
        "boxes": [list(b) if b is not None else None for b in data.boxes],
        "mask_kind": data.mask_kind,
        "faces": data.faces.to_json() if data.faces is not None else None,
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=1))


def recorded_version(folder: Path) -> str | None:
    """The preparation hash ``folder``'s metadata records; ``None`` if there is none readable."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    version = meta.get("version") if isinstance(meta, dict) else None
    return version if isinstance(version, str) else None


def load_avatar(folder: Path, version: str) -> MuseTalkAvatar | None:
    """The avatar stored in ``folder``, or ``None`` when there is none, it is damaged, or it was
    prepared by another version of the preparation or with other models (its hash differs)."""
    from safetensors.torch import load_file

    meta_path = folder / META_FILE
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT or meta.get("version") != version:
            return None
        n = int(meta["frames"])
        frames = []
        for i in range(n):
            bgr = cv2.imread(str(folder / FRAMES_DIR / f"{i:05d}.png"), cv2.IMREAD_COLOR)
            if bgr is None:
                raise ValueError(f"frame {i} is missing or unreadable")
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        latents = load_file(str(folder / LATENTS_FILE))["latents"]
        boxes: list[Box | None] = [tuple(b) if b is not None else None for b in meta["boxes"]]
        with np.load(folder / MASKS_FILE, allow_pickle=False) as stored:
            alphas = [
                stored[f"m{i:05d}"].astype(np.float32) / 255.0 if boxes[i] is not None else None for i in range(n)
            ]
        data = AvatarData(
            frames=np.stack(frames),
            latents=latents,
            boxes=boxes,
            alphas=alphas,
            mask_kind=meta["mask_kind"],
            faces=FaceReport(**meta["faces"]) if meta.get("faces") else None,
        )
        if latents.shape[0] != n or len(boxes) != n:
            raise ValueError("latents or boxes do not match the frames")
        for i, (box, alpha) in enumerate(zip(boxes, alphas, strict=True)):
            if box is not None and alpha is not None and alpha.shape != (box[3] - box[1], box[2] - box[0]):
                raise ValueError(f"mask {i} does not match its face box")
        return MuseTalkAvatar(meta["id"], meta["name"], data, str(meta.get("version", "")))
    except Exception as exc:  # damaged or foreign files: prepared again by the caller
        log.warning("musetalk avatar in %s could not be loaded: %s", folder, exc)
        return None
