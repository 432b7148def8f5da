"""Face boxes for avatar preparation: the shared Haar detector (``inference.face``) and MuseTalk's
box rule. Any callable with the ``FaceDetector`` signature can be given instead.

MuseTalk v1.5 takes the box from 68 face landmarks: x from the landmark extremes, y from the nose
(landmark 29) minus its distance to the chin, down to the chin, then 10 px more below the chin.
Without a landmark model the rule is approximated from a Haar-cascade face box ``(x, y, w, h)``
with the typical proportions of such a box: the jaw's x extremes at the box's sides, the nose
landmark at ``NOSE * h`` and the chin at ``CHIN * h`` below its top edge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from inference.face import FaceBox
from inference.face import FaceDetector as SharedFaceDetector

Box = tuple[int, int, int, int]
FaceDetector = Callable[[np.ndarray], Box | None]
"""Takes an RGB frame, returns the MuseTalk face box ``(x1, y1, x2, y2)`` or ``None``."""

NOSE = 0.53
CHIN = 1.05
EXTRA_MARGIN = 10


def box_from_detection(x: int, y: int, w: int, h: int, frame_height: int, extra_margin: int = EXTRA_MARGIN) -> Box:
    """The v1.5 box rule applied to landmark positions estimated from a detector box."""
    nose = y + NOSE * h
    chin = y + CHIN * h
    top = nose - (chin - nose)
    bottom = min(round(chin) + extra_margin, frame_height)
    return int(x), round(top), int(x + w), bottom


class HaarFaceDetector:
    """The main face found by the shared Haar detector, turned into a MuseTalk box. ``track``
    follows the face through a video, searching near the previous frame's face first."""

    def __init__(self, detector: SharedFaceDetector | None = None, *, extra_margin: int = EXTRA_MARGIN) -> None:
        self.detector = detector or SharedFaceDetector(min_neighbors=5, min_face=0.1)
        self.extra_margin = extra_margin

    def find(self, rgb: np.ndarray, near: FaceBox | None = None) -> FaceBox | None:
        """The detector's box ``(x, y, w, h)`` of the main face, or ``None``."""
        return self.detector.detect_rgb(rgb, near)

    def to_box(self, face: FaceBox, frame_height: int) -> Box:
        x, y, w, h = (round(v) for v in face)
        return box_from_detection(x, y, w, h, frame_height, self.extra_margin)

    def __call__(self, rgb: np.ndarray) -> Box | None:
        face = self.find(rgb)
        return self.to_box(face, rgb.shape[0]) if face is not None else None

    def track(self, frames: Sequence[np.ndarray]) -> list[Box | None]:
        boxes: list[Box | None] = []
        last: FaceBox | None = None
        for rgb in frames:
            face = self.find(rgb, last)
            last = face or last
            boxes.append(self.to_box(face, rgb.shape[0]) if face is not None else None)
        return boxes


def detect_boxes(frames: Sequence[np.ndarray], detector: FaceDetector) -> list[Box | None]:
    """The MuseTalk box of each frame (``None`` where no face is found)."""
    if isinstance(detector, HaarFaceDetector):
        return detector.track(frames)
    return [detector(frame) for frame in frames]


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
