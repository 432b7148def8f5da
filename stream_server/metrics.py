"""The node's Prometheus metrics, in an app-owned registry (no per-session labels)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from inference.worker import WorkerStats
    from stream_server.upload_budget import UploadBudget

WAIT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 900)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._restarts_seen: dict[str, int] = {}
        self.queue_waiting = Gauge("mts_queue_waiting", "Tickets waiting, per tier", ["tier"], registry=r)
        self.queue_wait = Histogram(
            "mts_queue_wait_seconds", "Time from join to grant", ["tier"], buckets=WAIT_BUCKETS, registry=r
        )
        self.grants = Counter("mts_grants_total", "Slots granted", ["tier"], registry=r)
        self.rejections = Counter("mts_rejections_total", "Errors sent to clients, by code", ["code"], registry=r)
        self.sessions_active = Gauge("mts_sessions_active", "Sessions holding a slot", registry=r)
        self.connections = Gauge("mts_connections", "Open session sockets", registry=r)
        self.slots_total = Gauge("mts_slots_total", "Slots this node admits", registry=r)
        self.slots_busy = Gauge("mts_slots_busy", "Slots in use (all nodes sharing the queue)", registry=r)
        self.loop_lag = Histogram(
            "mts_event_loop_lag_seconds", "Event-loop scheduling lag", buckets=LAG_BUCKETS, registry=r
        )
        self.loop_lag_p99 = Gauge(
            "mts_event_loop_lag_p99_seconds", "99th percentile of the recent event-loop lag samples", registry=r
        )
        self.frames = Counter("mts_frames_total", "Video frames streamed", registry=r)
        self.render_fps = Gauge("mts_render_frames_per_second", "Measured render rate, all workers", registry=r)
        self.worker_fps = Gauge("mts_worker_frames_per_second", "Render rate of each worker", ["worker"], registry=r)
        self.worker_streams = Gauge("mts_worker_streams", "Streams (busy slots) on each worker", ["worker"], registry=r)
        self.worker_queue_depth = Gauge(
            "mts_worker_queue_depth", "Speech frames ready to render, per worker", ["worker"], registry=r
        )
        self.worker_batch_size = Histogram(
            "mts_worker_batch_size", "Frames per render call, per worker", ["worker"], buckets=BATCH_BUCKETS, registry=r
        )
        self.worker_restarts = Counter(
            "mts_worker_restarts_total", "Worker processes restarted", ["worker"], registry=r
        )
        self.worker_up = Gauge(
            "mts_worker_up", "1 while the worker is running, 0 while it is down", ["worker"], registry=r
        )
        self.service = Histogram(
            "mts_service_seconds", "How long a granted session held its slot", ["mode"],
            buckets=WAIT_BUCKETS, registry=r,
        )
        self.clips_served = Counter("mts_clips_served_total", "Clips served over HTTP or from the cache", registry=r)
        self.position_pushes = Counter("mts_position_pushes_total", "queued messages sent", registry=r)
        self.queued_audio_bytes = Gauge(
            "mts_queued_audio_bytes", "Audio bytes kept for requests waiting for a slot (memory and disk)", registry=r
        )
        self.queued_audio_bytes_limit = Gauge(
            "mts_queued_audio_bytes_limit", "The node's budget for audio kept by waiting requests", registry=r
        )

    def report_workers(self, rows: list[tuple[str, WorkerStats, bool, int]]) -> None:
        """Per worker (label ``worker``: one value per configured worker, so bounded)."""
        for name, stats, up, restarts in rows:
            self.worker_fps.labels(name).set(stats.frames_per_second)
            self.worker_streams.labels(name).set(stats.streams)
            self.worker_queue_depth.labels(name).set(stats.queue_depth)
            self.worker_up.labels(name).set(1 if up else 0)
            self.worker_restarts.labels(name).inc(max(0, restarts - self._restarts_seen.get(name, 0)))
            self._restarts_seen[name] = restarts
            histogram = self.worker_batch_size.labels(name)
            for size in stats.batch_sizes:
                histogram.observe(size)

    def watch_upload_budget(self, budget: UploadBudget) -> None:
        self.queued_audio_bytes.set_function(lambda: budget.used_bytes)
        self.queued_audio_bytes_limit.set(budget.limit_bytes)
