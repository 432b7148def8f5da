"""One session's stream on a frame worker: audio in from the server, frames out to the transport.

Inputs (``feed``, ``end_audio``, ``interrupt``, ``cancel``) may be called from any thread. Only the
worker thread calls the ``_``-prefixed producer side. Output frames wait in a bounded buffer: the
worker never renders for a stream whose buffer is full, so a slow client cannot grow memory.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from inference.engine import (
    FEATURE_SAMPLES_PER_FRAME,
    FPS,
    OUTPUT_SAMPLES_PER_FRAME,
    AudioFeaturizer,
    Frame,
    PreparedAvatar,
)

MID_UTTERANCE_GRACE_S = 0.08


class StreamMode(enum.StrEnum):
    CLIP = "clip"
    LIVE = "live"


class StreamState(enum.Enum):
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"


class EngineStream:
    """A stream of frames for one session, produced by a ``FrameWorker``."""

    def __init__(
        self,
        avatar: PreparedAvatar,
        featurizer: AudioFeaturizer,
        mode: StreamMode,
        *,
        buffer_frames: int = 50,
        live_lead_s: float = 0.2,
        on_output: Callable[[], None] | None = None,
    ) -> None:
        self.avatar = avatar
        self.mode = mode
        self.buffer_frames = buffer_frames
        self.live_lead_s = live_lead_s
        self._featurizer = featurizer
        self._on_output = on_output or (lambda: None)
        self._lock = threading.Lock()
        self._incoming: deque[tuple[str, np.ndarray | None, np.ndarray | None]] = deque()
        self._out_audio: deque[np.ndarray] = deque()
        self._out_audio_offset = 0
        self._utterance_in = 0
        self._utterance_out = 0
        self._ended = False
        self._frames: deque[Frame] = deque()
        self._in_flight = 0
        self.state = StreamState.RUNNING
        self.error: BaseException | None = None
        self.next_index = 0
        self.speech_frames = 0
        self.started_at = time.monotonic()
        self._worker_wake: Callable[[], None] = lambda: None

    # ----- inputs, any thread -----

    def feed(self, pcm_features: np.ndarray, pcm_output: np.ndarray) -> None:
        """Add audio: the same interval at the feature rate (16 kHz) and the output rate (48 kHz)."""
        self._push(
            "audio",
            np.asarray(pcm_features, dtype=np.float32),
            np.asarray(pcm_output, dtype=np.float32),
        )

    def end_audio(self) -> None:
        """The clip's audio is complete, or (live) the utterance is complete."""
        self._push("end")

    def interrupt(self) -> None:
        """Live mode: drop audio not yet rendered and frames not yet taken; go back to idle."""
        with self._lock:
            self._frames.clear()
        self._push("interrupt")

    def _push(self, kind: str, f16: np.ndarray | None = None, f48: np.ndarray | None = None) -> None:
        with self._lock:
            if self.state is not StreamState.RUNNING:
                return
            self._incoming.append((kind, f16, f48))
        self._worker_wake()

    def cancel(self) -> None:
        with self._lock:
            if self.state is StreamState.RUNNING:
                self.state = StreamState.CANCELLED
            self._frames.clear()
        self._worker_wake()
        self._on_output()

    # ----- outputs, consumer side -----

    def take_frames(self, limit: int = 1 << 30) -> list[Frame]:
        with self._lock:
            count = min(limit, len(self._frames))
            frames = [self._frames.popleft() for _ in range(count)]
        if frames:
            self._worker_wake()
        return frames

    @property
    def buffered(self) -> int:
        return len(self._frames)

    @property
    def closed(self) -> bool:
        """No frame will come any more: finished, cancelled or failed, and the buffer is empty."""
        return self.state is not StreamState.RUNNING and not self._frames

    # ----- producer side, worker thread only -----

    def _deadline(self, index: int) -> float:
        return self.started_at + index / FPS

    def _sync_inputs(self) -> None:
        """Apply the inputs queued since the last round, in the order they were given."""
        with self._lock:
            events = list(self._incoming)
            self._incoming.clear()
        for kind, f16, f48 in events:
            if kind == "audio":
                assert f16 is not None and f48 is not None
                self._ended = False
                self._featurizer.push(f16)
                self._out_audio.append(f48)
                self._utterance_in += len(f16)
                self._utterance_out += len(f48)
            elif kind == "end":
                self._ended = True
                self._featurizer.finish()
                self._align_utterance_audio()
            else:
                self._featurizer.reset()
                self._out_audio.clear()
                self._out_audio_offset = 0
                self._utterance_in = self._utterance_out = 0

    def _align_utterance_audio(self) -> None:
        """Make the utterance's output audio exactly as long as its frames, so the next one starts
        on a frame boundary (an utterance has ``samples // FEATURE_SAMPLES_PER_FRAME`` frames)."""
        target = (self._utterance_in // FEATURE_SAMPLES_PER_FRAME) * OUTPUT_SAMPLES_PER_FRAME
        excess = self._utterance_out - target
        while excess > 0 and self._out_audio:
            tail = self._out_audio[-1]
            keep = len(tail) - excess
            if keep > 0 and (len(self._out_audio) > 1 or keep > self._out_audio_offset):
                self._out_audio[-1] = tail[:keep]
                excess = 0
            else:
                self._out_audio.pop()
                excess -= len(tail)
                if not self._out_audio:
                    self._out_audio_offset = 0
        if excess < 0:
            self._out_audio.append(np.zeros(-excess, dtype=np.float32))
        self._utterance_in = self._utterance_out = 0

    def _room(self) -> int:
        return self.buffer_frames - len(self._frames) - self._in_flight

    def _speech_ready(self, now: float) -> int:
        """Speech frames the worker may render now for this stream."""
        if self.state is not StreamState.RUNNING:
            return 0
        count = min(self._featurizer.ready(), self._room())
        if self.mode is StreamMode.LIVE:
            horizon = int((now + self.live_lead_s - self.started_at) * FPS) + 1
            count = min(count, max(0, horizon - self.next_index - self._in_flight))
        return max(0, count)

    def _idle_due(self, now: float) -> bool:
        """Live mode: no speech is ready and the next frame is due, so show the avatar at rest.
        Mid-utterance (audio received, its look-ahead not yet) the frame may be up to
        ``MID_UTTERANCE_GRACE_S`` late before a rest frame is shown, so a little jitter in the
        incoming audio does not make the mouth flicker shut."""
        if self._featurizer.pending() > 0:
            now -= MID_UTTERANCE_GRACE_S
        return (
            self.mode is StreamMode.LIVE
            and self.state is StreamState.RUNNING
            and self._in_flight == 0
            and self._featurizer.ready() == 0
            and self._room() > 0
            and now >= self._deadline(self.next_index)
        )

    def _clip_complete(self) -> bool:
        return (
            self.mode is StreamMode.CLIP
            and self._ended
            and self._in_flight == 0
            and self._featurizer.ready() == 0
        )

    def _take_features(self, count: int) -> list[tuple[int, object]]:
        """Reserve the next ``count`` frame indices with their features."""
        features = self._featurizer.take(count)
        reserved = [(self.next_index + self._in_flight + k, f) for k, f in enumerate(features)]
        self._in_flight += len(reserved)
        return reserved

    def _output_audio(self, speech: bool) -> np.ndarray:
        if not speech:
            return np.zeros(OUTPUT_SAMPLES_PER_FRAME, dtype=np.float32)
        out = np.zeros(OUTPUT_SAMPLES_PER_FRAME, dtype=np.float32)
        filled = 0
        while filled < OUTPUT_SAMPLES_PER_FRAME and self._out_audio:
            head = self._out_audio[0]
            n = min(OUTPUT_SAMPLES_PER_FRAME - filled, len(head) - self._out_audio_offset)
            out[filled : filled + n] = head[self._out_audio_offset : self._out_audio_offset + n]
            filled += n
            self._out_audio_offset += n
            if self._out_audio_offset >= len(head):
                self._out_audio.popleft()
                self._out_audio_offset = 0
        return out

    def _deliver(self, index: int, image: np.ndarray, speech: bool) -> None:
        """Hand one rendered frame to the consumer, in order."""
        frame = Frame(index=index, image=image, audio=self._output_audio(speech), speech=speech)
        with self._lock:
            if speech:
                self._in_flight -= 1
                self.speech_frames += 1
            self.next_index = index + 1
            if self.state is StreamState.RUNNING:
                self._frames.append(frame)
        self._on_output()

    def _finish(self, state: StreamState, error: BaseException | None = None) -> None:
        with self._lock:
            if self.state is StreamState.RUNNING:
                self.state = state
                self.error = error
        self._on_output()
