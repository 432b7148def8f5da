"""The node's engine: the renderer chosen by configuration, its frame workers and its avatars.

Avatars live under ``<data_dir>/avatars`` in the layout of ``inference.avatars.layout``: the
``AvatarStore`` owns it, and the renderers are given the same root for their id-based helpers.

Nothing is chosen silently: ``engine.kind = "musetalk"`` with an incomplete models folder fails
here, naming the missing files; ``auto`` logs a warning that says why it serves the lite engine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from inference.avatars.cache import CacheStats, DeviceAvatarCache
from inference.avatars.hot import HotAvatars
from inference.avatars.store import AvatarStore
from inference.engine import PreparedAvatar, Renderer
from inference.stream import EngineStream, StreamMode
from inference.worker import FrameWorker
from inference.worker_health import WorkerStatus, judge

if TYPE_CHECKING:
    from inference.serving_engine import EncodeOptions, PacketOptions

log = logging.getLogger(__name__)

KINDS = ("auto", "lite", "musetalk")


@dataclass(frozen=True)
class EngineConfig:
    kind: str = "auto"
    models_dir: Path = Path("models")
    device: str = "cuda"
    dtype: str = "fp16"
    workers: int = 1
    process_mode: str = "thread"
    max_batch: int = 8
    data_dir: Path = Path("var")
    device_cache: int = 4
    host_cache_bytes: int = 2 << 30
    disk_bytes: int = 0
    hot_after_uses: int = 10
    hot_window_s: float = 600.0


def avatar_root(config: EngineConfig) -> Path:
    """The one folder of avatars, shared by the store and every engine."""
    return config.data_dir / "avatars"


def musetalk_problems(models_dir: Path) -> list[str]:
    """What is missing for MuseTalk under ``models_dir``, one line per file; empty when usable."""
    from inference.musetalk.layout import check_models

    return check_models(models_dir)


def choose_kind(config: EngineConfig) -> str:
    """``lite`` or ``musetalk``. An explicit ``musetalk`` whose models are incomplete raises
    ``MissingModelsError`` naming the files; ``auto`` then warns and takes ``lite``."""
    if config.kind not in KINDS:
        raise ValueError(f"engine.kind {config.kind!r} is not one of {KINDS}")
    if config.kind == "lite":
        return "lite"
    if config.kind == "auto" and not config.models_dir.is_dir():
        log.warning(
            "engine.kind = auto: serving the lite engine, because there is no models folder %s", config.models_dir
        )
        return "lite"
    problems = musetalk_problems(config.models_dir)
    if not problems:
        return "musetalk"
    if config.kind == "musetalk":
        from inference.musetalk.layout import MissingModelsError

        raise MissingModelsError(config.models_dir, problems)
    log.warning(
        "engine.kind = auto: serving the lite engine, because the MuseTalk models in %s are incomplete: %s",
        config.models_dir,
        "; ".join(problems),
    )
    return "lite"


def worker_devices(device: str, workers: int) -> list[str]:
    """The torch device of each worker. ``cuda`` means one GPU per worker, worker ``i`` on
    ``cuda:i`` (so there must be at least ``workers`` GPUs); any other value (``cuda:1``, ``cpu``)
    puts every worker on that one device."""
    if device != "cuda":
        return [device] * workers
    import torch

    visible = torch.cuda.device_count()
    if visible < workers:
        raise RuntimeError(
            f'engine.device = "cuda" puts worker i on cuda:i, but engine.workers = {workers} and '
            f'{visible} CUDA device(s) are visible: lower engine.workers, or name one device '
            f'(e.g. "cuda:0") for every worker'
        )
    return [f"cuda:{i}" for i in range(workers)]


def build_renderer(config: EngineConfig, kind: str, device: str) -> Renderer:
    """One worker's renderer of ``kind`` on ``device`` (slow: loads the models)."""
    if kind == "musetalk":
        from inference.musetalk import MuseTalkRenderer

        return MuseTalkRenderer.from_folder(
            config.models_dir, avatar_root(config), device=device, dtype=config.dtype, max_batch=config.max_batch
        )
    from inference.lite import LiteRenderer

    return LiteRenderer(avatar_root(config), max_batch=config.max_batch)


def renderer_devices(config: EngineConfig, kind: str) -> list[str]:
    """The device of each worker's renderer (the lite engine renders on the CPU)."""
    workers = max(1, config.workers)
    return worker_devices(config.device, workers) if kind == "musetalk" else ["cpu"] * workers


def build_renderers(config: EngineConfig) -> list[Renderer]:
    """One renderer per worker, of the kind ``choose_kind`` picks (slow: loads the models)."""
    kind = choose_kind(config)
    devices = renderer_devices(config, kind)
    if kind == "musetalk":
        for index, device in enumerate(devices):
            log.info("frame worker %d: MuseTalk on %s (%s)", index, device, config.dtype)
    else:
        log.info("%d frame worker(s): the lite engine on the CPU", len(devices))
    return [build_renderer(config, kind, device) for device in devices]


