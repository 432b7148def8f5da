from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from inference.musetalk import MissingModelsError, check_models, load_models
from inference.musetalk.bisenet import BiSeNet
from inference.musetalk.layout import ModelLayout
from inference.musetalk.models import MuseTalkModels, resolve_dtype


def copy_layout(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_complete_layout_has_no_problems(models_dir: Path) -> None:
    assert check_models(models_dir) == []
    assert check_models(models_dir, face_parsing=True, taesd=True) == []
    assert check_models(models_dir, version="v1") == []


@pytest.mark.parametrize(
    "relative",
    [
        "musetalkV15/unet.pth",
        "musetalkV15/musetalk.json",
        "sd-vae/config.json",
        "sd-vae/diffusion_pytorch_model.bin",
        "whisper/preprocessor_config.json",
        "whisper/model.safetensors",
    ],
)
def test_missing_file_is_named(models_dir: Path, tmp_path: Path, relative: str) -> None:
    root = copy_layout(models_dir, tmp_path / "models")
    (root / relative).unlink()
    problems = check_models(root)
    folder, name = relative.split("/")
    assert len(problems) == 1 and str(root / folder) in problems[0] and name in problems[0]
    with pytest.raises(MissingModelsError) as err:
        load_models(root)
    assert problems[0] in str(err.value)
    assert err.value.problems == problems


def test_empty_folder_lists_every_required_file(tmp_path: Path) -> None:
    problems = check_models(tmp_path)
    joined = "\n".join(problems)
    for name in ("unet.pth", "musetalk.json", "sd-vae", "whisper/config.json", "preprocessor_config.json"):
        assert name in joined
    assert "79999_iter.pth" not in joined
    assert "79999_iter.pth" in "\n".join(check_models(tmp_path, face_parsing=True))


def test_models_have_musetalk_shapes(models: MuseTalkModels) -> None:
    latents = torch.randn(3, 8, 32, 32)
    audio = models.positional(torch.randn(3, 50, 384))
    out = models.unet(latents, torch.zeros((), dtype=torch.long), encoder_hidden_states=audio).sample
    assert out.shape == (3, 4, 32, 32)
    image = torch.rand(2, 3, 256, 256) * 2 - 1
    assert models.vae.encode(image).latent_dist.mean.shape == (2, 4, 32, 32)
    assert models.vae.decode(torch.randn(2, 4, 32, 32)).sample.shape == (2, 3, 256, 256)
    assert models.vae_scaling == pytest.approx(0.18215)
    mel = torch.zeros(1, 80, 3000)
    hidden = models.whisper(mel, output_hidden_states=True).hidden_states
    assert len(hidden) == 5 and hidden[0].shape == (1, 1500, 384)
    assert models.face_parser is not None and models.taesd is not None
    assert models.taesd.decode(torch.randn(1, 4, 32, 32)).sample.shape == (1, 3, 256, 256)


def test_positional_encoding_is_sinusoidal(models: MuseTalkModels) -> None:
    pe = models.positional(torch.zeros(1, 50, 384))[0]
    assert torch.allclose(pe[:, 0], torch.sin(torch.arange(50.0)), atol=1e-6)
    assert torch.allclose(pe[:, 1], torch.cos(torch.arange(50.0)), atol=1e-6)
    assert torch.allclose(pe[3, 2], torch.sin(torch.tensor(3.0) * 10000 ** (-2 / 384)), atol=1e-6)


def test_unet_load_is_strict(models_dir: Path, tmp_path: Path) -> None:
    root = copy_layout(models_dir, tmp_path / "models")
    layout = ModelLayout(root)
    state = torch.load(layout.unet_weights, weights_only=True)
    state.pop(next(iter(state)))
    torch.save(state, layout.unet_weights)
    with pytest.raises(RuntimeError, match="Missing key"):
        load_models(root)


class Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("unpickled code ran",))


def test_checkpoints_are_loaded_weights_only(models_dir: Path, tmp_path: Path) -> None:
    root = copy_layout(models_dir, tmp_path / "models")
    layout = ModelLayout(root)
    state = torch.load(layout.unet_weights, weights_only=True)
    torch.save({**state, "evil": Payload()}, layout.unet_weights)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        load_models(root)


def test_v1_layout_loads(models_dir: Path) -> None:
    models = load_models(models_dir, version="v1", face_parsing=False)
    assert models.face_parser is None
    with pytest.raises(ValueError, match="version"):
        ModelLayout(models_dir, "v2")


def test_face_parser_loads_both_checkpoints(models_dir: Path, tmp_path: Path) -> None:
    root = copy_layout(models_dir, tmp_path / "models")
    layout = ModelLayout(root)
    (layout.resnet_weights).unlink()
    assert load_models(root).face_parser is None  # optional: used only when both files are there
    with pytest.raises(MissingModelsError, match="resnet18-5c106cde.pth"):
        load_models(root, face_parsing=True)


def test_real_bisenet_matches_checkpoint_names() -> None:
    names = set(BiSeNet().state_dict())
    for key in (
        "cp.resnet.layer4.1.bn2.running_var",
        "cp.arm32.conv_atten.weight",
        "ffm.convblk.conv.weight",
        "conv_out.conv_out.weight",
        "conv_out16.conv.bn.weight",
        "cp.conv_avg.conv.weight",
    ):
        assert key in names
    assert sum(p.numel() for p in BiSeNet().parameters()) == pytest.approx(13.3e6, rel=0.02)


def test_dtype_names() -> None:
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("fp16") is torch.float16
    with pytest.raises(ValueError, match="fp8"):
        resolve_dtype("fp8")


@pytest.mark.parametrize("dtype", ["bf16"])
def test_loads_in_half_precision(models_dir: Path, dtype: str) -> None:
    models = load_models(models_dir, dtype=dtype)
    assert next(models.unet.parameters()).dtype is torch.bfloat16
    assert next(models.whisper.parameters()).dtype is torch.bfloat16


def test_models_check_command(models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``musetalk-stream models check --dir``: exit 0 on a complete folder, 1 naming each missing
    file otherwise."""
    from stream_server.cli import main

    with pytest.raises(SystemExit) as done:
        main(["models", "check", "--dir", str(models_dir)])
    assert done.value.code == 0 and "complete" in capsys.readouterr().out
    root = copy_layout(models_dir, tmp_path / "models")
    (root / "musetalkV15" / "unet.pth").unlink()
    with pytest.raises(SystemExit) as done:
        main(["models", "check", "--dir", str(root)])
    assert done.value.code == 1 and str(root / "musetalkV15" / "unet.pth") in capsys.readouterr().err


def test_download_fetches_exactly_the_layout_that_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``models download`` with huggingface_hub replaced by a stand-in (tests never reach the
    network): every file lands where ``check_models`` looks, optional ones included."""
    import huggingface_hub

    from inference.musetalk import download_models

    fetched: list[tuple[str, str]] = []

    def fake_download(*, repo_id: str, filename: str, local_dir: Path) -> str:
        fetched.append((repo_id, filename))
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    root = download_models(tmp_path / "models", taesd=True, v1=True)
    assert check_models(root, face_parsing=True, taesd=True) == []
    assert check_models(root, version="v1") == []
    assert ("TMElyralab/MuseTalk", "musetalkV15/unet.pth") in fetched
    assert ("openai/whisper-tiny", "preprocessor_config.json") in fetched
