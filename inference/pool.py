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

from inference.avatars.store import AvatarStore
from inference.engine import PreparedAvatar, Renderer
from inference.stream import EngineStream, StreamMode
from inference.worker import FrameWorker, WorkerStats

if TYPE_CHECKING:
    from inference.procs.process_pool import ProcessEnginePool

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
    avatar_cache: int = 16
    data_dir: Path = Path("var")


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


def build_renderers(config: EngineConfig) -> list[Renderer]:
    """One renderer per worker, of the kind ``choose_kind`` picks (slow: loads the models)."""
    workers = max(1, config.workers)
    kind = choose_kind(config)
    if kind == "musetalk":
        devices = worker_devices(config.device, workers)
        for index, device in enumerate(devices):
            log.info("frame worker %d: MuseTalk on %s (%s)", index, device, config.dtype)
        return [build_renderer(config, kind, device) for device in devices]
    log.info("%d frame worker(s): the lite engine on the CPU", workers)
    return [build_renderer(config, kind, "cpu") for _ in range(workers)]


def open_engine(config: EngineConfig) -> EnginePool | ProcessEnginePool:
    """``engine.process_mode``: worker threads in this process, or supervised worker processes."""
    if config.process_mode == "process":
        from inference.procs.process_pool import ProcessEnginePool

        return ProcessEnginePool(config)
    if config.process_mode != "thread":
        raise ValueError(f'engine.process_mode must be "thread" or "process", not {config.process_mode!r}')
    return EnginePool(config)


class EnginePool:
    """Worker threads sharing one avatar store; a new stream goes to the least loaded worker."""

    encodes_in_workers = False
    """MSE streams are encoded by the transport's own thread (process mode: in the workers)."""

    def __init__(self, config: EngineConfig, renderers: list[Renderer] | None = None) -> None:
        self.config = config
        self.on_capacity: Callable[[], object] = lambda: None
        """Never called: threads do not die on their own."""
        renderers = renderers or build_renderers(config)
        self.name = renderers[0].name
        self.workers = [
            FrameWorker(r, max_batch=config.max_batch, name=f"frame-worker-{i}")
            for i, r in enumerate(renderers)
        ]
        self.avatars = AvatarStore(avatar_root(config), renderers[0], cache_size=config.avatar_cache)
        self._capacity = 0.0

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()

    def open_stream(
        self, avatar: PreparedAvatar, mode: StreamMode, **options: object
    ) -> EngineStream:
        worker = min(self.workers, key=lambda w: w.active_streams)
        return worker.open_stream(avatar, mode, **options)  # type: ignore[arg-type]

    def measure_capacity(self, avatar: PreparedAvatar) -> float:
        """Frames a second all workers sustain together (measured before they start)."""
        self._capacity = sum(worker.measure_capacity(avatar) for worker in self.workers)
        return self._capacity

    def frames_per_second(self) -> float:
        return sum(w.frames_per_second() for w in self.workers)

    def capacity(self) -> float:
        """The frames/s measured by ``measure_capacity``; threads stay up."""
        return self._capacity

    def worker_stats(self) -> list[tuple[str, WorkerStats, bool, int]]:
        """(name, stats, up, restarts) of each worker."""
        return [(w.name, w.stats(), True, 0) for w in self.workers]
