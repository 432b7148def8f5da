"""The lite renderer: opens and shapes the avatar's mouth from loudness and a viseme cue.

Per frame it copies the avatar's frame, warps a region around the mouth and chin with the
avatar's precomputed rig (``inference.lite.rig``) for the frame's openness and shape, and paints
the inside of the mouth into the gap: shaded, never one flat colour (a shadow under the upper lip,
a hint of the upper teeth, or of the lower ones when the picture's own upper teeth show, the tongue
low in the middle), with feathered edges. All work is on the small region; a frame at rest is the
untouched idle frame.

This is an honest stand-in for a lip-sync model: the mouth follows the audio's loudness and its
rough spectral shape, not the phonemes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from inference.avatars.layout import FaceBox
from inference.engine import FrameRequest, Renderer
from inference.face import FaceFinder
from inference.lite.avatar import AVATAR_FILES, LiteAvatar, info_from_meta, load_avatar, read_meta, save_avatar
from inference.lite.featurizer import REST_OPENNESS, FeaturizerConfig, LiteFeatures, LiteFeaturizer
from inference.lite.prepare import PrepareParams, prepare_frames
from inference.lite.prepare import preparation_version as version_of
from inference.lite.rig import JAW_DROP, UPPER_LIFT, Fields, lip_profile, smoothstep

log = logging.getLogger(__name__)

WIDEN = 0.12  # "ee": the corners move out by this many half widths
ROUND = 0.3  # "oo": the corners move in by this many half widths
WIDE_DROP = 0.35  # a fully wide mouth opens this much less
ROUND_DROP = 0.1  # a fully round one this much less

FEATHER = 0.02  # the opening's edges blend over this many face widths

_THROAT = np.array([0.4, 0.16, 0.16], np.float32)  # the inside of the mouth, in the lips' brightness
_TONGUE = np.array([0.78, 0.4, 0.4], np.float32)  # the tongue, in the lips' brightness
_TEETH = np.array([222.0, 214.0, 204.0], np.float32)  # upper teeth in a well lit face


class LiteRenderer(Renderer):
    """CPU renderer without weights.

    ``avatar_root`` is the store's root, for the id-based ``Renderer.prepare_avatar``/``load_avatar``.
    ``face_detector`` is anything with ``detect(gray, near=None) -> (x, y, w, h) | None`` (default:
    the ``inference.face`` detector).
    """

    name = "lite"

    def __init__(
        self,
        avatar_root: Path | str | None = None,
        *,
        max_batch: int = 8,
        params: PrepareParams | None = None,
        featurizer: FeaturizerConfig | None = None,
        face_detector: FaceFinder | None = None,
    ) -> None:
        self.avatar_root = Path(avatar_root) if avatar_root is not None else None
        self.face_detector = face_detector  # None: the shared Haar detector, loaded when needed
        self.max_batch = max_batch
        self.params = params or PrepareParams()
        self.featurizer_config = featurizer or FeaturizerConfig()
        self._version: str | None = None

    # ----- avatars -----

    @property
    def preparation_version(self) -> str:
        """The hash of this code's and these parameters' preparation; other avatars are stale."""
        if self._version is None:
            self._version = version_of(self.params)
        return self._version

    @property
    def avatar_files(self) -> tuple[str, ...]:
        return AVATAR_FILES

    def prepare_avatar_dir(
        self,
        directory: Path,
        avatar_id: str,
        name: str,
        source: Path | str,
        *,
        face_box: FaceBox | None = None,
    ) -> LiteAvatar:
        prepared = prepare_frames(Path(source), self.params, face_box=face_box, detector=self.face_detector)
        meta = save_avatar(
            Path(directory), avatar_id, name, prepared, version=self.preparation_version, params=self.params
        )
        return LiteAvatar(
            info_from_meta(meta),
            prepared.frames,
            prepared.face,
            prepared.mouth,
            version=self.preparation_version,
            meta=meta,
        )

    def load_avatar_dir(self, directory: Path) -> LiteAvatar | None:
        return load_avatar(Path(directory), self.preparation_version)

    def recorded_version(self, directory: Path) -> str | None:
        meta = read_meta(Path(directory))
        version = meta.get("version") if meta is not None else None
        return version if isinstance(version, str) else None

    def new_featurizer(self, mode: str = "live") -> LiteFeaturizer:
        """The same for "clip" and "live": features depend only on the frame and the next one."""
        return LiteFeaturizer(self.featurizer_config)

    # ----- frames -----

    def render(self, requests: Sequence[FrameRequest]) -> list[np.ndarray]:
        return [self.render_one(r.avatar, r.cycle_index, r.features) for r in requests]  # type: ignore[arg-type]

    def render_one(self, avatar: LiteAvatar, cycle_index: int, features: LiteFeatures | None) -> np.ndarray:
        """One full RGB frame (a new array) of ``avatar`` at loop position ``cycle_index``."""
        if not isinstance(avatar, LiteAvatar):
            raise TypeError(f"the lite renderer cannot draw a {type(avatar).__name__}")
        k = avatar.frame_index(cycle_index)
        frame = avatar.frames[k]
        out: np.ndarray = frame.copy()
        if features is None or not math.isfinite(features.open) or features.open < REST_OPENNESS:
            return out
        openness = min(1.0, float(features.open))
        shape = max(-1.0, min(1.0, float(features.width))) if math.isfinite(features.width) else 0.0
        corners = (WIDEN if shape > 0 else ROUND) * shape * float(smoothstep(np.asarray(openness * 4.0)))
        fields, cx, line = avatar.rig.fields(k, 1.0 + corners)
        drop = openness * JAW_DROP * fields.face_width * (1.0 - (WIDE_DROP if shape > 0 else ROUND_DROP) * abs(shape))
        reach = corners * fields.half_width
        mouth = Mouth(fields, cx, line, drop, reach)
        _draw(out, frame, mouth, avatar.rig.lip_brightness, avatar.rig.teeth)
        return out

    # the renderer holds no per-avatar or per-request state: render() may mix avatars freely


@dataclass(frozen=True)
class Mouth:
    """One frame's mouth: the rig's fields placed at column ``cx`` and parting line ``line`` (frame
    pixels), opened by ``drop`` (the lower lip's fall, pixels) with the corners moved out by
    ``reach`` (pixels; negative: in)."""

    fields: Fields
    cx: int
    line: float
    drop: float
    reach: float


def _draw(out: np.ndarray, frame: np.ndarray, m: Mouth, bright: float, teeth_at_rest: bool) -> None:
    """Warp the region around the mouth of ``frame`` into ``out`` and paint the opening."""
    f = m.fields
    H, W = frame.shape[:2]
    h, w = f.shape
    line_row = math.floor(m.line)
    x0, y0 = m.cx - f.col, line_row - f.row
    fx0, fy0, fx1, fy1 = max(0, x0), max(0, y0), min(W, x0 + w), min(H, y0 + h)
    if fx1 - fx0 < 2 or fy1 - fy0 < 2:
        return
    rows, cols = slice(fy0 - y0, fy1 - y0), slice(fx0 - x0, fx1 - x0)
    map_x = cv2.addWeighted(f.shift_x[rows, cols], -m.reach, f.grid_x[rows, cols], 1.0, float(x0))
    map_y = cv2.addWeighted(f.shift_y[rows, cols], m.drop, f.grid_y[rows, cols], 1.0, float(y0))
    split = min(max(line_row + 1 - fy0, 0), map_y.shape[0])  # rows down to the parting line
    np.minimum(map_y[:split], m.line, out=map_y[:split])  # above the line nothing comes from below
    np.maximum(map_y[split:], m.line, out=map_y[split:])  # below it the gap repeats the lip line
    region = cv2.remap(frame, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    _paint_inside(region, m, m.cx - fx0, m.line - fy0, bright, teeth_at_rest)
    out[fy0:fy1, fx0:fx1] = region


def _paint_inside(region: np.ndarray, m: Mouth, col: int, line: float, bright: float, teeth_at_rest: bool) -> None:
    """Paint the opening between the lips into ``region`` (in place; ``col`` and ``line``: the
    mouth centre and parting line in its pixels), in shades scaled to the lips' brightness: dark
    inside, a shadow under the upper lip, the tongue low in the middle and, unless teeth already
    show at rest, a hint of the upper teeth. Every edge is feathered."""
    f = m.fields
    half = f.opening_half
    lift = UPPER_LIFT * m.drop
    if half < 1.0 or m.drop < 0.3:
        return
    feather = max(0.8, FEATHER * f.face_width)
    c0 = max(0, int(col - half - 1))
    c1 = min(region.shape[1], math.ceil(col + half + 2))
    r0 = max(0, int(line - lift - feather - 1))
    r1 = min(region.shape[0], math.ceil(line + m.drop + feather + 2))
    if c1 <= c0 or r1 <= r0:
        return
    x = np.arange(c0, c1, dtype=np.float32) - col
    y = (np.arange(r0, r1, dtype=np.float32) - line)[:, None]
    profile = lip_profile(x, half)[None, :]
    top = -lift * profile
    gap = (m.drop + lift) * profile
    inside = np.clip((y - top) / feather + 0.5, 0, 1) * np.clip((top + gap - y) / feather + 0.5, 0, 1)
    inside *= np.clip(gap / feather, 0, 1)  # where the lips barely part, only a shadow
    depth = np.clip((y - top) / np.maximum(gap, 1e-3), 0, 1)  # 0 at the upper lip, 1 at the lower
    across = np.clip(np.abs(x) / half, 0, 1)[None, :]  # 0 in the middle, 1 at the corners
    opened = min(1.0, m.drop / (0.06 * f.face_width))
    colour = bright * _THROAT * (1.0 - 0.45 * across)[..., None] * np.ones_like(depth)[..., None]
    tongue = smoothstep((depth - 0.35) / 0.6) * (1.0 - across * across) * opened
    colour += (bright * _TONGUE - colour) * tongue[..., None]
    middle = 1.0 - smoothstep((across - 0.35) / 0.4)
    enamel = _TEETH * float(np.clip(bright / 200.0, 0.5, 1.1))
    if teeth_at_rest:  # the upper teeth are the picture's own: hint at the lower ones
        teeth = smoothstep((depth - 0.7) / 0.22) * middle * opened * 0.5
    else:
        teeth = (1.0 - smoothstep(depth / 0.3)) * middle * opened * 0.6
    colour += (enamel - colour) * teeth[..., None]
    colour *= (0.55 + 0.45 * smoothstep(depth / 0.12))[..., None]  # the upper lip's shadow
    alpha = inside[..., None]
    patch = region[r0:r1, c0:c1].astype(np.float32)
    patch += (colour - patch) * alpha
    region[r0:r1, c0:c1] = np.clip(patch + 0.5, 0, 255).astype(np.uint8)

