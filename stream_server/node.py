"""One serving node: wires admission, the dispatcher, engines, avatars and clips together."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time

from inference.engine import FPS
from inference.pool import EngineConfig, EnginePool, open_engine
from inference.procs.process_pool import ProcessEnginePool
from stream_server.admission.admission import Admission
from stream_server.admission.memory import MemoryAdmissionStore
from stream_server.admission.policy import AdmissionPolicy
from stream_server.auth import Authenticator
from stream_server.clips import ClipStore
from stream_server.dispatcher import Dispatcher
from stream_server.loop_lag import LoopLagMonitor
from stream_server.metrics import Metrics
from stream_server.outbox import Outbox
from stream_server.ratelimit import RateLimiter
from stream_server.session.owner import RequestOwner
from stream_server.session.serving import Serving
from stream_server.session.session import Session, SessionServices
from stream_server.settings import TIER_NAMES, Settings
from stream_server.upload_budget import UploadBudget

log = logging.getLogger(__name__)
GC_THRESHOLDS = (20_000, 50, 100)


def engine_config(settings: Settings) -> EngineConfig:
    engine = settings.engine
    return EngineConfig(
        kind=engine.kind,
        models_dir=engine.models_dir,
        device=engine.device,
        dtype=engine.dtype,
        workers=engine.workers,
        process_mode=engine.process_mode,
        max_batch=engine.max_batch,
        avatar_cache=engine.avatar_cache,
        data_dir=settings.server.data_dir,
    )


class Node:
    """Constructed on the loop without blocking; ``start`` loads the engine in a thread."""

    def __init__(self, settings: Settings, *, engine: EnginePool | ProcessEnginePool | None = None) -> None:
        settings.check()
        self.settings = settings
        self.metrics = Metrics()
        self.auth = Authenticator(settings.auth, settings.server.data_dir / "hs256.secret")
        self.admission: Admission[RequestOwner] = Admission(
            AdmissionPolicy(settings.queue), MemoryAdmissionStore(list(settings.queue.tiers), settings.engine.slots)
        )
        self.dispatcher = Dispatcher(
            self.admission, self.metrics, settings.queue.heartbeat_s, lambda: self.engine.frames_per_second()
        )
        self._engine = engine
        self.clips = ClipStore(settings.server.data_dir / "clips", settings.stream.clip_cache_bytes)
        self.start_limiter = RateLimiter(settings.limits.start_rate_per_minute, settings.limits.start_burst)
        self.upload_budget = UploadBudget(settings.limits.queued_audio_bytes, settings.queue.retry_after_s)
        self.metrics.watch_upload_budget(self.upload_budget)
        self.loop_lag = LoopLagMonitor(self.metrics.loop_lag)
        self.metrics.loop_lag_p99.set_function(lambda: self.loop_lag.percentile(0.99))
        self.ready = False
        self._measured_fps = 0.0
        self._services: SessionServices | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics.slots_total.set(settings.engine.slots)

    @property
    def engine(self) -> EnginePool | ProcessEnginePool:
        if self._engine is None:
            raise RuntimeError("the node has not started: no engine yet")
        return self._engine

    # ----- lifecycle -----

    async def start(self) -> None:
        if self._engine is None:
            self._engine = await asyncio.to_thread(open_engine, engine_config(self.settings))
        engine = self._engine
        default = await asyncio.to_thread(engine.avatars.ensure_default)
        if self.settings.engine.slots == 0:
            await self._calibrate_slots(default.id)
        loop = asyncio.get_running_loop()
        engine.on_capacity = lambda: loop.call_soon_threadsafe(self._capacity_changed)
        engine.start()
        self._services = SessionServices(
            settings=self.settings,
            auth=self.auth,
            engine=engine,
            admission=self.admission,
            dispatcher=self.dispatcher,
            serving=Serving(self.settings, engine, self.clips, self.metrics),
            start_limiter=self.start_limiter,
            upload_budget=self.upload_budget,
        )
        # Models, avatars and imports stay for the life of the process: keep them out of the
        # cyclic collector's scans, whose full passes otherwise stall the loop for tens of ms.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        self._tasks = [
            asyncio.create_task(self.dispatcher.run(), name="dispatcher"),
            asyncio.create_task(self.loop_lag.run(), name="loop-lag"),
            asyncio.create_task(self._report_workers(), name="worker-metrics"),
        ]
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._engine is not None:
            await asyncio.to_thread(self._engine.stop)

    async def _calibrate_slots(self, avatar_id: str) -> None:
        """``engine.slots = 0``: admit as many sessions as the measured render rate keeps at
        25 frames/s, with ``engine.capacity_headroom`` to spare, at most ``engine.max_slots``."""
        avatar = await asyncio.to_thread(self.engine.avatars.get, avatar_id)
        if avatar is None:
            raise RuntimeError(f"the default avatar {avatar_id!r} could not be loaded")
        fps = await asyncio.to_thread(self.engine.measure_capacity, avatar)
        self._measured_fps = fps
        slots = self._slots_for(fps)
        log.info("measured %.0f frames/s: admitting %d sessions at once", fps, slots)
        await self._set_slots(slots)

    def _slots_for(self, fps: float) -> int:
        engine = self.settings.engine
        return max(1, min(engine.max_slots, int(fps * engine.capacity_headroom / FPS)))

    async def _set_slots(self, slots: int) -> None:
        await self.admission.set_slots(slots)
        self.metrics.slots_total.set(slots)

    def _capacity_changed(self) -> None:
        """A worker process went down or came back: admit for the workers that are up (with
        ``engine.slots`` fixed, that share of it; no worker up: no new grants)."""
        engine = self.engine
        if self._measured_fps > 0:
            capacity = engine.capacity()
            slots = self._slots_for(capacity) if capacity > 0 else 0
        else:
            up = sum(1 for _, _, is_up, _ in engine.worker_stats() if is_up)
            slots = self.settings.engine.slots * up // max(1, len(engine.workers))
        log.info("worker capacity changed: admitting %d sessions at once", slots)
        self._tasks.append(asyncio.create_task(self._set_slots(slots), name="set-slots"))

    async def _report_workers(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.metrics.report_workers(self.engine.worker_stats())

    def session(self, outbox: Outbox, address: str) -> Session:
        """A session for a socket that was just accepted."""
        if self._services is None:
            raise RuntimeError("the node has not started")
        return Session(self._services, outbox, address)

    # ----- public summaries -----

    async def queue_summary(self) -> dict[str, object]:
        view = await self.admission.view(time.monotonic())
        tiers: dict[str, dict[str, object]] = {}
        for tier in TIER_NAMES:
            etas = [e for t, e in zip(view.waiting, view.eta_s, strict=True) if t.tier == tier]
            last = etas[-1] if etas else None
            tiers[tier] = {"size": len(etas), "eta_s": None if last is None else round(last, 1)}
        return {"tiers": tiers, "slots": {"total": view.slots_total, "busy": view.slots_busy}}
