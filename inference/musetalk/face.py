"""Face boxes for avatar preparation with MuseTalk v1.5's rule (``musetalk/utils/preprocessing.py``,
``get_landmark_and_bbox``, then the v1.5 scripts' margin).

From the 68 face landmarks (COCO-WholeBody points 23 to 91 of DWPose, truncated to integers):

- x1 and x2 are the landmarks' extremes;
- the nose landmark 29 is mirrored over the chin: ``y1 = nose.y - (max y - nose.y)``, at least 0;
- y2 is the lowest landmark, and v1.5 adds ``EXTRA_MARGIN`` (10 px) below it, at most the frame's
  height (MuseTalk's numpy slicing also stops x2 at the frame's width);
- when that box is degenerate (no height or width) or ``x1 < 0`` MuseTalk takes its face detector's
  box instead; here that is the offline estimate below.

Detectors (each ``find_faces(frames) -> list[FoundFace | None]``):

- ``LandmarkFaceDetector``: DWPose landmarks (``inference.dwpose``) and the rule above; a frame is
  taken to have a face when the face landmarks' mean score reaches ``min_score``;
- ``FeatureFaceDetector``: the offline fallback when DWPose's weights are absent: the shared Haar
  detector, then the box re-anchored at the lips found in it (``inference.face_features``);
- ``HaarFaceDetector``: the Haar box with fixed proportions (what the project used before; kept
  for the benchmark's before/after; the fallback uses these proportions where it finds no lips).

Any callable ``rgb -> (x1, y1, x2, y2) | None`` can be given instead (``FoundFace.method == "given"``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from inference.dwpose.pose import Keypoints
from inference.face import FaceBox
from inference.face import FaceDetector as SharedFaceDetector
from inference.face_features import PROPORTION_CHIN, PROPORTION_NOSE, face_features, landmark_box

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]
FaceDetector = Callable[[np.ndarray], Box | None]
"""Takes an RGB frame, returns the MuseTalk face box ``(x1, y1, x2, y2)`` or ``None``."""

NOSE = PROPORTION_NOSE
CHIN = PROPORTION_CHIN
EXTRA_MARGIN = 10
MIN_FACE_SCORE = 0.3  # DWPose's usual threshold for a visible keypoint

METHODS = ("landmarks", "features", "proportions", "given")
"""How a face box was found: DWPose landmarks, the offline estimate from the lips and chin, the Haar
box's fixed proportions, or a caller's detector."""


class PoseEstimator(Protocol):
    """What the landmark detector needs of DWPose (``inference.dwpose.WholeBodyPose``)."""

    def many(self, frames: list[np.ndarray]) -> list[Keypoints]: ...


@dataclass(frozen=True)
class FoundFace:
    box: Box  # MuseTalk's box, margin included
    method: str  # one of METHODS


def with_margin(box: tuple[float, float, float, float], frame_shape: tuple[int, ...], extra_margin: int) -> Box:
    """Integer box with ``extra_margin`` below the chin, inside the frame at the bottom and right."""
    x1, y1, x2, y2 = (int(v) for v in box)
    return x1, y1, min(x2, frame_shape[1]), min(y2 + extra_margin, frame_shape[0])


def box_from_landmarks(face: np.ndarray) -> tuple[int, int, int, int] | None:
    """MuseTalk's landmark box (before the margin) of ``[68, 2]`` landmarks, or ``None`` where MuseTalk
    would fall back to its face detector's box (degenerate, or ``x1 < 0``)."""
    points = np.asarray(face).astype(np.int32)
    nose_y = int(points[29, 1])
    bottom = int(points[:, 1].max())
    top = max(0, nose_y - (bottom - nose_y))
    x1, x2 = int(points[:, 0].min()), int(points[:, 0].max())
    if bottom - top <= 0 or x2 - x1 <= 0 or x1 < 0:
        return None
    return x1, top, x2, bottom


def box_from_detection(x: int, y: int, w: int, h: int, frame_height: int, extra_margin: int = EXTRA_MARGIN) -> Box:
    """The v1.5 box rule applied to landmark positions estimated from a detector box's proportions."""
    nose = y + NOSE * h
    chin = y + CHIN * h
    top = nose - (chin - nose)
    bottom = min(round(chin) + extra_margin, frame_height)
    return int(x), round(top), int(x + w), bottom


class HaarFaceDetector:
    """The main face found by the shared Haar detector, turned into a MuseTalk box with the Haar box's
    fixed proportions. ``track`` follows the face through a video, searching near the previous
    frame's face first."""

    method = "proportions"

    def __init__(self, detector: SharedFaceDetector | None = None, *, extra_margin: int = EXTRA_MARGIN) -> None:
        self.detector = detector or SharedFaceDetector(min_neighbors=5, min_face=0.1)
        self.extra_margin = extra_margin

    def find(self, rgb: np.ndarray, near: FaceBox | None = None) -> FaceBox | None:
        """The detector's box ``(x, y, w, h)`` of the main face, or ``None``."""
        return self.detector.detect_rgb(rgb, near)

    def to_box(self, face: FaceBox, frame_height: int) -> Box:
        x, y, w, h = (round(v) for v in face)
        return box_from_detection(x, y, w, h, frame_height, self.extra_margin)

    def face_box(self, rgb: np.ndarray, face: FaceBox) -> FoundFace:
        """MuseTalk's box for the Haar face ``face`` of ``rgb``."""
        return FoundFace(self.to_box(face, rgb.shape[0]), self.method)

    def __call__(self, rgb: np.ndarray) -> Box | None:
        face = self.find(rgb)
        return self.face_box(rgb, face).box if face is not None else None

    def find_faces(self, frames: Sequence[np.ndarray]) -> list[FoundFace | None]:
        found: list[FoundFace | None] = []
        last: FaceBox | None = None
        for rgb in frames:
            face = self.find(rgb, last)
            last = face or last
            found.append(self.face_box(rgb, face) if face is not None else None)
        return found

    def track(self, frames: Sequence[np.ndarray]) -> list[Box | None]:
        return [f.box if f is not None else None for f in self.find_faces(frames)]


