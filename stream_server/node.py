"""One serving node: wires admission, the dispatcher, engines, avatars and clips together."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import time
from pathlib import Path

from inference.avatars.preparer import AvatarPreparer
from inference.engine import FPS
from inference.engines import open_engine
from inference.pool import EngineConfig
from inference.serving_engine import ServingEngine
from stream_server.admission.admission import Admission
from stream_server.admission.memory import MemoryAdmissionStore
from stream_server.admission.policy import AdmissionPolicy
from stream_server.admission.redis_store import RedisAdmissionStore
from stream_server.admission.store import AdmissionStore
from stream_server.auth import Authenticator
from stream_server.clips import ClipStore
from stream_server.cluster.grants import GrantTokens
from stream_server.cluster.membership import Membership
from stream_server.dispatcher import Dispatcher
from stream_server.loop_lag import LoopLagMonitor
from stream_server.metrics import Metrics
from stream_server.outbox import Outbox, OutboxTally
from stream_server.pregen import BackgroundPregen
from stream_server.ratelimit import RateLimiter
from stream_server.session.owner import RequestOwner
from stream_server.session.serving import Serving
from stream_server.session.session import Session, SessionServices
from stream_server.settings import TIER_NAMES, Settings
from stream_server.templates import TemplateLibrary
from stream_server.upload_budget import UploadBudget

log = logging.getLogger(__name__)
GC_THRESHOLDS = (20_000, 50, 100)
WORKER_CHECK_S = 1.0


def stream_url(public_url: str) -> str:
    """The session socket's URL under a node's public URL (http -> ws, https -> wss)."""
    base = public_url.rstrip("/")
    for http, ws in (("https://", "wss://"), ("http://", "ws://")):
        if base.startswith(http):
            base = ws + base[len(http) :]
    return base if base.endswith("/v1/stream") else base + "/v1/stream"


def admission_store(settings: Settings) -> AdmissionStore:
    """``queue.store``: this process's own line, or the line in Redis shared by every node."""
    queue, cluster = settings.queue, settings.cluster
    if queue.store == "memory":
        return MemoryAdmissionStore(list(queue.tiers), settings.engine.slots)
    import redis.asyncio as aioredis

    # A thousand sockets may join at once: they wait for one of the pool's connections (as long
    # as a step may take on a loaded node), not fail.
    pool = aioredis.BlockingConnectionPool.from_url(
        queue.redis_url, max_connections=queue.redis_max_connections, timeout=30, socket_timeout=5,
        socket_connect_timeout=5,
    )
    lease_pool = aioredis.BlockingConnectionPool.from_url(
        queue.redis_url, max_connections=2, timeout=5, socket_timeout=5, socket_connect_timeout=5
    )
    return RedisAdmissionStore(
        aioredis.Redis(connection_pool=pool),
        prefix=queue.redis_prefix,
        node_id=cluster.node_id or f"{socket.gethostname()}-{os.getpid()}",
        tiers=list(queue.tiers),
        slots=settings.engine.slots,
        resume_grace_s=queue.resume_grace_s,
        grant_ttl_s=cluster.grant_ttl_s,
        pool=cluster.pool,
        url=stream_url(settings.server.public_url),
        tier_pools=settings.pools.tiers,
        overflow=settings.pools.overflow,
        lease_client=aioredis.Redis(connection_pool=lease_pool),
        hot_window_s=settings.avatars.hot_window_s,
    )


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
        data_dir=settings.server.data_dir,
        device_cache=settings.avatars.device_cache,
        host_cache_bytes=settings.avatars.host_cache_bytes,
        disk_bytes=settings.avatars.disk_bytes,
        hot_after_uses=settings.avatars.hot_after_uses,
        hot_window_s=settings.avatars.hot_window_s,
    )


def _no_background_work() -> None:
    """``templates.pregen_top_k = 0``: nothing runs in the background to yield."""


def clip_store(settings: Settings) -> ClipStore:
    """The clip store ``stream.clip_store`` names, staging under ``<data_dir>/clips``. Clip URLs
    go to the CDN (``stream.cdn_base_url``), else to this node's ``server.public_url`` when it has
    one: a client that was redirected here fetches the clip from the node that made it."""
    stream = settings.stream
    public = settings.server.public_url.rstrip("/")
    base_url = stream.cdn_base_url or (f"{public}/v1/clips" if public else "")
    root = settings.server.data_dir / "clips"
    backend = None
    if stream.clip_store == "s3":
        from stream_server.clips.s3 import S3ClipBackend

        backend = S3ClipBackend(
            stream.s3_bucket, prefix=stream.s3_prefix, endpoint_url=stream.s3_endpoint_url, region=stream.s3_region
        )
    return ClipStore(root, stream.clip_cache_bytes, backend=backend, cdn_base_url=base_url)


