"""The frame worker: one renderer, one thread, frames of many streams batched earliest deadline first.

Each round the worker applies the inputs its streams received, asks the ``FrameScheduler``
(``inference.scheduler``, pure and tested on its own in ``tests/test_scheduler.py``) for a plan
from a snapshot of every stream, and applies it: it finishes complete clips, gives live streams
with nothing to say their idle frames without touching the model, renders the planned speech
frames of all streams in one call and hands each stream its frames in order. Then it sleeps as
long as the plan allows, or until a stream wakes it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from inference.engine import (
    FEATURE_SAMPLE_RATE,
    FEATURE_SAMPLES_PER_FRAME,
    FrameRequest,
    PreparedAvatar,
    Renderer,
)
from inference.scheduler import FrameScheduler
from inference.stream import EngineStream, StreamMode, StreamState

log = logging.getLogger(__name__)


class RenderRate:
    """Frames rendered per batch over recent time: recorded by the worker thread, read by any."""

    def __init__(self, keep: int = 512) -> None:
        self._lock = threading.Lock()
        self._batches: deque[tuple[float, int]] = deque(maxlen=keep)

    def record(self, frames: int, at: float) -> None:
        with self._lock:
            self._batches.append((at, frames))

    def per_second(self, window_s: float, now: float) -> float:
        """Frames a second over the batches of the last ``window_s`` seconds."""
        with self._lock:
            recent = [(t, n) for t, n in self._batches if now - t <= window_s]
        if len(recent) < 2:
            return 0.0
        span = recent[-1][0] - recent[0][0]
        return sum(n for _, n in recent[1:]) / span if span > 0 else 0.0


class RenderSpeed:
    """Frames per second of time spent inside ``render``: how fast the worker renders when it
    works, whatever its load (what tells a slow worker from an idle one)."""

    def __init__(self, keep: int = 512) -> None:
        self._lock = threading.Lock()
        self._batches: deque[tuple[float, int, float]] = deque(maxlen=keep)

    def record(self, frames: int, seconds: float, at: float) -> None:
        with self._lock:
            self._batches.append((at, frames, seconds))

    def per_second(self, window_s: float, now: float) -> float:
        """Frames per busy second over the batches of the last ``window_s`` seconds; 0 if none."""
        with self._lock:
            recent = [(n, s) for t, n, s in self._batches if now - t <= window_s]
        busy = sum(s for _, s in recent)
        return sum(n for n, _ in recent) / busy if busy > 0 else 0.0


@dataclass(frozen=True)
class WorkerStats:
    """One worker as the node's metrics and its health check see it."""

    frames_per_second: float
    """Frames rendered per second of wall time (its load)."""
    render_speed: float
    """Frames rendered per second of time inside ``render`` (its speed; 0 until it rendered)."""
    streams: int
    queue_depth: int
    """Speech frames whose features are ready, all streams, at the last round."""
    busy_s: float
    """How long the render running now has taken (0 when none runs)."""


class FrameWorker:
    """Owns a renderer and the only thread that calls it."""

    def __init__(self, renderer: Renderer, *, max_batch: int | None = None, name: str = "worker-0"):
        self.renderer = renderer
        self.max_batch = max_batch or renderer.max_batch
        self.scheduler = FrameScheduler(self.max_batch)
        self.name = name
        self._streams: list[EngineStream] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.frames_rendered = 0
        self.batches = 0
        self._rate = RenderRate()
        self._speed = RenderSpeed()
        self._batch_sizes: list[int] = []
        self._queue_depth = 0
        self._render_started: float | None = None

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
        background: bool = False,
    ) -> EngineStream:
        """``background``: the lowest priority (see ``StreamSnapshot.background``)."""
        stream = EngineStream(
            avatar,
            self.renderer.new_featurizer(mode.value),
            mode,
            wake_worker=self._wake.set,
            buffer_frames=buffer_frames,
            on_output=on_output,
            background=background,
        )
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
        return self._rate.per_second(window_s, time.monotonic())

    def stats(self) -> WorkerStats:
        now = time.monotonic()
        with self._lock:
            streams = len(self._streams)
            started = self._render_started
        return WorkerStats(
            self.frames_per_second(), self._speed.per_second(10.0, now), streams, self._queue_depth,
            0.0 if started is None else now - started,
        )

    def take_batch_sizes(self) -> list[int]:
        """Frames per render call since the previous call (the metrics' batch-size histogram)."""
        with self._lock:
            sizes, self._batch_sizes = self._batch_sizes, []
        return sizes

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
        for stream in streams:
            stream.apply_inputs()
        snapshots = [s.snapshot() for s in streams]
        self._queue_depth = sum(s.ready for s in snapshots)
        plan = self.scheduler.schedule(snapshots, time.monotonic())
        for i in plan.finish:
            streams[i].finish()
        for i in plan.idle:
            stream = streams[i]
            index = stream.next_index
            stream.deliver([(index, stream.avatar.idle_frame(index % stream.avatar.cycle_length))], speech=False)
        if plan.render:
            self._render(streams, plan.render)
        return plan.sleep_s

    def _render(self, streams: list[EngineStream], plan: Mapping[int, int]) -> None:
        requests: list[FrameRequest] = []
        reserved: list[tuple[EngineStream, list[int]]] = []
        for key, count in plan.items():
            stream = streams[key]
            indices: list[int] = []
            for index, features in stream.take_features(count):
                requests.append(FrameRequest(stream.avatar, index % stream.avatar.cycle_length, features))
                indices.append(index)
            reserved.append((stream, indices))
        started = time.monotonic()
        with self._lock:
            self._render_started = started
        try:
            images = self.renderer.render(requests)
            if len(images) != len(requests):
                raise RuntimeError(f"the renderer returned {len(images)} images for {len(requests)} requests")
        except Exception as exc:  # an engine fault ends only the streams in this batch
            log.exception("render failed for %d frames", len(requests))
            for stream, _ in reserved:
                stream.fail(exc)
            return
        finally:
            with self._lock:
                self._render_started = None
        done = time.monotonic()
        start = 0
        for stream, indices in reserved:
            stream.deliver(list(zip(indices, images[start : start + len(indices)], strict=True)), speech=True)
            start += len(indices)
        self.frames_rendered += len(images)
        self.batches += 1
        self._rate.record(len(images), done)
        self._speed.record(len(images), done - started, done)
        with self._lock:
            if len(self._batch_sizes) < 4096:  # (handed over about once a second, to the metrics)
                self._batch_sizes.append(len(images))
