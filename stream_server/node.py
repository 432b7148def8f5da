"""One serving node: admission, the grant loop, the position fan-out, engines, avatars and clips.

Sessions register their tickets here. The dispatcher grants slots whenever something changes;
the notifier recomputes the line once per change (batched) and hands every waiting session its
new status through its outbox, which coalesces and never blocks the notifier.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from typing import TYPE_CHECKING

from inference.engine import FPS
from inference.pool import EngineConfig, EnginePool
from stream_server.admission.backend import AdmissionQueue, Grant, QueueView
from stream_server.admission.memory import MemoryAdmissionQueue
from stream_server.auth import Authenticator
from stream_server.clips import ClipStore
from stream_server.loop_lag import LoopLagMonitor
from stream_server.metrics import Metrics
from stream_server.protocol import encode
from stream_server.ratelimit import RateLimiter
from stream_server.settings import TIER_NAMES, Settings
from stream_server.upload_budget import UploadBudget

if TYPE_CHECKING:
    from stream_server.session import Session

log = logging.getLogger(__name__)
HEARTBEAT_PHASES = 10
GC_THRESHOLDS = (20_000, 50, 100)


class Node:
    def __init__(self, settings: Settings, *, engine: EnginePool | None = None) -> None:
        settings.check()
        self.settings = settings
        self.metrics = Metrics()
        self.auth = Authenticator(settings.auth, settings.server.data_dir / "hs256.secret")
        self.admission: AdmissionQueue = MemoryAdmissionQueue(settings.queue, settings.engine.slots)
        data = settings.server.data_dir
        self.engine = engine or EnginePool(
            EngineConfig(
                kind=settings.engine.kind,
                models_dir=settings.engine.models_dir,
                device=settings.engine.device,
                dtype=settings.engine.dtype,
                workers=settings.engine.workers,
                max_batch=settings.engine.max_batch,
                avatar_cache=settings.engine.avatar_cache,
                data_dir=data,
            )
        )
        self.clips = ClipStore(data / "clips", settings.stream.clip_cache_bytes)
        self.upload_budget = UploadBudget(settings.limits.queued_audio_bytes, settings.queue.retry_after_s)
        self.metrics.watch_upload_budget(self.upload_budget)
        self.start_limiter = RateLimiter(settings.limits.start_rate_per_minute, settings.limits.start_burst)
        self.loop_lag = LoopLagMonitor(self.metrics.loop_lag)
        self.metrics.loop_lag_p99.set_function(lambda: self.loop_lag.percentile(0.99))
        self.waiting_sessions: dict[str, Session] = {}
        self.granted_sessions: dict[str, Session] = {}
        self.parked: dict[str, tuple[Session, float]] = {}
        self.ready = False
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_view: QueueView | None = None
        self.metrics.slots_total.set(settings.engine.slots)

    # ----- lifecycle -----

    async def start(self) -> None:
        default = await asyncio.to_thread(self.engine.avatars.ensure_default)
        if self.settings.engine.slots == 0:
            await self._calibrate_slots(default.id)
        self.engine.start()
        # Models, avatars and imports stay for the life of the process: keep them out of the
        # cyclic collector's scans, whose full passes otherwise stall the loop for tens of ms.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        self._tasks = [
            asyncio.create_task(self._dispatch_loop(), name="dispatcher"),
            asyncio.create_task(self.loop_lag.run(), name="loop-lag"),
        ]
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(self.engine.stop)

    async def _calibrate_slots(self, avatar_id: str) -> None:
        """``engine.slots = 0``: admit as many sessions as the measured render rate keeps at
        25 frames/s, with ``engine.capacity_headroom`` to spare, at most ``engine.max_slots``."""
        avatar = await asyncio.to_thread(self.engine.avatars.get, avatar_id)
        if avatar is None:
            raise RuntimeError(f"the default avatar {avatar_id!r} could not be loaded")
        fps = await asyncio.to_thread(self.engine.measure_capacity, avatar)
        engine = self.settings.engine
        slots = max(1, min(engine.max_slots, int(fps * engine.capacity_headroom / FPS)))
        log.info("measured %.0f frames/s: admitting %d sessions at once", fps, slots)
        await self.admission.set_slots(slots)
        self.metrics.slots_total.set(slots)

    def changed(self) -> None:
        """Something about the line changed: grant what can be granted and push positions."""
        self._changed.set()

    # ----- tickets -----

    def register_waiting(self, ticket_id: str, session: Session) -> None:
        self.waiting_sessions[ticket_id] = session
        self.changed()

    def forget_waiting(self, ticket_id: str) -> None:
        self.waiting_sessions.pop(ticket_id, None)
        self.changed()

    async def release(self, ticket_id: str, *, served: bool, mode: str = "clip", held_s: float = 0.0) -> None:
        if self.granted_sessions.pop(ticket_id, None) is not None and served:
            self.metrics.service.labels(mode).observe(held_s)
        await self.admission.release(ticket_id, time.monotonic(), served=served)
        self.metrics.sessions_active.set(len(self.granted_sessions))
        self.changed()

    def park(self, session: Session) -> None:
        """A queued session's socket closed: keep it for the resume grace."""
        self.parked[session.id] = (session, time.monotonic() + self.settings.queue.resume_grace_s)

    def unpark(self, session_id: str) -> Session | None:
        entry = self.parked.pop(session_id, None)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    # ----- the loops -----

    async def _dispatch_loop(self) -> None:
        """Grant and push positions on every change. Heartbeats go out in ``HEARTBEAT_PHASES``
        slices of the line, so a thousand waiting clients never get them in one burst."""
        tick = self.settings.queue.heartbeat_s / HEARTBEAT_PHASES
        next_tick = time.monotonic() + tick
        phase = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(0.0, next_tick - time.monotonic()))
            self._changed.clear()
            try:
                await self._grant_all()
                heartbeat = None
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + tick
                    phase = (phase + 1) % HEARTBEAT_PHASES
                    heartbeat = phase
                    self._expire_parked()
                await self._push_positions(heartbeat_phase=heartbeat)
            except Exception:
                log.exception("dispatcher round failed")
                await asyncio.sleep(0.1)

    async def _grant_all(self) -> None:
        while True:
            grant = await self.admission.grant(time.monotonic())
            if grant is None:
                return
            self._on_grant(grant)

    def _on_grant(self, grant: Grant) -> None:
        ticket = grant.ticket
        session = self.waiting_sessions.pop(ticket.id, None)
        self.metrics.grants.labels(ticket.tier).inc()
        self.metrics.queue_wait.labels(ticket.tier).observe(grant.waited_s)
        if session is None or not session.take_grant(grant):
            asyncio.get_running_loop().create_task(self.release(ticket.id, served=False))
            return
        self.granted_sessions[ticket.id] = session
        self.metrics.sessions_active.set(len(self.granted_sessions))

    async def _push_positions(self, *, heartbeat_phase: int | None) -> None:
        view = await self.admission.view(time.monotonic())
        self._last_view = view
        size = len(view.waiting)
        counts = dict.fromkeys(TIER_NAMES, 0)
        for position, (ticket, eta) in enumerate(zip(view.waiting, view.eta_s, strict=True), start=1):
            counts[ticket.tier] = counts.get(ticket.tier, 0) + 1
            session = self.waiting_sessions.get(ticket.id)
            if session is not None:
                session.queue_status(position, size, eta, force=position % HEARTBEAT_PHASES == heartbeat_phase)
        for tier, n in counts.items():
            self.metrics.queue_waiting.labels(tier).set(n)
        self.metrics.slots_busy.set(view.slots_busy)
        self.metrics.render_fps.set(self.engine.frames_per_second())

    def _expire_parked(self) -> None:
        now = time.monotonic()
        for sid in [sid for sid, (_, until) in self.parked.items() if until < now]:
            session, _ = self.parked.pop(sid)
            if session.request is not None:
                session.request.audio.close()

    # ----- public summaries -----

    async def queue_summary(self) -> dict[str, object]:
        view = await self.admission.view(time.monotonic())
        tiers: dict[str, dict[str, object]] = {}
        for tier in TIER_NAMES:
            etas = [e for t, e in zip(view.waiting, view.eta_s, strict=True) if t.tier == tier]
            last = etas[-1] if etas else None
            tiers[tier] = {"size": len(etas), "eta_s": None if last is None else round(last, 1)}
        return {"tiers": tiers, "slots": {"total": view.slots_total, "busy": view.slots_busy}}


def queued_message(position: int, size: int, tier: str, eta: float | None) -> str:
    return encode(
        "queued", position=position, queue_size=size, tier=tier, eta_s=None if eta is None else round(eta, 1)
    )
