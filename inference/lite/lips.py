"""Where the lips are in a frame, found from their colour: the line where they part and their width.

The avatar's stored mouth (``inference.lite.prepare``) is a centre and half width near the lips,
sometimes only the usual place in the face box. The rig needs more: the row where the lips part
(the dark line between closed lips, or the lower edge of the teeth in a smile) and the corners.
Both come from a redness map (Lab a*) of the lower face:

* the lips are the pixels clearly redder than the skin around them, in the connected parts near the
  expected mouth; their outer columns give the corners;
* between the upper and the lower lip, in the middle columns, rows that are not lips (teeth, or the
  dark inside of a mouth already open) mean the lips are apart: they part at the top of the lower
  lip; closed lips part at the darkest row between them.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from inference.redness import red_window

SEARCH_X = 0.4  # search window around the stored mouth, in face widths
SEARCH_UP = 0.12
SEARCH_DOWN = 0.14
MIN_SPREAD = 5.0  # a* levels between the skin and the reddest pixels: below, no lips to see
MIN_HALF, MAX_HALF = 0.08, 0.34  # plausible half width of the lips, face widths


@dataclass(frozen=True)
class Lips:
    """Lips in one frame, in its pixels: the centre column, the parting line's row (a float: a
    boundary between rows for teeth), the half width, and whether teeth show at rest."""

    centre_x: float
    line_y: float
    half_width: float
    teeth: bool


def find_lips(rgb: np.ndarray, mouth: np.ndarray, face_width: float) -> Lips | None:
    """The lips near ``mouth`` (centre x, y, half width) in an RGB frame, or ``None`` if their
    colour does not stand out from the skin."""
    cx, cy = float(mouth[0]), float(mouth[1])
    F = max(float(face_width), 8.0)
    H, W = rgb.shape[:2]
    x0, x1 = max(0, int(cx - SEARCH_X * F)), min(W, int(cx + SEARCH_X * F) + 1)
    y0, y1 = max(0, int(cy - SEARCH_UP * F)), min(H, int(cy + SEARCH_DOWN * F) + 1)
    if x1 - x0 < 8 or y1 - y0 < 6:
        return None
    window = red_window(rgb, x0, y0, x1, y1, top_percentile=98)
    if window.spread < MIN_SPREAD:
        return None
    lab = window.lab
    red = window.mask(max(MIN_SPREAD, 0.4 * window.spread))
    lips = _lip_parts(red, cx - x0, cy - y0, F)
    if lips is None:
        return None
    ys, xs = np.nonzero(lips)
    left, right = float(np.percentile(xs, 2)), float(np.percentile(xs, 98))
    top, bottom = int(np.percentile(ys, 3)), int(np.percentile(ys, 97))
    half = 0.5 * (right - left)
    if not (MIN_HALF * F <= half <= MAX_HALF * F) or bottom - top < 2:
        return None
    centre = 0.5 * (left + right)
    c0, c1 = int(centre - 0.5 * half), int(centre + 0.5 * half) + 1
    light = lab[top : bottom + 1, c0:c1, 0].astype(np.float32).mean(axis=1)
    redness = lips[top : bottom + 1, c0:c1].mean(axis=1)
    lip_light = float(np.median(lab[..., 0][lips > 0]))
    line, teeth = _parting(light, redness, lip_light)
    return Lips(centre + x0, top + line + y0, half, teeth)


def _lip_parts(red: np.ndarray, ex: float, ey: float, F: float) -> np.ndarray | None:
    """The red parts near the expected mouth centre ``(ex, ey)`` (window pixels), as a 0/1 mask."""
    joined = cv2.morphologyEx(red, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(joined, connectivity=8)
    near = [
        i
        for i in range(1, count)
        if abs(centroids[i][0] - ex) < 0.2 * F
        and abs(centroids[i][1] - ey) < 0.1 * F
        and stats[i, cv2.CC_STAT_AREA] >= 4
    ]
    if not near:
        return None
    big = max(stats[i, cv2.CC_STAT_AREA] for i in near)
    keep = [i for i in near if stats[i, cv2.CC_STAT_AREA] >= 0.1 * big]
    return (np.isin(labels, keep) & (red > 0)).astype(np.uint8)


def _parting(light: np.ndarray, redness: np.ndarray, lip_light: float) -> tuple[float, bool]:
    """The parting row within the lips' rows (``light``: mean lightness per row of the middle
    columns, ``redness``: their fraction of lip pixels) and whether teeth show above it.

    Lips already apart at rest have rows between them that are not lips (teeth, or the dark inside):
    they part at the top of the lower lip, below those rows. Closed lips part at their darkest row.
    """
    rows = len(light)
    between = redness < 0.3
    between[0] = between[-1] = False  # the outer edges are lips by construction
    runs: list[tuple[int, int]] = []
    start = -1
    for r in range(rows):
        if between[r] and start < 0:
            start = r
        elif not between[r] and start >= 0:
            runs.append((start, r - 1))
            start = -1
    if runs:
        first, last = max(runs, key=lambda run: run[1] - run[0])
        if last - first >= 1:
            teeth = bool((light[first : last + 1] > lip_light + 10.0).sum() >= 2)
            return last + 0.5, teeth
    margin = max(1, int(0.15 * rows))
    inner = light[margin : rows - margin] if rows - 2 * margin >= 1 else light
    darkest = int(np.argmin(inner)) + (margin if rows - 2 * margin >= 1 else 0)
    if light[darkest] < 0.9 * lip_light:
        return float(darkest), False
    return 0.45 * (rows - 1), False  # lips pressed together, no line: the upper lip is thinner
