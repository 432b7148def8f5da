"""The mouth rig of a lite avatar: displacement fields around the mouth, computed once per avatar.

The mouth is opened by an inverse warp (``cv2.remap``) of a region around the mouth and chin, with
coordinates in face widths ``F`` around the lip line (``x`` right, ``y`` down, origin at the mouth
centre on the lip line, ``a`` the half width of the lips):

* below the lip line the lower lip, the chin and the jaw move down by ``D * W(x, y)`` (``D`` the
  jaw drop in pixels): ``W`` follows the lips' outline (``lip_profile``) at the parting line,
  widens smoothly past the corners through the lower lip, becomes the jaw (flat across the chin,
  fading out towards the cheeks) further down, and fades out below the chin so the neck and collar
  stay put;
* above it the upper lip rises by ``D * U(x, y)``, a fraction of the drop that fades out before
  the nose;
* the lips' corners move out (wide "ee") or in (round "oo") by ``S * V(x, y)``;
* the gap that opens between the lips samples the lip line itself (the tear); the renderer paints
  the mouth's inside over it.

Across the mouth the lips' outline is pointed at the corners (``lip_profile``), the way lips part.
The mouth centre and parting line come from the lips' colour (``inference.lite.lips``) on each
frame, as offsets from the stored mouth in face widths (the median offset where the lips do not
stand out), smoothed over time; the half width is the median over the frames. The fields depend
only on the face width and the opening's width, so frames are grouped into face-width buckets 2 %
apart and each bucket's fields are computed once per step of ``OPENINGS``; each frame then only
needs its position.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from inference.lite.lips import find_lips
from inference.lite.prepare import smooth

log = logging.getLogger(__name__)

# all lengths in face widths
JAW_DROP = 0.12  # lower lip drop at full openness
UPPER_LIFT = 0.22  # the upper lip rises this fraction of the drop
LEFT = RIGHT = 0.52  # region warped, around the mouth centre
UP = 0.24
DOWN = 0.6
CHIN = 0.26  # below the lip line, the jaw moves as one down to here...
NECK = 0.58  # ... and not at all from here
LIP_SPAN = 0.2  # from the lip line to here, the lips' outline gives way to the jaw's
LIP_BODY = 0.14  # below the gap, the lower lip's motion widens smoothly past the corners over this
JAW_FLAT = 0.18  # the jaw moves fully within this distance of the centre line...
JAW_EDGE = 0.46  # ... and not at all beyond this
NOSE = 0.13  # the upper lip's lift fades out this far above the lip line
CORNER_SPREAD = 1.3  # the corners' sideways motion fades over this many half widths past them
LENS_STRETCH = 1.08  # the opening's half width, in the lips' measured half widths
CORNER_SHARPNESS = 0.9  # lip_profile's exponent: 0.5 an ellipse, 1 a parabola
BUCKET_RATIO = 1.02
OFFSET_SMOOTHING = 1.5  # frames: sigma of the temporal smoothing of the lips' measured offsets
OUTLIER = 0.05  # a frame's lips this far (face widths) from their typical place count as not found
# the opening's width, in LENS_STRETCH half widths: a round "oo" narrows it, a wide "ee" widens it;
# the fields are built for each of these steps, so the gap the warp opens is the one painted
OPENINGS = tuple(round(0.7 + 0.035 * k, 3) for k in range(13))  # 0.7 .. 1.12


def smoothstep(t: np.ndarray) -> np.ndarray:
    c: np.ndarray = np.clip(t, 0.0, 1.0)
    out: np.ndarray = c * c * (3.0 - 2.0 * c)
    return out


def _falloff(distance: np.ndarray, inner: float, outer: float) -> np.ndarray:
    """1 up to ``inner``, a raised cosine down to 0 at ``outer``."""
    t = np.clip((distance - inner) / max(outer - inner, 1e-6), 0.0, 1.0)
    out: np.ndarray = 0.5 * (1.0 + np.cos(np.pi * t))
    return out


def lip_profile(x: np.ndarray, half: float) -> np.ndarray:
    """How far the lips part across the mouth: 1 at the centre, 0 at the corners ``+-half``,
    which it meets at an angle (parted lips are pointed at the corners, not round)."""
    t = np.clip(1.0 - (x / max(half, 1e-6)) ** 2, 0.0, 1.0)
    profile: np.ndarray = np.power(t, CORNER_SHARPNESS)
    return profile


@dataclass(frozen=True)
class Fields:
    """The rig for one face width: grids and displacement weights of the warped region."""

    face_width: float
    half_width: float  # a: the lips' half width, pixels
    opening_half: float  # half width of the gap the warp opens between the lips, pixels
    col: int  # mouth centre column within the region
    row: int  # lip line row within the region
    grid_x: np.ndarray  # float32 column of each pixel
    grid_y: np.ndarray  # float32 row of each pixel
    shift_x: np.ndarray  # V: sideways motion per pixel of corner motion S
    shift_y: np.ndarray  # U - W: vertical source offset per pixel of jaw drop D

    @property
    def shape(self) -> tuple[int, int]:
        h, w = self.grid_x.shape
        return h, w

    @classmethod
    def build(cls, face_width: float, half_ratio: float, openings: tuple[float, ...]) -> list[Fields]:
        """The fields of one face width, one for each opening width in ``openings``."""
        F = float(face_width)
        a = half_ratio * F
        col, row = math.ceil(LEFT * F), math.ceil(UP * F)
        w = col + math.ceil(RIGHT * F) + 1
        h = row + math.ceil(DOWN * F) + 1
        gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
        x = gx - col
        y = gy - row
        ax = np.abs(x)
        jaw = np.where(
            ax <= JAW_FLAT * F,
            1.0,
            0.5 * (1.0 + np.cos(np.pi * np.clip((ax - JAW_FLAT * F) / ((JAW_EDGE - JAW_FLAT) * F), 0, 1))),
        )
        blend = smoothstep((y - 0.03 * F) / ((LIP_SPAN - 0.03) * F))
        near = smoothstep(y / (LIP_BODY * F))
        fade = 1.0 - smoothstep((y - CHIN * F) / ((NECK - CHIN) * F))
        nose = 1.0 - smoothstep(-y / (NOSE * F))

        side = np.where(
            ax <= a,
            np.sin(0.5 * np.pi * ax / max(a, 1e-6)),
            0.5 * (1.0 + np.cos(np.pi * np.clip((ax - a) / (CORNER_SPREAD * a), 0, 1))),
        )
        side *= np.exp(-((y / (0.1 * F)) ** 2)) * np.sign(x)

        def frozen(arr: np.ndarray) -> np.ndarray:
            out = np.ascontiguousarray(arr, dtype=np.float32)
            out.flags.writeable = False
            return out

        grid_x, grid_y, shift_x = frozen(gx), frozen(gy), frozen(side)
        built = []
        for opening in openings:
            half = LENS_STRETCH * a * opening
            lip = lip_profile(x, half)
            body = np.maximum(lip, _falloff(ax, 0.5 * half, 1.8 * half))
            lower = lip + (body - lip) * near  # the gap's outline at the line, no shear below it
            down = np.where(y >= 0, ((1.0 - blend) * lower + blend * jaw) * fade, 0.0)
            up = np.where(y < 0, UPPER_LIFT * lip * nose, 0.0)
            built.append(cls(F, a, half, col, row, grid_x, grid_y, shift_x, frozen(up - down)))
        return built


class MouthRig:
    """Per-frame placement of the fields: which bucket and where its mouth centre falls."""

    def __init__(self, face: np.ndarray, mouth: np.ndarray, frames: np.ndarray) -> None:
        widths = np.maximum(face[:, 2].astype(np.float64), 8.0)
        centre = mouth[:, :2].astype(np.float64)
        self.half_ratio = float(np.clip(np.median(mouth[:, 2] / widths), 0.12, 0.32))
        self.teeth = False  # whether teeth show between the lips at rest
        found = [
            (k, lips)
            for k in range(len(frames))
            if (lips := find_lips(frames[k], mouth[k], float(widths[k]))) is not None
        ]
        if found:
            # each frame's own lips where they were found, the typical offset elsewhere, smoothed
            # over time like the stored mouth so the opening does not jitter
            offsets = np.empty((len(frames), 2))
            measured = np.array(
                [[lips.centre_x - mouth[k, 0], lips.line_y - mouth[k, 1]] / widths[k] for k, lips in found]
            )
            typical = np.median(measured, axis=0)
            offsets[:] = typical
            kept = np.abs(measured - typical).max(axis=1) <= OUTLIER  # a lip found far off is not
            offsets[[k for k, _ in found]] = np.where(kept[:, None], measured, typical)
            centre = centre + smooth(offsets, OFFSET_SMOOTHING) * widths[:, None]
            self.half_ratio = float(np.median([lips.half_width / widths[k] for k, lips in found]))
            self.teeth = 2 * sum(lips.teeth for _, lips in found) > len(found)
        else:
            log.info("no lips stand out by colour: the mouth opens where the face box puts it")
        buckets = np.round(np.log(widths) / math.log(BUCKET_RATIO)).astype(np.int64)
        self._fields = {
            int(b): Fields.build(BUCKET_RATIO ** float(b), self.half_ratio, OPENINGS) for b in np.unique(buckets)
        }
        self._bucket = buckets
        h, w = frames.shape[1:3]
        self._centre = np.stack([np.clip(centre[:, 0], 0, w - 1).round(), np.clip(centre[:, 1], 0, h - 1)], axis=1)
        k0 = found[0][0] if found else 0
        self.lip_brightness = lip_brightness(
            frames[k0], self._centre[k0], self.half_ratio * float(widths[k0]), float(widths[k0])
        )

    def fields(self, frame: int, opening: float = 1.0) -> tuple[Fields, int, float]:
        """The fields of stored frame ``frame`` for the step of ``OPENINGS`` nearest ``opening``, the
        frame column of their mouth centre and the row of the parting line (a float: it may lie
        between two rows)."""
        step = min(range(len(OPENINGS)), key=lambda i: abs(OPENINGS[i] - opening))
        f = self._fields[int(self._bucket[frame])][step]
        cx, line = self._centre[frame]
        return f, int(cx), float(line)


def lip_brightness(frame: np.ndarray, centre: np.ndarray, half: float, face_width: float) -> float:
    """The brightest channel of the mean colour of the redder half of the pixels around the lips:
    the mouth's inside is painted in shades of that, so it matches the picture's lighting."""
    cx, cy = (float(v) for v in centre)
    h, w = frame.shape[:2]
    x0, x1 = max(0, int(cx - 0.8 * half)), min(w, int(cx + 0.8 * half) + 1)
    y0, y1 = max(0, int(cy - 0.1 * face_width)), min(h, int(cy + 0.1 * face_width) + 1)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return 170.0
    patch = frame[y0:y1, x0:x1].reshape(-1, 3).astype(np.float32)
    redness = patch[:, 0] - 0.5 * (patch[:, 1] + patch[:, 2])
    return float(patch[redness >= np.median(redness)].mean(axis=0).max())
