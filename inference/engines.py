"""The node's engine as ``engine.process_mode`` chooses it: worker threads in this process
(``EnginePool``) or supervised worker processes (``ProcessEnginePool``). Kept apart from both so
that neither pool module imports the other."""

from __future__ import annotations

from inference.pool import EngineConfig, EnginePool
from inference.procs.process_pool import ProcessEnginePool
from inference.serving_engine import ServingEngine

PROCESS_MODES = ("thread", "process")


def open_engine(config: EngineConfig) -> ServingEngine:
    if config.process_mode == "process":
        return ProcessEnginePool(config)
    if config.process_mode != "thread":
        raise ValueError(f"engine.process_mode must be one of {PROCESS_MODES}, not {config.process_mode!r}")
    return EnginePool(config)
