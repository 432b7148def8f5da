"""The engine interface: what every talking-head model implements and what the server drives.

An engine is split the way vLLM splits its v1 engine:

* a ``Renderer`` is the model. It prepares avatars and turns a *batch* of frame requests, possibly
  from many sessions and many avatars, into images. It knows nothing of sessions or clocks.
* an ``AudioFeaturizer`` (one per session stream, made by the renderer) turns 16 kHz mono audio
  arriving in chunks into one feature item per video frame, with the look-ahead the model needs.
* the ``FrameWorker`` (``inference.worker``) owns one renderer and a thread, gathers the frames all
  its streams need, earliest deadline first, renders them in batches and hands each stream its
  frames. Only the worker thread touches the model.

Time is one clock per stream: frame ``i`` is shown at ``i / fps`` seconds and carries exactly the
audio samples of that interval, so audio and video can never drift apart.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FPS = 25
FEATURE_SAMPLE_RATE = 16_000
OUTPUT_SAMPLE_RATE = 48_000
FEATURE_SAMPLES_PER_FRAME = FEATURE_SAMPLE_RATE // FPS
OUTPUT_SAMPLES_PER_FRAME = OUTPUT_SAMPLE_RATE // FPS


@dataclass(frozen=True)
class AvatarInfo:
    """What ``GET /v1/avatars`` lists. ``frames`` is the number of source frames (1 for a still
    image), not the length of the loop (``PreparedAvatar.cycle_length``)."""

    id: str
    name: str
    frames: int
    width: int
    height: int
    ready: bool


class PreparedAvatar(ABC):
    """An avatar after its one-time preparation; immutable and shared by all sessions using it."""

    info: AvatarInfo

    @property
    def cycle_length(self) -> int:
        """Number of positions in the avatar's loop. The loop plays the ``N = info.frames`` source
        frames forward then backward without repeating the first and last (0, 1, ..., N-1, N-2,
        ..., 1), so it is ``2N - 2`` long, and 1 for a still image."""
        return max(1, 2 * self.info.frames - 2)

    @abstractmethod
    def idle_frame(self, cycle_index: int) -> np.ndarray:
        """The full RGB frame at loop position ``cycle_index`` with the mouth at rest (HxWx3
        uint8). It may be a shared, read-only array (the avatar's own frame): copy it before
        drawing on it."""


@dataclass(frozen=True)
class FrameRequest:
    """One frame a renderer must produce: which avatar frame, driven by which audio features."""

    avatar: PreparedAvatar
    cycle_index: int
    features: Any


class AudioFeaturizer(ABC):
    """Per-stream audio to per-frame features. Called only from the worker thread."""

    @abstractmethod
    def push(self, pcm: np.ndarray) -> None:
        """Append float32 mono samples at ``FEATURE_SAMPLE_RATE``."""

    @abstractmethod
    def finish(self) -> None:
        """No more audio for this utterance: pad the tail so every frame becomes ready."""

    @abstractmethod
    def ready(self) -> int:
        """How many frames' features can be taken now."""

    @abstractmethod
    def take(self, count: int) -> list[Any]:
        """Remove and return the features of the next ``count`` frames (``count <= ready()``)."""

    @abstractmethod
    def pending(self) -> int:
        """Frames of audio received but not yet taken, ready or not (look-ahead included)."""

    @abstractmethod
    def reset(self) -> None:
        """Drop all audio not yet taken (interrupt)."""


class Renderer(ABC):
    """A talking-head model. Lives on one worker thread; ``render`` may batch across sessions."""

    name: str
    max_batch: int = 1

    @abstractmethod
    def prepare_avatar(self, avatar_id: str, name: str, source: str) -> PreparedAvatar:
        """Prepare an avatar from an image or video file (slow; done once and cached)."""

    @abstractmethod
    def load_avatar(self, avatar_id: str) -> PreparedAvatar | None:
        """Load an avatar prepared earlier, or ``None`` if there is none."""

    @abstractmethod
    def new_featurizer(self, mode: str = "live") -> AudioFeaturizer:
        """Audio feature state for one stream; ``mode`` is "clip" (whole utterances, exact
        features) or "live" (chunks, bounded look-ahead)."""

    @abstractmethod
    def render(self, requests: Sequence[FrameRequest]) -> list[np.ndarray]:
        """Render full RGB frames (HxWx3 uint8), one per request, in order. A frame that shows the
        avatar unchanged may be its shared, read-only idle frame."""


@dataclass
class Frame:
    """A frame leaving the engine: its place on the stream clock, its image and its audio."""

    index: int
    image: np.ndarray
    audio: np.ndarray
    speech: bool = True
    meta: dict[str, float] = field(default_factory=dict)

    @property
    def pts_seconds(self) -> float:
        return self.index / FPS
