"""``ProcessEnginePool``: the ``ServingEngine`` over supervised worker processes.

Each worker process owns a renderer on its device, its frame scheduler, the blending and the
encoding of its streams (fMP4 for MSE, H.264 packets for WebRTC). This process keeps the avatar
store (files, info and jobs; the host cache holds handles, not frames), the hot-avatar counts, a
copy of each worker's device cache (it decides what a worker holds: a new stream goes to one
that holds its avatar, as in thread mode, and what it evicts the worker is told to free), the
handles and the capacity. Capacity is the sum of the measured frames/s of the workers that
serve: one that dies, stalls or turns slow leaves it until it serves again
(``inference.worker_health``)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from inference.avatars.cache import CacheStats, DeviceAvatarCache
from inference.avatars.hot import HotAvatars
from inference.avatars.jobs import Progress
from inference.avatars.store import AvatarStore
from inference.engine import PreparedAvatar
from inference.pool import EngineConfig, avatar_root, choose_kind, choose_worker, renderer_devices
from inference.procs.avatar_proxy import AvatarHandle, WorkerAvatarEngine
from inference.procs.frame_ring import FrameRing
from inference.procs.messages import OpenStream, Release
from inference.procs.remote_stream import RemoteStream, WorkerDied
from inference.procs.worker_handle import WorkerHandle
from inference.serving_engine import EncodeOptions, PacketOptions
from inference.stream import StreamMode
from inference.worker_health import WorkerStatus, judge

log = logging.getLogger(__name__)

RING_PREFIX = "mts_ring"
"""Rings are ``/dev/shm/mts_ring_<server pid>_<stream>``: whose they are is in the name."""
RING_SLOTS = 16
"""Frames of one raw stream in shared memory at once (the worker waits for a free slot)."""
CALL_TIMEOUT_S = 600.0


class ProcessEnginePool:
    encodes_in_workers = True

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        kind = choose_kind(config)
        devices = renderer_devices(config, kind)
        self.on_capacity: Callable[[], object] = lambda: None
        self.hot = HotAvatars(config.hot_after_uses, config.hot_window_s)
        self.held = [DeviceAvatarCache(config.device_cache, self.hot.is_hot) for _ in devices]
        """The avatars each worker holds on its device (this process decides), index by index."""
        self.workers = [
            WorkerHandle(i, config, kind, d, self._capacity_changed, preload=lambda i=i: self._held_by(i))  # type: ignore[misc]
            for i, d in enumerate(devices)
        ]
        self._capacities = [0.0] * len(devices)
        self._stream_ids = itertools.count(1)
        try:
            with ThreadPoolExecutor(len(self.workers)) as starting:  # (each waits for its models)
                for started in [starting.submit(w.start) for w in self.workers]:
                    started.result()
        except BaseException:
            self.stop()
            raise
        ready = self.workers[0].ready
        assert ready is not None
        self.name = ready.renderer
        self.version = ready.preparation_version
        engine = WorkerAvatarEngine(
            ready.renderer, ready.preparation_version, ready.avatar_files, avatar_root(config), self._call
        )
        self.avatars = AvatarStore(
            avatar_root(config),
            engine,
            host_cache_bytes=config.host_cache_bytes,
            disk_bytes=config.disk_bytes,
            is_hot=self.hot.is_hot,
        )

    def start(self) -> None:
        """The workers run from construction on (they prepare and load the avatars)."""

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
        on_output: Callable[[], None] | None = None,
        background: bool = False,
        encode: EncodeOptions | PacketOptions | None = None,
    ) -> RemoteStream:
        """A stream on a worker that serves: encoded there (``encode``: fMP4 segments or H.264
        packets come back), or with ``None`` as raw frames through a shared ring (for consumers
        that want pixels, such as ``bench/gpu_throughput.py``). With no worker up the stream has
        failed already (``WorkerDied``)."""
        if not isinstance(avatar, AvatarHandle):
            raise TypeError(f"process mode serves avatars from its own store, not {type(avatar).__name__}")
        try:
            worker: WorkerHandle | None = self.workers[self._choose(avatar)]
        except WorkerDied as exc:
            worker, down = None, exc
        info = avatar.info
        stream_id = next(self._stream_ids)
        ring = None
        if encode is None and worker is not None:
            ring = FrameRing.create(RING_SLOTS, info.height, info.width, f"{RING_PREFIX}_{os.getpid()}_{stream_id}")
        stream = RemoteStream(
            stream_id, avatar, mode, worker.send if worker is not None else _nowhere, ring=ring, on_output=on_output
        )
        if worker is None:
            stream.fail(down)
            return stream
        message = OpenStream(
            stream_id, avatar.key, avatar.directory, mode.value, buffer_frames, stream.started_at, encode, background,
            ring.name if ring is not None else None, RING_SLOTS if ring is not None else 0,
        )
        try:
            worker.add_stream(stream, message)
        except WorkerDied as exc:
            stream.fail(exc)
        return stream

    def _choose(self, avatar: AvatarHandle) -> int:
        """The worker for a stream of ``avatar`` (``choose_worker`` over those that serve); it
        holds the avatar from now on."""
        status = self.worker_status()
        candidates = [i for i, s in enumerate(status) if s.serving] or [i for i, s in enumerate(status) if s.up]
        if not candidates:
            raise WorkerDied("no worker process is up")
        loads = [self.workers[i].active_streams for i in candidates]
        holds = [self.held[i].peek(avatar.info.id) is avatar for i in candidates]
        index = candidates[choose_worker(loads, holds)]
        self._hold(index, avatar)
        return index

    def _hold(self, index: int, avatar: AvatarHandle) -> None:
        """Count a device hit or miss; a miss takes the avatar in, and the worker is told to free
        what that evicted (and an older preparation of the same avatar)."""
        held = self.held[index]
        current = held.get(avatar.info.id)
        if current is avatar:
            return
        released = ([current] if current is not None else []) + held.put(avatar.info.id, avatar)
        keys = tuple(a.key for a in released if isinstance(a, AvatarHandle))
        if keys:
            self.workers[index].send(Release(keys))

    def _held_by(self, index: int) -> tuple[tuple[str, Path], ...]:
        handles = [self.held[index].peek(i) for i in self.held[index].ids()]
        return tuple((h.key, h.directory) for h in handles if isinstance(h, AvatarHandle))

    def holders(self, avatar_id: str) -> list[int]:
        return [i for i, held in enumerate(self.held) if avatar_id in held]

    def forget(self, avatar_id: str) -> None:
        """The avatar was deleted or replaced: out of every worker's device cache."""
        for worker, held in zip(self.workers, self.held, strict=True):
            avatar = held.discard(avatar_id)
            if isinstance(avatar, AvatarHandle):
                try:
                    worker.send(Release((avatar.key,)))
                except WorkerDied:  # (a worker started again holds only what it is told)
                    log.info("%s is down: it holds %s no more", worker.name, avatar_id)

    def cache_stats(self) -> dict[str, CacheStats]:
        device = CacheStats()
        for held in self.held:
            device.hits += held.stats.hits
            device.misses += held.stats.misses
            device.evictions += held.stats.evictions
        return {"device": device, "host": self.avatars.host_stats, "disk": self.avatars.disk_stats}

    def _call(self, method: str, args: tuple[object, ...], progress: Progress | None) -> object:
        """An avatar operation on the least loaded worker that serves (blocking: off the loop)."""
        status = self.worker_status()
        up = [i for i, s in enumerate(status) if s.serving] or [i for i, s in enumerate(status) if s.up]
        if not up:
            raise WorkerDied("no worker process is up")
        worker = self.workers[min(up, key=lambda i: self.workers[i].active_streams)]
        return worker.call(method, args, progress).result(CALL_TIMEOUT_S)

    # ----- capacity and stats -----

    def measure_capacity(self, avatar: PreparedAvatar) -> float:
        """Each worker's frames/s at full batches of ``avatar``, measured in the worker (and kept
        across its restarts); returns the sum."""
        assert isinstance(avatar, AvatarHandle)
        for index in range(len(self.workers)):
            self._hold(index, avatar)
        futures = [w.call("measure_capacity", (avatar.key, avatar.directory)) for w in self.workers]
        for index, (worker, future) in enumerate(zip(self.workers, futures, strict=True)):
            self._capacities[index] = float(future.result(CALL_TIMEOUT_S))  # type: ignore[arg-type]
            log.info("%s: %.0f frames/s", worker.name, self._capacities[index])
        return sum(self._capacities)

    def capacity(self) -> float:
        return sum(c for c, s in zip(self._capacities, self.worker_status(), strict=True) if s.serving)

    def _capacity_changed(self) -> None:
        self.on_capacity()

    def frames_per_second(self) -> float:
        return sum(w.stats.frames_per_second for w in self.workers)

    def worker_status(self) -> list[WorkerStatus]:
        now = time.monotonic()
        up = [w.up for w in self.workers]
        # streams: this process's own count of the streams placed on each worker (exact now; the
        # worker's own report lags by up to a second)
        stats = [dataclasses.replace(w.stats, streams=w.active_streams) for w in self.workers]
        silent = [now - w.last_heard if w.up else 0.0 for w in self.workers]
        reasons = judge(up, stats, silent)
        return [
            WorkerStatus(w.name, s, is_up, w.restarts, why is None, why)
            for w, s, is_up, why in zip(self.workers, stats, up, reasons, strict=True)
        ]

    def take_batch_sizes(self) -> list[list[int]]:
        return [w.drain_batch_sizes() for w in self.workers]


def _nowhere(message: object) -> None:
    raise WorkerDied("the stream is on no worker")