class FeatureFaceDetector(HaarFaceDetector):
    """The offline fallback: the Haar face, then MuseTalk's rule on the landmark positions estimated
    from the lips inside it (``inference.face_features``); the Haar proportions where no lips are
    found. Through a video the face's size is the median of the Haar boxes' sizes."""

    method = "features"

    def face_box(self, rgb: np.ndarray, face: FaceBox, size: float | None = None) -> FoundFace:
        features = face_features(rgb, face, size)
        estimate = landmark_box(features, size)
        return FoundFace(with_margin(estimate, rgb.shape, self.extra_margin), features.method)

    def find_faces(self, frames: Sequence[np.ndarray]) -> list[FoundFace | None]:
        faces: list[FaceBox | None] = []
        last: FaceBox | None = None
        for rgb in frames:
            face = self.find(rgb, last)
            last = face or last
            faces.append(face)
        sizes = [f[3] for f in faces if f is not None]
        size = float(np.median(sizes)) if sizes else None
        return [self.face_box(rgb, f, size) if f is not None else None for rgb, f in zip(frames, faces, strict=True)]


class LandmarkFaceDetector:
    """MuseTalk's rule on DWPose's 68 face landmarks, DWPose run on the whole frame as in MuseTalk.
    Where the landmark box is degenerate the fallback detector's box is used, as MuseTalk uses its
    face detector's."""

    method = "landmarks"

    def __init__(
        self,
        pose: PoseEstimator,
        fallback: HaarFaceDetector | None = None,
        *,
        extra_margin: int = EXTRA_MARGIN,
        min_score: float = MIN_FACE_SCORE,
    ) -> None:
        self.pose = pose
        self.fallback = fallback or FeatureFaceDetector(extra_margin=extra_margin)
        self.extra_margin = extra_margin
        self.min_score = min_score

    def find_face(self, rgb: np.ndarray) -> FoundFace | None:
        return self.face_from(rgb, self.pose.many([rgb])[0])

    def face_from(self, rgb: np.ndarray, keypoints: Keypoints) -> FoundFace | None:
        """The face box of ``rgb`` from its keypoints (``None``: no face)."""
        if float(keypoints.face_scores.mean()) < self.min_score:
            return None
        box = box_from_landmarks(keypoints.face)
        if box is not None:
            return FoundFace(with_margin(box, rgb.shape, self.extra_margin), "landmarks")
        face = self.fallback.find(rgb)
        if face is None:
            return None
        log.info("DWPose's landmark box is degenerate on a frame: using the %s box", self.fallback.method)
        return self.fallback.face_box(rgb, face)

    def __call__(self, rgb: np.ndarray) -> Box | None:
        found = self.find_face(rgb)
        return found.box if found is not None else None

    def find_faces(self, frames: Sequence[np.ndarray]) -> list[FoundFace | None]:
        keypoints = self.pose.many(list(frames))
        return [self.face_from(rgb, k) for rgb, k in zip(frames, keypoints, strict=True)]


def find_faces(frames: Sequence[np.ndarray], detector: FaceDetector) -> list[FoundFace | None]:
    """The face of each frame (``None`` where none is found), with how its box was found."""
    finder = getattr(detector, "find_faces", None)
    if callable(finder):
        faces: list[FoundFace | None] = finder(frames)
        return faces
    found: list[FoundFace | None] = []
    for frame in frames:
        box = detector(frame)
        found.append(FoundFace((int(box[0]), int(box[1]), int(box[2]), int(box[3])), "given") if box else None)
    return found


def detect_boxes(frames: Sequence[np.ndarray], detector: FaceDetector) -> list[Box | None]:
    """The MuseTalk box of each frame (``None`` where no face is found)."""
    return [f.box if f is not None else None for f in find_faces(frames, detector)]


def fill_gaps(boxes: Sequence[Box | None], max_gap: int = 5) -> list[Box | None]:
    """Give a frame where the detector missed the box of the nearest frame with one, if that frame
    is at most ``max_gap`` away; farther misses stay ``None`` (rendered as the original frame)."""
    found = [i for i, b in enumerate(boxes) if b is not None]
    if not found:
        return list(boxes)
    anchors = np.asarray(found)
    filled: list[Box | None] = []
    for i, box in enumerate(boxes):
        if box is None:
            nearest = int(anchors[np.argmin(np.abs(anchors - i))])
            box = boxes[nearest] if abs(nearest - i) <= max_gap else None
        filled.append(box)
    return filled
