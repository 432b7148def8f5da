"""One session's stream on a frame worker: audio in from the server, frames out to the transport.

Inputs (``feed``, ``end_audio``, ``interrupt``, ``cancel``) and outputs (``take_frames``,
``wait_frames``) may be called from any thread. The producer side (``apply_inputs``, ``snapshot``,
``take_features``, ``deliver``, ``finish``, ``fail``) is called by the worker thread only; what to
render when is decided by ``inference.scheduler`` from the stream's ``snapshot``. Output frames wait
in a bounded buffer: the scheduler never renders for a stream whose buffer is full, so a slow client
cannot grow memory.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from inference.engine import (
    FEATURE_SAMPLES_PER_FRAME,
    OUTPUT_SAMPLES_PER_FRAME,
    AudioFeaturizer,
    Frame,
    PreparedAvatar,
)


class StreamMode(enum.StrEnum):
    CLIP = "clip"
    LIVE = "live"


class StreamState(enum.Enum):
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"


@dataclass(frozen=True)
class StreamSnapshot:
    """What the scheduler reads of one stream: its clock, its audio and the room for its frames."""

    mode: StreamMode
    running: bool
    ended: bool
    """The audio has ended: the clip is complete, or (live) the utterance is."""
    ready: int
    """Frames whose features can be taken now."""
    pending: int
    """Frames of audio received but not yet taken, ready or not (look-ahead included)."""
    room: int
    """Frames that fit into the output buffer, counting those in flight."""
    next_index: int
    """The index of the next frame to deliver."""
    in_flight: int
    started_at: float
    live_lead_s: float


class EngineStream:
    """A stream of frames for one session, produced by a ``FrameWorker``.

    ``wake_worker`` is called whenever the worker may have something new to do: an input arrived,
    the consumer made room, the stream was cancelled."""

    def __init__(
        self,
        avatar: PreparedAvatar,
        featurizer: AudioFeaturizer,
        mode: StreamMode,
        *,
        wake_worker: Callable[[], None],
        buffer_frames: int = 50,
        live_lead_s: float = 0.2,
        on_output: Callable[[], None] | None = None,
    ) -> None:
        self.avatar = avatar
        self.mode = mode
        self.buffer_frames = buffer_frames
        self.live_lead_s = live_lead_s
        self._featurizer = featurizer
        self._wake_worker = wake_worker
        self._on_output = on_output or (lambda: None)
        self._lock = threading.Lock()
        self._output_changed = threading.Condition(self._lock)
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
        self._wake_worker()

    def cancel(self) -> None:
        with self._lock:
            if self.state is StreamState.RUNNING:
                self.state = StreamState.CANCELLED
            self._frames.clear()
            self._output_changed.notify_all()
        self._wake_worker()
        self._on_output()

    # ----- outputs, consumer side -----

    def take_frames(self, limit: int = 1 << 30) -> list[Frame]:
        """The frames buffered now, oldest first (at most ``limit``); never blocks."""
        with self._lock:
            frames = self._pop_frames(limit)
        if frames:
            self._wake_worker()
        return frames

    def wait_frames(self, limit: int = 1 << 30) -> list[Frame]:
        """Like ``take_frames``, but block the calling thread until there is a frame. Returns
        an empty list once the stream is ``closed`` (``cancel`` wakes a waiting thread)."""
        with self._lock:
            while not self._frames and self.state is StreamState.RUNNING:
                self._output_changed.wait()
            frames = self._pop_frames(limit)
        if frames:
            self._wake_worker()
        return frames

    def _pop_frames(self, limit: int) -> list[Frame]:
        return [self._frames.popleft() for _ in range(min(limit, len(self._frames)))]

    @property
    def buffered(self) -> int:
        return len(self._frames)

    @property
    def closed(self) -> bool:
        """No frame will come any more: finished, cancelled or failed, and the buffer is empty."""
        return self.state is not StreamState.RUNNING and not self._frames

    # ----- producer side, worker thread only -----

    def apply_inputs(self) -> None:
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

    def snapshot(self) -> StreamSnapshot:
        with self._lock:
            return StreamSnapshot(
                mode=self.mode,
                running=self.state is StreamState.RUNNING,
                ended=self._ended,
                ready=self._featurizer.ready(),
                pending=self._featurizer.pending(),
                room=self.buffer_frames - len(self._frames) - self._in_flight,
                next_index=self.next_index,
                in_flight=self._in_flight,
                started_at=self.started_at,
                live_lead_s=self.live_lead_s,
            )

    def take_features(self, count: int) -> list[tuple[int, Any]]:
        """Reserve the next ``count`` frame indices with their features (``count <= ready``)."""
        features = self._featurizer.take(count)
        with self._lock:
            reserved = [(self.next_index + self._in_flight + k, f) for k, f in enumerate(features)]
            self._in_flight += len(reserved)
        return reserved

    def deliver(self, rendered: Sequence[tuple[int, np.ndarray]], *, speech: bool) -> None:
        """Hand rendered frames (index, image) to the consumer, in order, waking it once. Speech
        frames must have been reserved with ``take_features``; a rest frame takes ``next_index``."""
        frames = [Frame(index=i, image=image, audio=self._output_audio(speech), speech=speech) for i, image in rendered]
        with self._lock:
            if speech:
                self._in_flight -= len(frames)
                self.speech_frames += len(frames)
            self.next_index = frames[-1].index + 1
            if self.state is StreamState.RUNNING:
                self._frames.extend(frames)
                self._output_changed.notify_all()
        self._on_output()

    def finish(self) -> None:
        """Every frame has been delivered."""
        self._end(StreamState.FINISHED, None)

    def fail(self, error: BaseException) -> None:
        self._end(StreamState.FAILED, error)

    def _end(self, state: StreamState, error: BaseException | None) -> None:
        with self._lock:
            if self.state is StreamState.RUNNING:
                self.state = state
                self.error = error
            self._output_changed.notify_all()
        self._on_output()

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
