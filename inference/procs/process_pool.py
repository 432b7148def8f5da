"""``ProcessEnginePool``: ``EnginePool``'s interface over supervised worker processes.

Each worker process owns a renderer on its device, its frame scheduler, the blending and the
encoding of its streams; this process keeps the avatar store (files and info only), the handles
and the capacity. Capacity is the sum of the measured frames/s of the workers that are up: one
that dies leaves it until it is running again (``on_capacity`` is told each change)."""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable

from inference.avatars.store import AvatarStore
from inference.engine import PreparedAvatar
from inference.pool import EngineConfig, avatar_root, choose_kind, worker_devices
from inference.procs.avatar_proxy import AvatarHandle, WorkerAvatarEngine
from inference.procs.frame_ring import FrameRing
from inference.procs.messages import EncodeOptions, OpenStream
from inference.procs.remote_stream import RemoteStream, WorkerDied
from inference.procs.worker_handle import WorkerHandle
from inference.stream import StreamMode
from inference.worker import WorkerStats

log = logging.getLogger(__name__)

RING_SLOTS = 16
CALL_TIMEOUT_S = 600.0


class ProcessEnginePool:
    encodes_in_workers = True

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        kind = choose_kind(config)
        workers = max(1, config.workers)
        devices = worker_devices(config.device, workers) if kind == "musetalk" else ["cpu"] * workers
        self.on_capacity: Callable[[], object] = lambda: None
        self.workers = [WorkerHandle(i, config, kind, d, self._capacity_changed) for i, d in enumerate(devices)]
        self._stream_ids = itertools.count(1)
        self._lock = threading.Lock()
        try:
            for worker in self.workers:
                worker.start()
        except BaseException:
            self.stop()
            raise
        ready = self.workers[0].ready
        assert ready is not None
        self.name = ready.renderer
        engine = WorkerAvatarEngine(
            ready.renderer, ready.preparation_version, ready.avatar_files, avatar_root(config),
            self._call, prepare=self._call,
        )
        self.avatars = AvatarStore(avatar_root(config), engine, cache_size=config.avatar_cache)

    def start(self) -> None:
        """The workers run from construction on (they are needed to prepare the avatars)."""

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()

    # ----- streams -----

    def open_stream(
        self,
        avatar: PreparedAvatar,
        mode: StreamMode,
        *,
        buffer_frames: int = 50,
        on_output: Callable[[], object] | None = None,
        encode: EncodeOptions | None = None,
    ) -> RemoteStream:
        """A stream on the least loaded worker that is up: encoded to fMP4 there (``encode``), or
        as frames through a shared ring. Raises ``WorkerDied`` when no worker is up."""
        if not isinstance(avatar, AvatarHandle):
            raise TypeError(f"process mode serves avatars from its own store, not {type(avatar).__name__}")
        worker = self._least_loaded()
        info = avatar.info
        ring = None if encode is not None else FrameRing.create(RING_SLOTS, info.height, info.width)
        stream_id = next(self._stream_ids)
        stream = RemoteStream(stream_id, avatar, mode, worker.send, ring=ring, on_output=on_output)
        message = OpenStream(
            stream_id, avatar.key, avatar.directory, mode.value, buffer_frames, stream.started_at, encode,
            ring.name if ring is not None else None, RING_SLOTS if ring is not None else 0,
        )
        try:
            worker.add_stream(stream, avatar.key, avatar.directory, message)
        except WorkerDied as exc:
            stream.fail(exc)
        return stream

    def _least_loaded(self) -> WorkerHandle:
        up = [w for w in self.workers if w.up]
        if not up:
            raise WorkerDied("no worker process is up")
        return min(up, key=lambda w: w.active_streams)

    def _call(self, method: str, *args: object) -> object:
        """An avatar operation on the least loaded worker (blocking: call it off the loop)."""
        return self._least_loaded().call(method, *args).result(CALL_TIMEOUT_S)

    # ----- capacity and stats -----

    def measure_capacity(self, avatar: PreparedAvatar) -> float:
        """Each worker's frames/s at full batches of ``avatar`` (measured in the worker, kept
        across its restarts); returns the sum over the workers that are up."""
        assert isinstance(avatar, AvatarHandle)
        futures = [(w, w.call("measure_capacity", avatar.key, str(avatar.directory))) for w in self.workers]
        for worker, future in futures:
            worker.capacity = float(future.result(CALL_TIMEOUT_S))  # type: ignore[arg-type]
            log.info("%s: %.0f frames/s", worker.name, worker.capacity)
        return self.capacity()

    def capacity(self) -> float:
        return sum(w.capacity for w in self.workers if w.up)

    def _capacity_changed(self) -> None:
        self.on_capacity()

    def frames_per_second(self) -> float:
        return sum(w.stats.frames_per_second for w in self.workers)

    def worker_stats(self) -> list[tuple[str, WorkerStats, bool, int]]:
        """(name, stats, up, restarts) of each worker."""
        rows = []
        for w in self.workers:
            s = w.stats
            rows.append((w.name, WorkerStats(s.frames_per_second, s.streams, s.queue_depth, w.drain_batch_sizes()),
                         w.up, w.restarts))
        return rows


