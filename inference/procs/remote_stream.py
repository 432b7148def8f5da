"""The server's side of a stream rendered in a worker process.

It offers what transports use of an ``EngineStream`` (inputs, ``state``, ``take_frames``,
``closed``) plus what the worker encoded: fMP4 segments for MSE (``wait_segments``) or H.264
packets for WebRTC (``take_packets``). The worker handle's reader thread fills it; any thread may
consume it. Raw frames (a stream opened with no encoding) arrive as slots of the stream's
``FrameRing``, copied out when taken and handed back at once."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from inference.engine import Frame, PreparedAvatar
from inference.procs.frame_ring import FrameRing
from inference.procs.messages import Credit, FramesReady, Packets, Segments, StreamEnded, StreamInput
from inference.serving_engine import EncodedFrame
from inference.stream import StreamMode, StreamState


class WorkerDied(RuntimeError):
    """The worker process rendering this stream ended unexpectedly."""


class RemoteStream:
    def __init__(
        self,
        stream_id: int,
        avatar: PreparedAvatar,
        mode: StreamMode,
        send: Callable[[object], None],
        *,
        ring: FrameRing | None,
        on_output: Callable[[], object] | None,
    ) -> None:
        self.stream_id = stream_id
        self.avatar = avatar
        self.mode = mode
        self.started_at = time.monotonic()
        self.state = StreamState.RUNNING
        self.error: BaseException | None = None
        self.ring = ring
        self._send = send
        self._on_output = on_output or (lambda: None)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._frames: deque[tuple[int, int, bool]] = deque()
        self._segments: deque[Segments] = deque()
        self._packets: deque[EncodedFrame] = deque()
        self._ended = False

    # ----- inputs, any thread -----

    def feed(self, pcm_features: np.ndarray, pcm_output: np.ndarray) -> None:
        self._input(StreamInput(
            self.stream_id, "audio",
            np.asarray(pcm_features, dtype=np.float32).tobytes(), np.asarray(pcm_output, dtype=np.float32).tobytes(),
        ))

    def end_audio(self) -> None:
        self._input(StreamInput(self.stream_id, "end"))

    def interrupt(self) -> None:
        self._drop_frames()
        self._input(StreamInput(self.stream_id, "interrupt"))

    def cancel(self) -> None:
        with self._lock:
            running = self.state is StreamState.RUNNING
            if running:
                self.state = StreamState.CANCELLED
            self._changed.notify_all()
        self._drop_frames()
        if running and not self._ended:
            self._input(StreamInput(self.stream_id, "cancel"), force=True)
        self._on_output()

    def _input(self, message: StreamInput, *, force: bool = False) -> None:
        if self.state is StreamState.RUNNING or force:
            # (a dead worker has failed the stream already: that is what its consumer sees)
            with contextlib.suppress(WorkerDied):
                self._send(message)

    # ----- outputs: frames (WebRTC) -----

    def take_frames(self, limit: int = 1 << 30) -> list[Frame]:
        with self._lock:
            taken = [self._frames.popleft() for _ in range(min(limit, len(self._frames)))]
            frames = [self._read(slot, index, speech) for slot, index, speech in taken]
            if self._ended and not self._frames:
                self._close_ring()
        for slot, _, _ in taken:
            self._credit(slot)
        return frames

    def _read(self, slot: int, index: int, speech: bool) -> Frame:
        assert self.ring is not None
        image, audio = self.ring.read(slot)
        return Frame(index=index, image=image, audio=audio, speech=speech)

    def _drop_frames(self) -> None:
        with self._lock:
            slots = [slot for slot, _, _ in self._frames] + [0] * len(self._packets)
            self._frames.clear()
            self._packets.clear()
            if self._ended:
                self._close_ring()
        for slot in slots:
            self._credit(slot)

    def _credit(self, slot: int) -> None:
        if not self._ended:
            with contextlib.suppress(WorkerDied):
                self._send(Credit(self.stream_id, slot))

    @property
    def buffered(self) -> int:
        return len(self._frames) + len(self._packets)

    @property
    def closed(self) -> bool:
        """No frame, packet or segment will come any more, and none waits."""
        return (
            self.state is not StreamState.RUNNING and not self._frames and not self._packets and not self._segments
        )

    # ----- outputs: H.264 packets (WebRTC) -----

    def take_packets(self, limit: int = 1 << 30) -> list[EncodedFrame]:
        with self._lock:
            taken = [self._packets.popleft() for _ in range(min(limit, len(self._packets)))]
        for _ in taken:
            self._credit(0)
        return taken

    def request_keyframe(self) -> None:
        """The next frame the worker encodes is an IDR frame (the ones on their way are not)."""
        self._input(StreamInput(self.stream_id, "keyframe"))

    # ----- outputs: encoded segments (MSE) -----

    def wait_segments(self) -> Segments | None:
        """The next batch of segments, blocking; ``None`` once the stream has ended (then
        ``state`` says how). Call ``ack`` after forwarding each one."""
        with self._lock:
            while not self._segments and not self._ended and self.state is StreamState.RUNNING:
                self._changed.wait()
            return self._segments.popleft() if self._segments else None

    def ack(self) -> None:
        self._credit(0)

    # ----- from the worker handle's reader thread -----

    def on_message(self, message: object) -> None:
        with self._lock:
            if isinstance(message, Segments):
                self._segments.append(message)
            elif isinstance(message, Packets):
                if self.state is StreamState.RUNNING:
                    self._packets.extend(
                        EncodedFrame(index, video, keyframe, np.frombuffer(audio, dtype=np.float32), speech)
                        for index, speech, keyframe, video, audio in message.frames
                    )
            elif isinstance(message, FramesReady):
                if self.state is StreamState.RUNNING:  # (else the worker's pump is stopping)
                    self._frames.extend(message.frames)
            elif isinstance(message, StreamEnded):
                self._ended = True
                if self.state is StreamState.RUNNING:
                    self.state = StreamState(message.state)
                    if message.error is not None:
                        self.error = RuntimeError(message.error)
                if not self._frames:
                    self._close_ring()
            self._changed.notify_all()
        self._on_output()

    def fail(self, error: BaseException) -> None:
        """The worker died: nothing more will come."""
        with self._lock:
            self._ended = True
            if self.state is StreamState.RUNNING:
                self.state = StreamState.FAILED
                self.error = error
            self._frames.clear()
            self._packets.clear()
            self._segments.clear()
            self._close_ring()
            self._changed.notify_all()
        self._on_output()

    def _close_ring(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
