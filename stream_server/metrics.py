"""The node's Prometheus metrics, in an app-owned registry (no per-session labels)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from inference.avatars.cache import CacheStats

if TYPE_CHECKING:
    from inference.worker_health import WorkerStatus
    from stream_server.outbox import OutboxTally
    from stream_server.upload_budget import UploadBudget

WAIT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 900)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


class AvatarCacheCollector(Collector):
    """``mts_avatar_cache_{hits,misses,evictions}_total`` by level (device, host, disk), read from
    the caches' own counts when scraped (no per-avatar labels)."""

    def __init__(self, stats: Callable[[], Mapping[str, CacheStats]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        levels = self.stats()
        for field, what in (("hits", "found"), ("misses", "not found"), ("evictions", "evicted")):
            family = CounterMetricFamily(
                f"mts_avatar_cache_{field}", f"Avatars {what} in a cache level", labels=["level"]
            )
            for level, counts in levels.items():
                family.add_metric([level], getattr(counts, field))
            yield family


class RedisScriptCollector(Collector):
    """``mts_redis_scripts_total`` by script (each one round trip to Redis), and
    ``mts_line_whole_reads_total``: reads of the shared line that carried all of it (the others
    carried only the changes since this node's copy), read from the store's own counts."""

    def __init__(self, calls: Mapping[str, int], whole_reads: Callable[[], int]) -> None:
        self.calls = calls
        self.whole_reads = whole_reads

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("mts_redis_scripts", "Lua scripts run on Redis, by script", labels=["script"])
        for script, n in sorted(self.calls.items()):
            family.add_metric([script.lower()], n)
        yield family
        yield CounterMetricFamily(
            "mts_line_whole_reads", "Reads of the shared line that carried all of it", value=self.whole_reads()
        )


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
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
        self.webrtc_video_frames = Counter(
            "mts_webrtc_video_frames",
            "Video frames handed to WebRTC peers, by the process that encoded them (server: aiortc in this"
            " process, thread mode; worker: H.264 packets from a worker process, process mode)",
            ["encoded_in"], registry=r,
        )
        self.render_fps = Gauge("mts_render_frames_per_second", "Measured render rate, all workers", registry=r)
        self._restarts_seen: dict[str, int] = {}
        self.worker_fps = Gauge("mts_worker_frames_per_second", "Render rate of each worker", ["worker"], registry=r)
        self.worker_streams = Gauge("mts_worker_streams", "Streams (busy slots) on each worker", ["worker"], registry=r)
        self.worker_queue_depth = Gauge(
            "mts_worker_queue_depth", "Speech frames ready to render, per worker", ["worker"], registry=r
        )
        self.worker_batch_size = Histogram(
            "mts_worker_batch_size", "Frames per render call, per worker", ["worker"], buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.worker_restarts = Counter(
            "mts_worker_restarts_total", "Worker processes restarted", ["worker"], registry=r
        )
        self.worker_up = Gauge(
            "mts_worker_up", "1 while the worker is running, 0 while it is down", ["worker"], registry=r
        )
        self.worker_serving = Gauge(
            "mts_worker_serving", "1 while the worker counts in the capacity (up, not stalled, not slow)", ["worker"],
            registry=r,
        )
        self.service = Histogram(
            "mts_service_seconds", "How long a granted session held its slot", ["mode"],
            buckets=WAIT_BUCKETS, registry=r,
        )
        self.clips_served = Counter("mts_clips_served_total", "Clips served over HTTP or from the cache", registry=r)
        self.pregen_clips = Counter(
            "mts_pregen_clips_total", "Template clips pre-generated in the background", registry=r
        )
        self.pregen_yields = Counter(
            "mts_pregen_yields_total", "Background pre-generations stopped for a user", registry=r
        )
        self.pregen_active = Gauge("mts_pregen_active", "1 while a background pre-generation renders", registry=r)
        # The shared line, per pool (queue.store = "redis"): every node exports the same values,
        # for autoscaling (KEDA's Prometheus scaler: max over the pods).
        self.pool_waiting = Gauge(
            "mts_pool_waiting", "Tickets waiting for a pool's slots (their tier is mapped to it)", ["pool"], registry=r
        )
        self.pool_wait_estimate = Gauge(
            "mts_pool_estimated_wait_seconds", "Estimated wait of the last ticket waiting for a pool", ["pool"],
            registry=r,
        )
        self.pool_slots = Gauge("mts_pool_slots", "Slots of the live nodes of a pool", ["pool"], registry=r)
        self.pool_slots_busy = Gauge("mts_pool_slots_busy", "Busy slots of a pool", ["pool"], registry=r)
        self.position_pushes = Counter("mts_position_pushes_total", "queued messages sent", registry=r)
        self.queued_audio_bytes = Gauge(
            "mts_queued_audio_bytes", "Audio bytes kept for requests waiting for a slot (memory and disk)", registry=r
        )
        self.queued_audio_bytes_limit = Gauge(
            "mts_queued_audio_bytes_limit", "The node's budget for audio kept by waiting requests", registry=r
        )

        self.outbox_bytes = Gauge(
            "mts_outbox_bytes", "Bytes queued for clients and not yet written, all sockets together", registry=r
        )

    def report_workers(self, status: list[WorkerStatus], batch_sizes: list[list[int]]) -> None:
        """Per worker (label ``worker``: one value per configured worker, so bounded)."""
        for row, sizes in zip(status, batch_sizes, strict=True):
            name = row.name
            self.worker_fps.labels(name).set(row.stats.frames_per_second)
            self.worker_streams.labels(name).set(row.stats.streams)
            self.worker_queue_depth.labels(name).set(row.stats.queue_depth)
            self.worker_up.labels(name).set(1 if row.up else 0)
            self.worker_serving.labels(name).set(1 if row.serving else 0)
            self.worker_restarts.labels(name).inc(max(0, row.restarts - self._restarts_seen.get(name, 0)))
            self._restarts_seen[name] = row.restarts
            histogram = self.worker_batch_size.labels(name)
            for size in sizes:
                histogram.observe(size)

    def watch_outboxes(self, tally: OutboxTally) -> None:
        self.outbox_bytes.set_function(lambda: tally.bytes)

    def watch_upload_budget(self, budget: UploadBudget) -> None:
        self.queued_audio_bytes.set_function(lambda: budget.used_bytes)
        self.queued_audio_bytes_limit.set(budget.limit_bytes)

    def watch_avatar_caches(self, stats: Callable[[], Mapping[str, CacheStats]]) -> None:
        self.registry.register(AvatarCacheCollector(stats))

    def watch_redis_scripts(self, calls: Mapping[str, int], whole_reads: Callable[[], int]) -> None:
        self.registry.register(RedisScriptCollector(calls, whole_reads))
