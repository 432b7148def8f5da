"""The node's engine: the renderer chosen by configuration, its frame workers and its avatars.

Avatars live under ``<data_dir>/avatars``, one folder per avatar (``<id>/``) with the source, the
store's ``store.json`` and one subfolder per engine (``lite/``, ``musetalk/``): the
``AvatarStore`` owns that layout, and the renderers are given the same root.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from inference.avatar_store import AvatarStore
from inference.engine import PreparedAvatar, Renderer
from inference.stream import EngineStream, StreamMode
from inference.worker import FrameWorker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    kind: str = "auto"
    models_dir: Path = Path("models")
    device: str = "cuda"
    dtype: str = "fp16"
    workers: int = 1
    max_batch: int = 8
    avatar_cache: int = 16
    data_dir: Path = Path("var")


def avatar_root(config: EngineConfig) -> Path:
    """The one folder of avatars, shared by the store and every engine."""
    return config.data_dir / "avatars"


def worker_device(device: str, index: int) -> str:
    """``cuda`` with several workers means one GPU each: ``cuda:0``, ``cuda:1``, ..."""
    return f"cuda:{index}" if device == "cuda" else device


def build_renderer(config: EngineConfig, index: int = 0) -> Renderer:
    """``musetalk`` when asked for or when ``auto`` finds a complete models folder, else
    ``lite``."""
    kind = config.kind
    if kind == "auto":
        kind = "lite"
        if config.models_dir.is_dir():
            from inference.musetalk import check_models

            problems = check_models(config.models_dir)
            if not problems:
                kind = "musetalk"
            else:
                log.info(
                    "models folder incomplete, serving the lite engine: %s", "; ".join(problems)
                )
    if kind == "musetalk":
        from inference.musetalk import MuseTalkRenderer

        return MuseTalkRenderer.from_folder(
            config.models_dir,
            avatar_root(config),
            device=worker_device(config.device, index),
            dtype=config.dtype,
            max_batch=config.max_batch,
        )
    from inference.lite import LiteRenderer

    return LiteRenderer(avatar_root(config), max_batch=config.max_batch)


class EnginePool:
    """Workers sharing one avatar store; a new stream goes to the least loaded worker."""

    def __init__(self, config: EngineConfig, renderers: list[Renderer] | None = None) -> None:
        self.config = config
        renderers = renderers or [build_renderer(config, i) for i in range(max(1, config.workers))]
        self.name = renderers[0].name
        self.workers = [
            FrameWorker(r, max_batch=config.max_batch, name=f"frame-worker-{i}")
            for i, r in enumerate(renderers)
        ]
        root = avatar_root(config)
        self.avatars = AvatarStore(root, renderers[0], cache_size=config.avatar_cache)

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
        return sum(worker.measure_capacity(avatar) for worker in self.workers)

    def frames_per_second(self) -> float:
        return sum(w.frames_per_second() for w in self.workers)
