"""Audio features of the lite engine: how open the mouth is and what shape, per 40 ms video frame.

This is not lip-sync AI. Each frame's 640 samples (16 kHz) give

* a loudness: the RMS level in dBFS mapped from ``floor_db`` (closed) to ``full_db`` (fully open),
  taken over the frame and the next one (the look-ahead: a mouth opens just before the sound), then
  smoothed with a fast attack and a slower release;
* a viseme cue from the spectral centroid of the frame: low (energy below ~600 Hz, as in "oo")
  gives a round mouth (``width`` -> -1), high (as in "ee" or "s") a wide one (``width`` -> +1),
  in between the open "aa" (``width`` ~ 0).

Frame ``i`` is ready once frame ``i + 1`` has arrived (or the utterance is finished), so an
utterance of ``n`` samples yields exactly ``n // 640`` frames; the samples of an incomplete last
frame are dropped at ``finish``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from inference.engine import FEATURE_SAMPLE_RATE, FEATURE_SAMPLES_PER_FRAME, AudioFeaturizer


@dataclass(frozen=True, slots=True)
class LiteFeatures:
    """What the lite renderer needs for one frame.

    ``open``: mouth openness 0 (closed, at rest) to 1 (fully open).
    ``width``: viseme shape -1 (round, "oo") .. 0 (open, "aa") .. +1 (wide, "ee").
    ``level_db``: the frame's RMS level in dBFS (for meters and debugging).
    """

    open: float
    width: float
    level_db: float

    @property
    def silent(self) -> bool:
        """The mouth is at rest: the renderer returns the untouched idle frame."""
        return self.open < REST_OPENNESS


REST_OPENNESS = 0.02


_WINDOW = np.hanning(FEATURE_SAMPLES_PER_FRAME).astype(np.float32)
_FREQS = np.fft.rfftfreq(FEATURE_SAMPLES_PER_FRAME, 1.0 / FEATURE_SAMPLE_RATE).astype(np.float32)
_BAND = (_FREQS >= 90.0) & (_FREQS <= 6000.0)


def measure(frame: np.ndarray) -> tuple[float, float]:
    """RMS level (dBFS) and spectral centroid (Hz) of one frame of samples."""
    rms = float(np.sqrt(np.mean(np.square(frame, dtype=np.float64)))) if len(frame) else 0.0
    level = float(20.0 * np.log10(max(rms, 1e-7)))
    spectrum = np.abs(np.fft.rfft(frame * _WINDOW))[_BAND]
    total = float(spectrum.sum())
    centroid = float((spectrum * _FREQS[_BAND]).sum() / total) if total > 1e-9 else 0.0
    return level, centroid


@dataclass(frozen=True)
class FeaturizerConfig:
    floor_db: float = -48.0  # at or below: mouth closed (noise gate)
    full_db: float = -16.0  # at or above: fully open
    attack: float = 0.75  # fraction of the way to a louder target covered per frame
    release: float = 0.5  # fraction of the way to a quieter target covered per frame
    lookahead_weight: float = 0.6  # how much the next frame's loudness pulls the mouth open
    round_hz: float = 550.0  # centroid at or below: fully round ("oo")
    wide_hz: float = 2300.0  # centroid at or above: fully wide ("ee", "s")
    open_hz: float = 1000.0  # centroid of the neutral open "aa"
    width_smoothing: float = 0.5  # fraction of the way to the new shape per frame


class LiteFeaturizer(AudioFeaturizer):
    """Per-stream state: the samples of the frame being filled, measured frames awaiting their
    look-ahead, and finished features waiting to be taken."""

    def __init__(self, config: FeaturizerConfig | None = None) -> None:
        self.config = config or FeaturizerConfig()
        self._partial = np.zeros(FEATURE_SAMPLES_PER_FRAME, np.float32)
        self._filled = 0
        self._measured: deque[tuple[float, float, float]] = deque()  # openness target, width, level
        self._ready: deque[LiteFeatures] = deque()
        self._open = 0.0
        self._width = 0.0

    # ----- AudioFeaturizer -----

    def push(self, pcm: np.ndarray) -> None:
        samples = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if not np.isfinite(samples).all():
            samples = np.nan_to_num(samples, nan=0.0, posinf=0.0, neginf=0.0)
        n = FEATURE_SAMPLES_PER_FRAME
        pos = 0
        while pos < len(samples):
            take = min(n - self._filled, len(samples) - pos)
            self._partial[self._filled : self._filled + take] = samples[pos : pos + take]
            self._filled += take
            pos += take
            if self._filled == n:
                self._measured.append(self._measure(self._partial))
                self._filled = 0
                self._advance(final=False)

    def finish(self) -> None:
        self._filled = 0  # an incomplete last frame is not a frame
        self._advance(final=True)
        self._open = 0.0  # the next push starts a new utterance from rest
        self._width = 0.0

    def ready(self) -> int:
        return len(self._ready)

    def take(self, count: int) -> list[LiteFeatures]:
        if count < 0 or count > len(self._ready):
            raise ValueError(f"take({count}) with {len(self._ready)} ready")
        return [self._ready.popleft() for _ in range(count)]

    def pending(self) -> int:
        return len(self._ready) + len(self._measured)

    def reset(self) -> None:
        self._filled = 0
        self._measured.clear()
        self._ready.clear()
        self._open = 0.0
        self._width = 0.0

    # ----- internals -----

    def _measure(self, frame: np.ndarray) -> tuple[float, float, float]:
        cfg = self.config
        level, centroid = measure(frame)
        loud = float(np.clip((level - cfg.floor_db) / (cfg.full_db - cfg.floor_db), 0.0, 1.0))
        loud = loud * loud * (3.0 - 2.0 * loud)  # smoothstep: soft near closed and near fully open
        if centroid <= 0.0:
            width = 0.0
        elif centroid < cfg.open_hz:
            width = -float(np.clip(np.log(cfg.open_hz / centroid) / np.log(cfg.open_hz / cfg.round_hz), 0, 1))
        else:
            width = float(np.clip(np.log(centroid / cfg.open_hz) / np.log(cfg.wide_hz / cfg.open_hz), 0, 1))
        return loud, width, level

    def _advance(self, final: bool) -> None:
        """Turn measured frames whose look-ahead is known into features."""
        cfg = self.config
        while len(self._measured) > (0 if final else 1):
            loud, width, level = self._measured.popleft()
            following = self._measured[0][0] if self._measured else 0.0
            target = max(loud, cfg.lookahead_weight * following)
            rate = cfg.attack if target > self._open else cfg.release
            self._open += rate * (target - self._open)
            if self._open < REST_OPENNESS and target < REST_OPENNESS:
                self._open = 0.0  # settled: exactly at rest
            # the shape only matters while the mouth is open; drift back to neutral otherwise
            shape_target = width if loud > 0.05 else 0.0
            self._width += cfg.width_smoothing * (shape_target - self._width)
            self._ready.append(LiteFeatures(round(self._open, 4), round(self._width, 4), round(level, 2)))
