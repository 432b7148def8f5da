"""Lip colour: how red each pixel of a window of a frame is against the skin around it.

Lips are redder than skin in Lab's a* channel on every face the engines were tried on; the face-box
estimate (``face_features``), the lite preparation and the lite rig all find lips from this map,
each with its own window and threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class RedWindow:
    """A window of an RGB frame in Lab, with its blurred a* ("redness") and how far the reddest
    pixels stand above the skin (the median)."""

    x0: int
    y0: int
    lab: np.ndarray
    redness: np.ndarray
    skin: float
    spread: float

    def mask(self, above_skin: float) -> np.ndarray:
        """1 where the redness is more than ``above_skin`` over the skin, else 0 (uint8)."""
        red: np.ndarray = (self.redness > self.skin + above_skin).astype(np.uint8)
        return red


def red_window(rgb: np.ndarray, x0: int, y0: int, x1: int, y1: int, *, top_percentile: float) -> RedWindow:
    """The window ``[y0:y1, x0:x1]`` of ``rgb`` (already clipped to the frame); ``spread`` is the
    ``top_percentile`` redness minus the median."""
    lab = cv2.cvtColor(np.ascontiguousarray(rgb[y0:y1, x0:x1]), cv2.COLOR_RGB2LAB)
    redness = cv2.GaussianBlur(lab[..., 1].astype(np.float32), (3, 3), 0)
    skin = float(np.median(redness))
    spread = float(np.percentile(redness, top_percentile)) - skin
    return RedWindow(x0, y0, lab, redness, skin, spread)
