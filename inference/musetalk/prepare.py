"""Avatar preparation: source frames -> face boxes -> 256x256 crops -> VAE latents and blend masks.

Every source frame keeps its index: a frame where no face is found takes the box of the nearest
frame with one when that is at most ``MAX_GAP`` frames away (``face.fill_gaps``), and otherwise has
no box, zero latents and no mask, and is shown unchanged. MuseTalk's own scripts skip such frames
when they build the latent list, so that frames and latents fall out of step after the first one;
here they cannot. ``AvatarData.faces`` says how many frames had no face or a fallback box.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from inference.face import FaceReport
from inference.musetalk.avatar import AvatarData
from inference.musetalk.face import Box, FaceDetector, FoundFace, fill_gaps, find_faces
from inference.musetalk.masks import (
    FaceParser,
    crop_box,
    crop_padded,
    face_alpha,
    geometric_mask,
)
from inference.musetalk.models import MuseTalkModels

CROP = 256
MAX_GAP = 5  # a frame without a face takes the box of a frame at most this far

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def read_frames(source: str | Path, max_frames: int = 750) -> np.ndarray:
    """RGB frames of an image or a video (at most ``max_frames``): ``[N, H, W, 3]`` uint8."""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"avatar source {path} does not exist")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"cannot decode the image {path}")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)[None]
    capture = cv2.VideoCapture(str(path))
    frames: list[np.ndarray] = []
    try:
        while len(frames) < max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    finally:
        capture.release()
    if not frames:
        raise ValueError(f"cannot decode any frame of {path}")
    return np.stack(frames)


def face_crop(frame: np.ndarray, box: Box) -> np.ndarray:
    """The face box resized to 256x256, the UNet's input image."""
    return cv2.resize(crop_padded(frame, box), (CROP, CROP), interpolation=cv2.INTER_LANCZOS4)


@torch.inference_mode()
def encode_latents(
    models: MuseTalkModels, crops: np.ndarray, generator: torch.Generator, batch: int = 8
) -> torch.Tensor:
    """``[N, 8, 32, 32]``: the latent of the crop with its lower half black, then of the whole crop.
    Latents are sampled from the VAE posterior as MuseTalk does, from a seeded generator."""
    out = []
    for start in range(0, len(crops), batch):
        images = torch.from_numpy(crops[start : start + batch]).to(models.device).permute(0, 3, 1, 2)
        masked = images.clone()
        masked[:, :, CROP // 2 :] = 0
        pair = torch.cat([masked, images]).to(models.dtype) / 127.5 - 1.0
        posterior = models.vae.encode(pair).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator, dtype=torch.float32)
        latents = (posterior.mean + posterior.std * noise.to(posterior.mean)) * models.vae_scaling
        n = len(images)
        out.append(torch.cat([latents[:n], latents[n:]], dim=1))
    return torch.cat(out)


def blend_alphas(
    frames: np.ndarray, boxes: Sequence[Box | None], parser: FaceParser | None, batch: int = 8
) -> list[np.ndarray | None]:
    """The blending weight over each face box (None where there is no face)."""
    alphas: list[np.ndarray | None] = [None] * len(frames)
    todo = [i for i, b in enumerate(boxes) if b is not None]
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        crops = [crop_box(boxes[i]) for i in chunk]  # type: ignore[arg-type]
        if parser is not None:
            parsed = parser.masks([crop_padded(frames[i], c) for i, c in zip(chunk, crops, strict=True)])
        else:
            parsed = [
                geometric_mask(c[2] - c[0], _shift(boxes[i], c))  # type: ignore[arg-type]
                for i, c in zip(chunk, crops, strict=True)
            ]
        for i, c, mask in zip(chunk, crops, parsed, strict=True):
            alphas[i] = face_alpha(mask, boxes[i], c)  # type: ignore[arg-type]
    return alphas


def _shift(box: Box, crop: Box) -> Box:
    return box[0] - crop[0], box[1] - crop[1], box[2] - crop[0], box[3] - crop[1]


def prepare(
    models: MuseTalkModels,
    frames: np.ndarray,
    detector: FaceDetector,
    *,
    parser: FaceParser | None,
    seed: int = 0,
) -> AvatarData:
    """Compute an avatar's latents, boxes and masks; fails when no frame has a face."""
    found = find_faces(list(frames), detector)
    raw = [_valid(f.box) if f is not None else None for f in found]
    boxes = fill_gaps(raw, MAX_GAP)
    if all(b is None for b in boxes):
        raise ValueError("no face found in the avatar source")
    faces = face_report(found, raw, str(getattr(detector, "method", "given")))
    if faces.no_face or faces.fallback:
        log.warning(
            "avatar preparation: %d of %d frames had no face (%d shown unchanged), %d a fallback box",
            faces.no_face,
            faces.frames,
            sum(b is None for b in boxes),
            faces.fallback,
        )
    face_frames = [i for i, b in enumerate(boxes) if b is not None]
    crops = np.stack([face_crop(frames[i], boxes[i]) for i in face_frames])  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(seed)
    encoded = encode_latents(models, crops, generator)
    latents = encoded.new_zeros((len(frames), *encoded.shape[1:]))
    latents[face_frames] = encoded
    return AvatarData(
        frames=np.ascontiguousarray(frames),
        latents=latents,
        boxes=boxes,
        alphas=blend_alphas(frames, boxes, parser),
        mask_kind="parsing" if parser is not None else "geometric",
        faces=faces,
    )


def face_report(found: Sequence[FoundFace | None], valid: Sequence[Box | None], method: str) -> FaceReport:
    """Frames with no (usable) face, and frames whose box came another way than ``method``."""
    fallback = sum(f is not None and b is not None and f.method != method for f, b in zip(found, valid, strict=True))
    return FaceReport(frames=len(found), no_face=sum(b is None for b in valid), fallback=fallback, method=method)


def _valid(box: Box | None) -> Box | None:
    if box is None or box[2] - box[0] < 8 or box[3] - box[1] < 8:
        return None
    return tuple(int(v) for v in box)  # type: ignore[return-value]
