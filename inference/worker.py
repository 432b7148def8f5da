"""The frame worker: one renderer, one thread, frames of many streams batched earliest deadline first.

Each round the worker applies the inputs its streams received, picks up to ``max_batch`` frames by
the deadline of each stream's next frame (frame ``i`` is due at ``start + i / fps``), renders them in
one call and hands each stream its frames in order. Live streams with nothing to say get idle frames
when they fall due, without touching the model. The scheduling is ``plan_batch``, a pure function,
so it is tested without threads or a model.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from inference.engine import (
    FEATURE_SAMPLE_RATE,
    FEATURE_SAMPLES_PER_FRAME,
    FPS,
    FrameRequest,
    PreparedAvatar,
    Renderer,
)
from inference.stream import EngineStream, StreamMode, StreamState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamDemand:
    """What one stream could use this round: frames ready to render and when the next is due."""

    key: int
    ready: int
    next_deadline: float
    frame_interval: float


def plan_batch(demands: Sequence[StreamDemand], max_batch: int) -> dict[int, int]:
    """Frames to render per stream this round: earliest deadline first, frame by frame."""
    heap = [(d.next_deadline, d.key, 0, d) for d in demands if d.ready > 0]
    heapq.heapify(heap)
    plan: dict[int, int] = {}
    total = 0
    while heap and total < max_batch:
        deadline, key, taken, demand = heapq.heappop(heap)
        plan[key] = taken + 1
        total += 1
        if taken + 1 < demand.ready:
            heapq.heappush(heap, (deadline + demand.frame_interval, key, taken + 1, demand))
    return plan


class FrameWorker:
    """Owns a renderer and the only thread that calls it."""

    def __init__(self, renderer: Renderer, *, max_batch: int | None = None, name: str = "worker-0"):
        self.renderer = renderer
        self.max_batch = max_batch or renderer.max_batch
        self.name = name
        self._streams: list[EngineStream] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.frames_rendered = 0
        self.batches = 0
        self._rate_window: list[tuple[float, int]] = []

    # ----- lifecycle -----

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # ----- streams -----

    def open_stream(
        self,
        avatar: PreparedAvatar,
        mode: StreamMode,
        *,
        buffer_frames: int = 50,
        on_output: Callable[[], None] | None = None,
    ) -> EngineStream:
        featurizer = self.renderer.new_featurizer(mode.value)
        stream = EngineStream(
            avatar, featurizer, mode, buffer_frames=buffer_frames, on_output=on_output
        )
        stream._worker_wake = self._wake.set
        with self._lock:
            self._streams.append(stream)
        self._wake.set()
        return stream

    @property
    def active_streams(self) -> int:
        with self._lock:
            return len(self._streams)

    def frames_per_second(self, window_s: float = 10.0) -> float:
        """Measured render rate over the last ``window_s`` seconds of busy time."""
        now = time.monotonic()
        recent = [(t, n) for t, n in self._rate_window if now - t <= window_s]
        self._rate_window = recent
        if len(recent) < 2:
            return 0.0
        span = recent[-1][0] - recent[0][0]
        return sum(n for _, n in recent[1:]) / span if span > 0 else 0.0

    def measure_capacity(self, avatar: PreparedAvatar, batches: int = 3) -> float:
        """Frames a second this worker's renderer sustains at full batches of ``avatar``'s frames
        driven by speech-like audio. Call before ``start`` (it uses the renderer directly)."""
        featurizer = self.renderer.new_featurizer("clip")
        frames = self.max_batch * (batches + 1)
        t = np.arange(frames * FEATURE_SAMPLES_PER_FRAME, dtype=np.float32) / FEATURE_SAMPLE_RATE
        featurizer.push((0.3 * np.sin(2 * np.pi * 140 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32))
        featurizer.finish()
        features = featurizer.take(featurizer.ready())
        requests = [FrameRequest(avatar, i % avatar.cycle_length, f) for i, f in enumerate(features)]
        self.renderer.render(requests[: self.max_batch])
        start = time.perf_counter()
        timed = requests[self.max_batch :]
        for i in range(0, len(timed), self.max_batch):
            self.renderer.render(timed[i : i + self.max_batch])
        return len(timed) / max(time.perf_counter() - start, 1e-9)

    # ----- the loop -----

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                timeout = self._round()
            except Exception:  # a bug in the round itself: keep serving the other streams
                log.exception("frame worker round failed")
                timeout = 0.01
            if timeout > 0:
                self._wake.wait(timeout)

    def _round(self) -> float:
        """One scheduling round; returns how long the worker may sleep if nothing wakes it."""
        with self._lock:
            streams = [s for s in self._streams if s.state is StreamState.RUNNING]
            self._streams = streams
        now = time.monotonic()
        for stream in streams:
            stream._sync_inputs()
        for stream in streams:
            if stream._clip_complete():
                stream._finish(StreamState.FINISHED)
            elif stream._idle_due(now):
                index = stream.next_index
                stream._deliver(index, stream.avatar.idle_frame(index % stream.avatar.cycle_length), False)
        demands = [
            StreamDemand(i, s._speech_ready(now), s._deadline(s.next_index), 1.0 / FPS)
            for i, s in enumerate(streams)
        ]
        plan = plan_batch(demands, self.max_batch)
        if plan:
            self._render(streams, plan)
            return 0.0
        return self._sleep_until(streams, now)

    def _render(self, streams: list[EngineStream], plan: dict[int, int]) -> None:
        requests: list[FrameRequest] = []
        owners: list[tuple[EngineStream, int]] = []
        for key, count in plan.items():
            stream = streams[key]
            for index, features in stream._take_features(count):
                cycle = index % stream.avatar.cycle_length
                requests.append(FrameRequest(stream.avatar, cycle, features))
                owners.append((stream, index))
        try:
            images = self.renderer.render(requests)
        except Exception as exc:  # an engine fault ends only the streams in this batch
            log.exception("render failed for %d frames", len(requests))
            for stream in {id(s): s for s, _ in owners}.values():
                stream._finish(StreamState.FAILED, exc)
            return
        for (stream, index), image in zip(owners, images, strict=True):
            stream._deliver(index, image, True)
        self.frames_rendered += len(images)
        self.batches += 1
        self._rate_window.append((time.monotonic(), len(images)))
        if len(self._rate_window) > 512:
            del self._rate_window[:256]

    @staticmethod
    def _sleep_until(streams: list[EngineStream], now: float) -> float:
        live_due = [
            s._deadline(s.next_index) - now
            for s in streams
            if s.mode is StreamMode.LIVE and s.state is StreamState.RUNNING and s._room() > 0
        ]
        return max(0.001, min(live_due)) if live_due else 0.5
