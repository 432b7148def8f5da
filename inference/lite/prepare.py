"""Avatar preparation for the lite engine: source image or video -> frames and mouth geometry.

Steps:

1. read the source (a still image, or a video resampled to 25 frames/s and capped in length), make
   it RGB, shrink it so its long side is at most ``max_size`` and crop it to even dimensions (what
   H.264 needs);
2. find the face on key frames with OpenCV's Haar cascades (tracking from one key frame to the next
   in a window around the last face), interpolate between key frames and let frames with no face
   take the nearest one found, so the geometry never falls out of step with the frames (``faces``
   counts the frames whose nearest key frame had no face);
3. find the lips in the lower face from their redness (Lab a*), falling back to the usual place
   in the face box, and smooth every coordinate over time;
4. a video avatar plays forward then backward (``2N - 2`` frames in the loop), so no jump.

The result (``Prepared``) is plain arrays; ``inference.lite.avatar`` stores and loads it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from inference import face as face_detection
from inference.engine import FPS
from inference.face import FaceFinder, FaceReport, default_detector

FORMAT_VERSION = 1
DETECT_SIZE = 320  # long side of the image the face detector sees
MAX_KEY_FRAMES = 40  # faces detected on at most this many frames of a video; the rest interpolated


class PreparationError(ValueError):
    """The source cannot be made into an avatar (unreadable, or no face in it)."""


@dataclass(frozen=True)
class PrepareParams:
    max_size: int = 512
    max_frames: int = 250  # 10 s of video at 25 frames/s; longer sources are cut
    smoothing_frames: float = 1.5  # sigma of the temporal smoothing of face and mouth boxes


@dataclass(frozen=True)
class Prepared:
    """Frames (N x H x W x 3 RGB uint8) and per-frame geometry in their pixels.

    ``face``: N x 4 float32 (x, y, w, h); ``mouth``: N x 3 float32 (centre x, lip line y,
    half width); ``detected``: N bool, whether the face was found on that frame itself;
    ``faces``: how many frames had no face, and how many a mouth placed by the face box's
    proportions (no lips found: the fallback).
    """

    frames: np.ndarray
    face: np.ndarray
    mouth: np.ndarray
    detected: np.ndarray
    source_kind: str
    source_fps: float
    faces: FaceReport


def preparation_version(params: PrepareParams) -> str:
    """A hash of the preparation code and parameters: a cache with another one is stale."""
    digest = hashlib.sha256()
    digest.update(f"lite-avatar-format-{FORMAT_VERSION}".encode())
    for module in (__file__, face_detection.__file__):
        digest.update(Path(module).read_bytes())
    digest.update(json.dumps(asdict(params), sort_keys=True).encode())
    return digest.hexdigest()[:16]


# ----- reading sources -----


def read_source(path: Path, params: PrepareParams) -> tuple[list[np.ndarray], str, float, float]:
    """RGB frames of an image or a video, resized; the source kind, its frame rate (0 for an
    image) and the scale from source pixels to frame pixels."""
    if not path.is_file():
        raise PreparationError(f"avatar source {path} does not exist")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is not None:
        frame = _fit(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), params.max_size)
        return [frame], "image", 0.0, _scale(image.shape, params.max_size)
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise PreparationError(f"{path.name}: neither an image nor a video OpenCV can read")
    try:
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        scale = 1.0
        if not math.isfinite(fps) or fps <= 0 or fps > 1000:
            fps = float(FPS)
        frames: list[np.ndarray] = []
        index = 0
        next_slot = 0  # resample to FPS: keep the first source frame of each 1/FPS slot
        while len(frames) < params.max_frames:
            ok, frame = capture.read()
            if not ok or frame is None:
                break
            slot = int(index * FPS / fps + 1e-6)
            index += 1
            if slot < next_slot:
                continue
            next_slot = slot + 1
            if frame.ndim == 2:
                frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
            if not frames:
                scale = _scale(frame.shape, params.max_size)
            frames.append(_fit(cv2.cvtColor(frame[..., :3], cv2.COLOR_BGR2RGB), params.max_size))
    finally:
        capture.release()
    if not frames:
        raise PreparationError(f"{path.name}: no frame could be decoded")
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:  # a stream that changes size midway: conform to the first frame
        h, w = frames[0].shape[:2]
        frames = [
            f if f.shape == frames[0].shape else cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA)
            for f in frames
        ]
    return frames, "video", fps, scale


def _scale(shape: tuple[int, ...], max_size: int) -> float:
    return min(1.0, max_size / max(shape[0], shape[1]))


def _fit(rgb: np.ndarray, max_size: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = _scale(rgb.shape, max_size)
    if scale < 1.0:
        rgb = cv2.resize(
            rgb, (max(2, round(w * scale)), max(2, round(h * scale))), interpolation=cv2.INTER_AREA
        )
    h, w = rgb.shape[:2]
    return np.ascontiguousarray(rgb[: h - h % 2, : w - w % 2])


# ----- faces -----


def detect_faces(frames: list[np.ndarray], detector: FaceFinder) -> tuple[np.ndarray, np.ndarray]:
    """Face boxes (N x 4, NaN where none) on key frames, and which frames are key frames."""
    n = len(frames)
    stride = max(1, math.ceil(n / MAX_KEY_FRAMES))
    keys = list(range(0, n, stride))
    if keys[-1] != n - 1:
        keys.append(n - 1)
    h, w = frames[0].shape[:2]
    scale = min(1.0, DETECT_SIZE / max(h, w))
    boxes = np.full((n, 4), np.nan, np.float64)
    last: tuple[float, float, float, float] | None = None
    for k in keys:
        gray = cv2.cvtColor(frames[k], cv2.COLOR_RGB2GRAY)
        if scale < 1.0:
            gray = cv2.resize(gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        gray = cv2.equalizeHist(gray)
        found = detector.detect(gray, near=last)
        if found is not None:
            last = found
            boxes[k] = np.array(found) / scale
    is_key = np.zeros(n, bool)
    is_key[keys] = True
    return boxes, is_key


def frames_without_face(boxes: np.ndarray, is_key: np.ndarray) -> np.ndarray:
    """Per frame, whether its nearest key frame had no face (its box was filled in from others)."""
    keys = np.flatnonzero(is_key)
    nearest = keys[np.argmin(np.abs(np.arange(len(boxes))[:, None] - keys[None, :]), axis=1)]
    missing: np.ndarray = np.isnan(boxes[nearest, 0])
    return missing


def fill_boxes(boxes: np.ndarray) -> np.ndarray:
    """Interpolate between found boxes; before the first and after the last, hold the nearest."""
    found = np.flatnonzero(~np.isnan(boxes[:, 0]))
    if len(found) == 0:
        raise PreparationError("no face found in the avatar source")
    out = np.empty_like(boxes)
    idx = np.arange(len(boxes))
    for c in range(boxes.shape[1]):
        out[:, c] = np.interp(idx, found, boxes[found, c])
    return out


def smooth(values: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing along axis 0, mirrored at the ends (as the loop plays back and forth)."""
    v = np.asarray(values, np.float64)
    if len(v) < 2 or sigma <= 0:
        return v.copy()
    flat = v.reshape(len(v), -1)
    radius = max(1, int(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(flat, [(radius, radius), (0, 0)], mode="reflect")
    columns = [np.convolve(padded[:, c], kernel, mode="valid") for c in range(flat.shape[1])]
    return np.stack(columns, axis=1).reshape(v.shape)


# ----- mouth -----


def mouth_prior(face: np.ndarray) -> tuple[float, float, float]:
    """Where the mouth usually is in a frontal Haar face box: centre x, lip line y, half width."""
    x, y, w, h = (float(v) for v in face)
    return x + 0.5 * w, y + 0.8 * h, 0.21 * w


def locate_mouth(rgb: np.ndarray, face: np.ndarray) -> tuple[float, float, float] | None:
    """Centre x, lip line y and half width of the lips below a face box, from their redness."""
    x, y, w, h = (float(v) for v in face)
    H, W = rgb.shape[:2]
    x0, x1 = max(0, int(x + 0.18 * w)), min(W, int(x + 0.82 * w))
    y0, y1 = max(0, int(y + 0.6 * h)), min(H, int(y + 1.0 * h))
    if x1 - x0 < 12 or y1 - y0 < 8:
        return None
    lab = cv2.cvtColor(np.ascontiguousarray(rgb[y0:y1, x0:x1]), cv2.COLOR_RGB2LAB)
    a = cv2.GaussianBlur(lab[..., 1].astype(np.float32), (3, 3), 0)
    ref = float(np.median(a))
    spread = float(np.percentile(a, 97)) - ref
    if spread < 4.0:
        return None
    mask = (a > ref + max(4.0, 0.45 * spread)).astype(np.uint8)
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    ex, ey = x + 0.5 * w - x0, y + 0.8 * h - y0  # expected centre, patch coordinates
    keep = [
        i
        for i in range(1, count)
        if abs(centroids[i][0] - ex) < 0.2 * w
        and abs(centroids[i][1] - ey) < 0.1 * h
        and stats[i, cv2.CC_STAT_AREA] >= 4
    ]
    if not keep:
        return None
    big = max(stats[i, cv2.CC_STAT_AREA] for i in keep)
    keep = [i for i in keep if stats[i, cv2.CC_STAT_AREA] >= 0.08 * big]
    ys, xs = np.nonzero(np.isin(labels, keep))
    left, right = np.percentile(xs, 2), np.percentile(xs, 98)
    top, bottom = np.percentile(ys, 3), np.percentile(ys, 97)
    half = (right - left) / 2.0
    if not (0.12 * w <= half <= 0.33 * w) or bottom - top < 2:
        return None
    cx = float(left + right) / 2.0
    line = float(top + bottom) / 2.0
    # a closed mouth has a dark line between the lips: snap to it when there clearly is one
    lum = lab[..., 0].astype(np.float32)
    c0, c1 = int(cx - 0.5 * half), int(cx + 0.5 * half) + 1
    r0, r1 = int(line - 0.2 * (bottom - top)), int(line + 0.2 * (bottom - top)) + 1
    if c1 - c0 >= 2 and r1 - r0 >= 2:
        rows = lum[r0:r1, c0:c1].mean(axis=1)
        lips = float(np.median(lum[ys, xs]))
        if rows.min() < 0.85 * lips:
            line = r0 + float(np.argmin(rows))
    return cx + x0, line + y0, half


# ----- the whole preparation -----


def prepare_frames(
    source: Path,
    params: PrepareParams,
    face_box: tuple[float, float, float, float] | None = None,
    detector: FaceFinder | None = None,
) -> Prepared:
    """Run the preparation. ``face_box`` (x, y, w, h in the source's pixels) skips face detection
    (the same box on every frame: meant for stills whose face is known); ``detector`` defaults to
    ``inference.face``'s shared Haar detector."""
    frames, kind, fps, scale = read_source(source, params)
    n = len(frames)
    h, w = frames[0].shape[:2]
    if face_box is not None:
        boxes = np.tile(np.array(face_box, np.float64) * scale, (n, 1))
        detected = np.ones(n, bool)
        no_face = np.zeros(n, bool)
    else:
        raw, is_key = detect_faces(frames, detector or default_detector())
        detected = is_key & ~np.isnan(raw[:, 0])
        no_face = frames_without_face(raw, is_key)
        boxes = fill_boxes(raw)
    boxes = smooth(boxes, params.smoothing_frames)
    mouths = np.empty((n, 3), np.float64)
    found = np.zeros(n, bool)
    for i in range(n):
        m = locate_mouth(frames[i], boxes[i])
        found[i] = m is not None
        mouths[i] = m if m is not None else mouth_prior(boxes[i])
    if found.any():
        # the lips' size relative to the face hardly changes: use the typical ratio everywhere, and
        # the measured positions where the lips were found (the face box prior elsewhere)
        ratio = float(np.median(mouths[found, 2] / boxes[found, 2]))
        offsets = (mouths[found, :2] - boxes[found, :2]) / boxes[found, 2:3]
        typical = np.median(offsets, axis=0)
        for j in np.flatnonzero(~found):
            mouths[j, :2] = boxes[j, :2] + typical * boxes[j, 2]
        mouths[:, 2] = ratio * boxes[:, 2]
    mouths = smooth(mouths, params.smoothing_frames)
    frames_arr = np.stack(frames)
    mouths[:, 0] = np.clip(mouths[:, 0], 0, w - 1)
    mouths[:, 1] = np.clip(mouths[:, 1], 0, h - 1)
    return Prepared(
        frames=frames_arr,
        face=boxes.astype(np.float32),
        mouth=mouths.astype(np.float32),
        detected=detected,
        source_kind=kind,
        source_fps=fps,
        faces=FaceReport(
            frames=n,
            no_face=int(no_face.sum()),
            fallback=int((~found & ~no_face).sum()),
            method="given" if face_box is not None else "haar",
        ),
    )
