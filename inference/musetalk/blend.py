"""Putting a generated 256x256 face back into its full frame.

MuseTalk pastes the resized face into a crop 1.5x the face box and pastes that crop with the
blurred mask. Outside the face box the pasted crop equals the frame, so the same result is
``frame[box] = face * alpha + frame[box] * (1 - alpha)`` over the face box alone, with ``alpha``
precomputed per avatar frame; boxes that leave the frame are clipped.
"""

from __future__ import annotations

import cv2
import numpy as np

from inference.musetalk.face import Box


def paste_face(frame: np.ndarray, face: np.ndarray, box: Box, alpha: np.ndarray) -> np.ndarray:
    """A new frame with ``face`` (any size, RGB uint8) blended over ``box`` with ``alpha`` [h, w, 1]."""
    x1, y1, x2, y2 = box
    h, w = frame.shape[:2]
    out = frame.copy()
    sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if sx2 <= sx1 or sy2 <= sy1:
        return out
    resized = cv2.resize(face, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
    ys, xs = slice(sy1 - y1, sy2 - y1), slice(sx1 - x1, sx2 - x1)
    a = alpha[ys, xs]
    region = out[sy1:sy2, sx1:sx2].astype(np.float32)
    blended = region + (resized[ys, xs].astype(np.float32) - region) * a
    out[sy1:sy2, sx1:sx2] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    return out
