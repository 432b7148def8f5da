"""Tiny seeded MuseTalk weights written once per session in the real layout, loaded by the real code."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from musetalk_helpers import fixed_detector

from inference.musetalk import MuseTalkRenderer, load_models
from inference.musetalk.models import MuseTalkModels
from inference.musetalk.tiny import write_tiny_models


@pytest.fixture(scope="session", autouse=True)
def _quiet() -> None:
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_models(tmp_path_factory.mktemp("models"), seed=0, taesd=True, v1=True)


@pytest.fixture(scope="session")
def models(models_dir: Path) -> MuseTalkModels:
    return load_models(models_dir, device="cpu", dtype="fp32", taesd=True)


@pytest.fixture
def renderer(models: MuseTalkModels, tmp_path: Path) -> MuseTalkRenderer:
    return MuseTalkRenderer(models, tmp_path / "avatars", detector=fixed_detector, max_batch=8)