class Node:
    """Constructed on the loop without blocking; ``start`` loads the engine in a thread."""

    def __init__(self, settings: Settings, *, engine: ServingEngine | None = None) -> None:
        settings.check()
        self.settings = settings
        self.metrics = Metrics()
        self.auth = Authenticator(settings.auth, settings.server.data_dir / "hs256.secret")
        store = admission_store(settings)
        # A shared line compares times taken on different machines: the wall clock.
        clock = time.time if isinstance(store, RedisAdmissionStore) else time.monotonic
        self.admission: Admission[RequestOwner] = Admission(
            AdmissionPolicy(settings.queue, settings.pools, hot_after_uses=settings.avatars.hot_after_uses),
            store,
            clock,
        )
        self.dispatcher = Dispatcher(
            self.admission,
            self.metrics,
            settings.queue.heartbeat_s,
            lambda: self.engine.frames_per_second(),
            grant_tokens=GrantTokens(self.auth.secret) if isinstance(store, RedisAdmissionStore) else None,
            grant_ttl_s=settings.cluster.grant_ttl_s,
        )
        if isinstance(store, RedisAdmissionStore):
            self.metrics.watch_redis_scripts(store.calls, lambda: store.line_copy.whole_reads)
        self.membership = (
            Membership(store, settings.cluster.lease_s, clock, self.dispatcher.changed, self._line_lost)
            if isinstance(store, RedisAdmissionStore)
            else None
        )
        self.draining = False
        self._engine = engine
        self.clips = clip_store(settings)
        self.templates = TemplateLibrary.load(Path(settings.templates.file) if settings.templates.file else None)
        self.preparer: AvatarPreparer | None = None
        self.start_limiter = RateLimiter(settings.limits.start_rate_per_minute, settings.limits.start_burst)
        self.upload_budget = UploadBudget(settings.limits.queued_audio_bytes, settings.queue.retry_after_s)
        self.metrics.watch_upload_budget(self.upload_budget)
        self.outbox_tally = OutboxTally()
        self.metrics.watch_outboxes(self.outbox_tally)
        self.loop_lag = LoopLagMonitor(self.metrics.loop_lag)
        self.metrics.loop_lag_p99.set_function(lambda: self.loop_lag.percentile(0.99))
        self.ready = False
        self._services: SessionServices | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics.slots_total.set(settings.engine.slots)
        self._full_slots = settings.engine.slots
        """The slots with every worker serving (``engine.slots``, or as measured)."""
        self._slots = settings.engine.slots
        self._serving: list[bool] | None = None

    @property
    def engine(self) -> ServingEngine:
        if self._engine is None:
            raise RuntimeError("the node has not started: no engine yet")
        return self._engine

    # ----- lifecycle -----

    async def start(self) -> None:
        if self._engine is None:
            self._engine = await asyncio.to_thread(open_engine, engine_config(self.settings))
        engine = self._engine
        self.metrics.watch_avatar_caches(engine.cache_stats)
        default = await asyncio.to_thread(engine.avatars.ensure_default)
        self.preparer = AvatarPreparer(engine.avatars, max_pending=self.settings.avatars.prepare_queue)
        if self.settings.engine.slots == 0:
            await self._calibrate_slots(default.id)
        loop = asyncio.get_running_loop()
        engine.on_capacity = lambda: loop.call_soon_threadsafe(self._check_workers)
        engine.start()
        serving = Serving(self.settings, engine, self.clips, self.metrics)
        pregen = None
        if self.settings.templates.pregen_top_k > 0:
            pregen = BackgroundPregen(
                self.settings, engine, self.clips, self.templates, self.admission, serving, self.metrics,
                self.upload_budget,
            )
        if self.membership is not None:
            await self.membership.register()
        self._services = SessionServices(
            settings=self.settings,
            auth=self.auth,
            engine=engine,
            admission=self.admission,
            dispatcher=self.dispatcher,
            serving=serving,
            start_limiter=self.start_limiter,
            templates=self.templates,
            yield_background=pregen.yield_to_users if pregen is not None else _no_background_work,
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
            asyncio.create_task(self._watch_workers(), name="workers"),
        ]
        if pregen is not None:
            self._tasks.append(asyncio.create_task(pregen.run(), name="pregen"))
        if self.membership is not None:
            self._tasks += [
                asyncio.create_task(self.membership.run_heartbeat(), name="lease"),
                asyncio.create_task(self.membership.run_changes(), name="line-changes"),
            ]
        self.ready = True

    async def _line_lost(self) -> None:
        """The shared line was lost: the sessions streaming here keep their slots; the clients
        waiting here lost their places and hear so (they may start again at once)."""
        lost = await self.admission.recover(self.admission.clock())
        for owner in lost:
            owner.lost("the shared queue restarted and lost this request's place: send start again")
        log.warning("the shared line was lost: %d waiting request(s) told to start again", len(lost))

    async def drain(self) -> None:
        """SIGTERM: not ready any more (the load balancer stops sending clients), no new slot
        reserved here; the sessions streaming here finish (``wait_drained``)."""
        self.ready = False
        self.draining = True
        self.dispatcher.granting = False
        store = self.admission.store
        if isinstance(store, RedisAdmissionStore):
            await store.drain()

    async def wait_drained(self, timeout_s: float) -> bool:
        """Wait until no session streams here, at most ``timeout_s``; False if some still do."""
        deadline = time.monotonic() + timeout_s
        while self.admission.serving_count > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.2)
        return True

    async def stop(self) -> None:
        self.ready = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.preparer is not None:
            await asyncio.to_thread(self.preparer.shutdown)
        if self._engine is not None:
            await asyncio.to_thread(self._engine.stop)
        store = self.admission.store
        if isinstance(store, RedisAdmissionStore):
            for client in (store.client, store.lease_client):
                await client.aclose()
                await client.connection_pool.disconnect()

    async def _calibrate_slots(self, avatar_id: str) -> None:
        """``engine.slots = 0``: admit as many sessions as the measured render rate keeps at
        25 frames/s, with ``engine.capacity_headroom`` to spare, at most ``engine.max_slots``."""
        avatar = await asyncio.to_thread(self.engine.avatars.get, avatar_id)
        if avatar is None:
            raise RuntimeError(f"the default avatar {avatar_id!r} could not be loaded")
        fps = await asyncio.to_thread(self.engine.measure_capacity, avatar)
        slots = self._slots_for(fps)
        log.info("measured %.0f frames/s: admitting %d sessions at once", fps, slots)
        self._full_slots = self._slots = slots
        await self.admission.set_slots(slots)
        self.metrics.slots_total.set(slots)

    def _slots_for(self, fps: float) -> int:
        engine = self.settings.engine
        return max(1, min(engine.max_slots, int(fps * engine.capacity_headroom / FPS)))

    async def _watch_workers(self) -> None:
        """Once a second: the per-worker metrics, and the capacity when a worker stalls or
        turns slow (deaths and restarts are told at once, through ``on_capacity``)."""
        while True:
            await asyncio.sleep(WORKER_CHECK_S)
            self._check_workers()

    def _check_workers(self) -> None:
        engine = self.engine
        status = engine.worker_status()
        self.metrics.report_workers(status, engine.take_batch_sizes())
        serving = [s.serving for s in status]
        if serving == self._serving:
            return
        for i, row in enumerate(status):
            if row.why_out is not None and (self._serving is None or self._serving[i]):
                log.warning("%s is out of the capacity: %s", row.name, row.why_out)
        self._serving = serving
        if self.settings.engine.slots == 0:
            slots = self._slots_for(engine.capacity())
        else:
            slots = max(1, self._full_slots * sum(serving) // len(serving))
        if slots != self._slots:
            self._slots = slots
            log.info("worker capacity changed (%d of %d serve): admitting %d sessions at once", sum(serving),
                     len(serving), slots)
            self._tasks.append(asyncio.create_task(self._set_slots(slots), name="set-slots"))

    async def _set_slots(self, slots: int) -> None:
        await self.admission.set_slots(slots)
        self.metrics.slots_total.set(slots)

    def session(self, outbox: Outbox, address: str) -> Session:
        """A session for a socket that was just accepted."""
        if self._services is None:
            raise RuntimeError("the node has not started")
        return Session(self._services, outbox, address)

    # ----- public summaries -----

    async def queue_summary(self) -> dict[str, object]:
        view = await self.admission.view(self.admission.clock())
        tiers: dict[str, dict[str, object]] = {}
        for tier in TIER_NAMES:
            etas = [e for t, e in zip(view.waiting, view.eta_s, strict=True) if t.tier == tier]
            last = etas[-1] if etas else None
            tiers[tier] = {"size": len(etas), "eta_s": None if last is None else round(last, 1)}
        slots: dict[str, object] = {"total": view.slots_total, "busy": view.slots_busy}
        if view.pools:
            slots["pools"] = {name: {"total": n, "busy": busy} for name, (n, busy) in sorted(view.pools.items())}
        return {"tiers": tiers, "slots": slots}
