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

import shutil
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inference.avatars.jobs import Progress
from inference.avatars.layout import AvatarLayout, FaceBox, replace_dir, stage_dir
from inference.face import FaceReport

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
    def face_report(self) -> FaceReport | None:
        """How faces were found over its frames (shown with its preparation job); ``None`` when
        the engine does not look for faces or the avatar was prepared before this was kept."""
        return None

    @property
    def cycle_length(self) -> int:
        """Number of positions in the avatar's loop. The loop plays the ``N = info.frames`` source
        frames forward then backward without repeating the first and last (0, 1, ..., N-1, N-2,
        ..., 1), so it is ``2N - 2`` long, and 1 for a still image."""
        return max(1, 2 * self.info.frames - 2)

    @property
    def nbytes(self) -> int:
        """Host memory the avatar holds (its arrays), what the host cache budgets."""
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))

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
    """A talking-head model. Lives on one worker thread; ``render`` may batch across sessions.

    The avatar contract: an engine prepares an avatar from a source image or video into a folder
    it is given (``prepare_avatar_dir``), loads one back (``load_avatar_dir``), stamps what it
    writes with its ``preparation_version`` (read back by ``recorded_version``), and names the
    entries that make a prepared folder complete (``avatar_files``). Where the folder is, and that
    it is swapped in atomically, is ``inference.avatars``' business, never the engine's.
    """

    name: str
    max_batch: int = 1
    avatar_root: Path | None = None
    """The store's root, for the id-based ``prepare_avatar``/``load_avatar`` (``None``: only the
    folder-based methods can be used)."""

    # ----- the avatar contract -----

    @property
    @abstractmethod
    def preparation_version(self) -> str:
        """A hash of everything that shapes prepared data (code, parameters, weights). Data
        prepared under another version is stale: it is prepared again, never served."""

    @property
    @abstractmethod
    def avatar_files(self) -> tuple[str, ...]:
        """The files and folders every complete prepared folder of this engine holds."""

    @abstractmethod
    def prepare_avatar_dir(
        self,
        directory: Path,
        avatar_id: str,
        name: str,
        source: Path | str,
        *,
        face_box: FaceBox | None = None,
        progress: Progress | None = None,
    ) -> PreparedAvatar:
        """Prepare ``source`` (slow) and write the avatar into ``directory`` (new, or an empty
        folder; the caller moves it into place). ``face_box`` (x, y, w, h in the source's pixels)
        skips face detection; ``progress(done, total)`` hears of the frames done as they are.
        Raises ``ValueError`` for a source it cannot use, with a reason a person can act on."""

    @abstractmethod
    def load_avatar_dir(self, directory: Path) -> PreparedAvatar | None:
        """The avatar in ``directory``; ``None`` if it is missing, incomplete, damaged or stale
        (``avatar_problem`` says which)."""

    @abstractmethod
    def recorded_version(self, directory: Path) -> str | None:
        """The preparation version the data in ``directory`` records; ``None`` if unreadable."""

    def avatar_problem(self, directory: Path) -> str | None:
        """Why the data in ``directory`` cannot be served as it is, in words; ``None`` when it is
        complete and current (it may still turn out damaged when loaded)."""
        missing = [f for f in self.avatar_files if not (directory / f).exists()]
        if missing:
            return f"incomplete ({', '.join(missing)} missing)"
        recorded = self.recorded_version(directory)
        if recorded != self.preparation_version:
            return f"stale (prepared by version {recorded}, this engine prepares {self.preparation_version})"
        return None

    # ----- by id, under avatar_root (the store's layout) -----

    def prepare_avatar(self, avatar_id: str, name: str, source: str | Path) -> PreparedAvatar:
        """Prepare into ``<avatar_root>/<id>/<name>``, replacing what is there atomically."""
        final = self._avatar_dir(avatar_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        stage = stage_dir(final.parent, self.name)
        try:
            avatar = self.prepare_avatar_dir(stage, avatar_id, name, source)
            replace_dir(stage, final)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        return avatar

    def load_avatar(self, avatar_id: str) -> PreparedAvatar | None:
        """The avatar in ``<avatar_root>/<id>/<name>`` (see ``load_avatar_dir``)."""
        return self.load_avatar_dir(self._avatar_dir(avatar_id))

    def _avatar_dir(self, avatar_id: str) -> Path:
        if self.avatar_root is None:
            raise RuntimeError(f"the {self.name} renderer has no avatar_root: use the folder-based methods")
        return AvatarLayout(self.avatar_root).engine_dir(avatar_id, self.name)

    # ----- frames -----

    def release_avatar(self, avatar: PreparedAvatar) -> None:
        """Free what this renderer keeps of ``avatar`` on its device (MuseTalk: the copy of its
        latents made at the first render); its worker's device cache evicted it. The default
        has nothing to free: host memory is the lite engine's device."""
        return None

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