class EnginePool:
    """Worker threads sharing one avatar store. Each worker has a device cache of the avatars it
    holds; a new stream goes to the least loaded worker that serves (``inference.worker_health``),
    or to one holding its avatar when that worker has at most one stream more (``choose_worker``)."""

    encodes_in_workers = False
    """Streams are encoded in this process: MSE by its sender's thread, WebRTC by aiortc."""

    def __init__(self, config: EngineConfig, renderers: list[Renderer] | None = None) -> None:
        self.config = config
        self.on_capacity: Callable[[], object] = lambda: None
        """Threads do not go down: only a slow or stalled worker leaves the capacity (the node
        sees that in ``worker_status``)."""
        renderers = renderers or build_renderers(config)
        self.name = renderers[0].name
        self.version = renderers[0].preparation_version
        self.workers = [
            FrameWorker(r, max_batch=config.max_batch, name=f"frame-worker-{i}")
            for i, r in enumerate(renderers)
        ]
        self.hot = HotAvatars(config.hot_after_uses, config.hot_window_s)
        self.held = [DeviceAvatarCache(config.device_cache, self.hot.is_hot) for _ in self.workers]
        """The avatars each worker holds on its device, index by index with ``workers``."""
        self.avatars = AvatarStore(
            avatar_root(config),
            renderers[0],
            host_cache_bytes=config.host_cache_bytes,
            disk_bytes=config.disk_bytes,
            is_hot=self.hot.is_hot,
        )
        self._capacities = [0.0] * len(self.workers)

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()

    def open_stream(
        self,
        avatar: PreparedAvatar,
        mode: StreamMode,
        *,
        buffer_frames: int = 50,
        on_output: Callable[[], None] | None = None,
        background: bool = False,
        encode: EncodeOptions | PacketOptions | None = None,
    ) -> EngineStream:
        if encode is not None:
            raise ValueError("worker threads do not encode: the senders do (encodes_in_workers is False)")
        serving = [s.serving for s in self.worker_status()]
        candidates = [i for i, ok in enumerate(serving) if ok] or list(range(len(self.workers)))
        index = candidates[
            choose_worker(
                [self.workers[i].active_streams for i in candidates], [self._holds(i, avatar) for i in candidates]
            )
        ]
        self._hold(index, avatar)
        return self.workers[index].open_stream(
            avatar, mode, buffer_frames=buffer_frames, on_output=on_output, background=background
        )

    def holders(self, avatar_id: str) -> list[int]:
        """The workers whose device cache holds ``avatar_id``."""
        return [i for i, held in enumerate(self.held) if avatar_id in held]

    def forget(self, avatar_id: str) -> None:
        """The avatar was deleted or replaced: out of every worker's device cache."""
        for worker, held in zip(self.workers, self.held, strict=True):
            avatar = held.discard(avatar_id)
            if avatar is not None:
                worker.renderer.release_avatar(avatar)

    def cache_stats(self) -> dict[str, CacheStats]:
        """Hits, misses and evictions of each level: device (all workers), host and disk."""
        device = CacheStats()
        for held in self.held:
            device.hits += held.stats.hits
            device.misses += held.stats.misses
            device.evictions += held.stats.evictions
        return {"device": device, "host": self.avatars.host_stats, "disk": self.avatars.disk_stats}

    def _holds(self, index: int, avatar: PreparedAvatar) -> bool:
        return self.held[index].peek(avatar.info.id) is avatar

    def _hold(self, index: int, avatar: PreparedAvatar) -> None:
        """Count a device hit or miss on the chosen worker; a miss (or another object under the
        same id: the avatar was prepared again) takes the avatar in, evicting the coldest."""
        held = self.held[index]
        if held.get(avatar.info.id) is avatar:
            return
        renderer = self.workers[index].renderer
        for evicted in held.put(avatar.info.id, avatar):
            renderer.release_avatar(evicted)

    def measure_capacity(self, avatar: PreparedAvatar) -> float:
        """Frames a second all workers sustain together (measured before they start)."""
        self._capacities = [worker.measure_capacity(avatar) for worker in self.workers]
        return sum(self._capacities)

    def capacity(self) -> float:
        return sum(c for c, s in zip(self._capacities, self.worker_status(), strict=True) if s.serving)

    def frames_per_second(self) -> float:
        return sum(w.frames_per_second() for w in self.workers)

    def take_batch_sizes(self) -> list[list[int]]:
        return [w.take_batch_sizes() for w in self.workers]

    def worker_status(self) -> list[WorkerStatus]:
        stats = [w.stats() for w in self.workers]
        reasons = judge([True] * len(stats), stats, [0.0] * len(stats))
        return [
            WorkerStatus(w.name, s, True, 0, why is None, why)
            for w, s, why in zip(self.workers, stats, reasons, strict=True)
        ]


def choose_worker(loads: list[int], holds: list[bool]) -> int:
    """The worker for a new stream: the least loaded, unless a worker holding the avatar has at
    most one stream more than that (it is then spared loading the avatar again, and the wait
    hardly grows). Ties go to the lowest index."""
    least = min(range(len(loads)), key=lambda i: loads[i])
    holding = [i for i, h in enumerate(holds) if h and loads[i] <= loads[least] + 1]
    return min(holding, key=lambda i: loads[i]) if holding else least
