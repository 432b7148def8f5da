"""Which engine a node serves, and on which device: never a silent substitute. An explicit
``musetalk`` with an incomplete models folder stops the server at start, naming the missing files;
``auto`` says in a warning why it serves the lite engine."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from inference.lite import LiteRenderer
from inference.musetalk import MissingModelsError
from inference.pool import EngineConfig, EnginePool, build_renderers, worker_devices
from tests.server_harness import run_server


def partial_models(root: Path) -> Path:
    """A models folder with the UNet's config but none of the weights."""
    (root / "musetalkV15").mkdir(parents=True)
    (root / "musetalkV15" / "musetalk.json").write_text("{}")
    (root / "sd-vae").mkdir()
    (root / "sd-vae" / "config.json").write_text("{}")
    return root


def test_explicit_musetalk_with_incomplete_models_stops_the_server(tmp_path: Path) -> None:
    models = partial_models(tmp_path / "models")
    env = {"MTS_ENGINE__KIND": "musetalk", "MTS_ENGINE__MODELS_DIR": str(models)}
    with pytest.raises(RuntimeError, match="server exited") as failed, run_server(tmp_path, **env):
        pass
    log = str(failed.value)
    assert "MuseTalk models are incomplete" in log
    assert str(models / "musetalkV15" / "unet.pth") in log
    assert "whisper" in log and "diffusion_pytorch_model" in log
    assert "musetalk.json" not in log.split("incomplete", 1)[1].split("Fetch", 1)[0]  # only what is missing


def test_explicit_musetalk_with_incomplete_models_fails_in_the_pool(tmp_path: Path) -> None:
    models = partial_models(tmp_path / "models")
    with pytest.raises(MissingModelsError) as failed:
        EnginePool(EngineConfig(kind="musetalk", models_dir=models, device="cpu", data_dir=tmp_path))
    assert f"missing {models / 'musetalkV15' / 'unet.pth'}" in failed.value.problems
    assert not (tmp_path / "avatars").exists()  # nothing was set up for another engine


def test_auto_with_incomplete_models_warns_why_it_serves_lite(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models = partial_models(tmp_path / "models")
    with caplog.at_level(logging.WARNING, logger="inference.pool"):
        renderers = build_renderers(EngineConfig(kind="auto", models_dir=models, data_dir=tmp_path))
    assert all(isinstance(r, LiteRenderer) for r in renderers)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "lite" in text and "incomplete" in text and str(models / "musetalkV15" / "unet.pth") in text


def test_auto_without_a_models_folder_warns_too(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="inference.pool"):
        pool = EnginePool(EngineConfig(kind="auto", models_dir=tmp_path / "nowhere", data_dir=tmp_path))
    assert pool.name == "lite"
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"engine.kind = auto: serving the lite engine, because there is no models folder {tmp_path / 'nowhere'}"
    ]


def test_lite_is_chosen_without_a_word(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="inference.pool"):
        pool = EnginePool(EngineConfig(kind="lite", models_dir=tmp_path / "nowhere", workers=2, data_dir=tmp_path))
    assert pool.name == "lite" and len(pool.workers) == 2
    assert [r for r in caplog.records if r.name == "inference.pool"] == []


def test_auto_with_complete_models_serves_musetalk_on_the_named_device(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from inference.musetalk.tiny import write_tiny_models

    models = write_tiny_models(tmp_path / "models", seed=0)
    config = EngineConfig(kind="auto", models_dir=models, device="cpu", dtype="fp32", workers=2, data_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="inference.pool"):
        renderers = build_renderers(config)
    assert [r.name for r in renderers] == ["musetalk", "musetalk"]
    assert [r.models.device.type for r in renderers] == ["cpu", "cpu"]  # type: ignore[attr-defined]
    logged = [r.getMessage() for r in caplog.records]
    assert "frame worker 0: MuseTalk on cpu (fp32)" in logged and "frame worker 1: MuseTalk on cpu (fp32)" in logged
    assert not any(r.levelno >= logging.WARNING for r in caplog.records if r.name == "inference.pool")


def test_cuda_means_one_gpu_per_worker_and_fails_when_there_are_too_few() -> None:
    assert worker_devices("cpu", 3) == ["cpu", "cpu", "cpu"]
    assert worker_devices("cuda:1", 2) == ["cuda:1", "cuda:1"]
    visible = torch.cuda.device_count()
    if visible:
        assert worker_devices("cuda", visible) == [f"cuda:{i}" for i in range(visible)]
    with pytest.raises(RuntimeError, match=rf"engine.workers = {visible + 1} and {visible} CUDA device"):
        worker_devices("cuda", visible + 1)
