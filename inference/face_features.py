"""An estimate of MuseTalk's landmark face box from a Haar face box and the lips inside it: the
offline stand-in used when DWPose's weights are not there.

MuseTalk's box runs from the nose landmark mirrored over the chin down to the chin, and across the
jaw. A Haar box places the face only roughly: its top edge and its size jitter from frame to frame
by a tenth of the face, so fixed proportions of it (nose at ``PROPORTION_NOSE``, chin at
``PROPORTION_CHIN`` of its height) jitter too. The lips are found far more steadily, from their
redness (Lab a*, the reddest blob where a Haar box usually has the mouth), so:

- the box is anchored at the lip line and centred on the lips: the nose ``LIP_TO_NOSE`` face
  heights above it, ``LIP_LINE`` being where a Haar box usually has the lips (the Haar proportions,
  re-anchored at the lips);
- the chin is the lower edge of the lit chin below the lips (the first strong darkening under the
  mouth), or ``LIP_TO_CHIN`` face heights below the lips where no such edge stands out;
- its size is the Haar box's (for a video, the median over the frames: the face's size hardly
  changes while the Haar box's does), as wide as high, as before.

Where no lips are found the Haar proportions are used (``method == "proportions"``).

``bench/face_boxes.py`` measures both against MuseTalk's rule on an independent landmark detector.
OpenCV's eye cascade was tried as well (its pair of eyes to centre the box and set its scale) and
measured: it finds both eyes on few frames of the shared face video and did not bring the boxes
closer, so it is not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from inference.face import FaceBox

PROPORTION_NOSE = 0.53  # MuseTalk's nose landmark (29) in a Haar box, as a fraction of its height
PROPORTION_CHIN = 1.05  # MuseTalk's lowest landmark in a Haar box
LIP_LINE = 0.8  # where a Haar box usually has the lip line
LIP_TO_NOSE = LIP_LINE - PROPORTION_NOSE
LIP_TO_CHIN = PROPORTION_CHIN - LIP_LINE
CHIN_EDGE = 4.0  # the least darkening (grey levels over 4 rows) taken for the chin's edge

Estimate = tuple[float, float, float, float]
"""The landmark rule's box (x1, y1, x2, y2) before MuseTalk's margin below the chin."""


@dataclass(frozen=True)
class FaceFeatures:
    """What was found in one face: the Haar box, the lip line (centre x, y) and the chin's y."""

    face: FaceBox
    lips: tuple[float, float] | None
    chin: float | None = None

    @property
    def method(self) -> str:
        """``"features"`` when the lips placed the box, ``"proportions"`` when only the Haar box did."""
        return "features" if self.lips is not None else "proportions"


def find_lips(rgb: np.ndarray, face: FaceBox) -> tuple[float, float] | None:
    """The lip line (centre x, y) inside a Haar face box of an RGB frame: the middle of the reddest
    wide blob near where the box usually has the mouth; ``None`` when no such blob stands out."""
    x, y, w, h = face
    H, W = rgb.shape[:2]
    x0, x1 = max(0, int(x + 0.2 * w)), min(W, int(x + 0.8 * w))
    y0, y1 = max(0, int(y + 0.6 * h)), min(H, int(y + 1.0 * h))
    if x1 - x0 < 8 or y1 - y0 < 8:
        return None
    lab = cv2.cvtColor(np.ascontiguousarray(rgb[y0:y1, x0:x1]), cv2.COLOR_RGB2LAB)
    redness = cv2.GaussianBlur(lab[..., 1].astype(np.float32), (3, 3), 0)
    ref = float(np.median(redness))
    spread = float(np.percentile(redness, 98)) - ref
    if spread < 4.0:
        return None
    mask = (redness > ref + 0.5 * spread).astype(np.uint8)
    count, _, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    ex, ey = x + 0.5 * w - x0, y + LIP_LINE * h - y0
    candidates = [
        i
        for i in range(1, count)
        if stats[i, cv2.CC_STAT_WIDTH] >= 0.15 * w
        and abs(centroids[i][0] - ex) < 0.15 * w
        and abs(centroids[i][1] - ey) < 0.12 * h
    ]
    if not candidates:
        return None
    best = max(candidates, key=lambda i: stats[i, cv2.CC_STAT_AREA])
    line = stats[best, cv2.CC_STAT_TOP] + stats[best, cv2.CC_STAT_HEIGHT] / 2
    return float(centroids[best][0] + x0), float(line + y0)


def find_chin(rgb: np.ndarray, lips: tuple[float, float], size: float) -> float | None:
    """The chin's lower edge below the lips: the first strong darkening going down a narrow band
    under the mouth (lit skin above, the shadow under the jaw below); ``None`` when none stands out."""
    cx, line = lips
    H, W = rgb.shape[:2]
    c0, c1 = max(0, int(cx - 0.12 * size)), min(W, int(cx + 0.12 * size))
    r0, r1 = max(0, int(line + 0.1 * size)), min(H, int(line + 0.5 * size))
    if c1 - c0 < 4 or r1 - r0 < 8:
        return None
    gray = cv2.cvtColor(np.ascontiguousarray(rgb[r0:r1, c0:c1]), cv2.COLOR_RGB2GRAY).astype(np.float32)
    profile = cv2.GaussianBlur(gray, (5, 5), 0).mean(axis=1)
    change = profile[2:] - profile[:-2]  # brightness two rows down minus two rows up
    strongest = float(change.min())
    if strongest > -CHIN_EDGE:
        return None
    for i in range(1, len(change) - 1):
        if change[i] <= 0.5 * strongest and change[i] <= change[i - 1] and change[i] <= change[i + 1]:
            return float(r0 + 1 + i)
    return None


def landmark_box(features: FaceFeatures, size: float | None = None) -> Estimate:
    """MuseTalk's rule on the landmark positions estimated from what was found; ``size`` replaces
    the Haar box's height as the face's size (a video's median)."""
    x, y, w, h = features.face
    size = h if size is None else size
    if features.lips is None:
        nose, chin = y + PROPORTION_NOSE * h, y + PROPORTION_CHIN * h
        return x, max(0.0, nose - (chin - nose)), x + w, chin
    cx, line = features.lips
    nose = line - LIP_TO_NOSE * size
    chin = features.chin if features.chin is not None else line + LIP_TO_CHIN * size
    return cx - size / 2, max(0.0, nose - (chin - nose)), cx + size / 2, chin


def face_features(rgb: np.ndarray, face: FaceBox, size: float | None = None) -> FaceFeatures:
    """The lips and chin found in a Haar face box; ``size`` as in ``landmark_box``."""
    lips = find_lips(rgb, face)
    chin = find_chin(rgb, lips, face[3] if size is None else size) if lips is not None else None
    return FaceFeatures(face=face, lips=lips, chin=chin)
