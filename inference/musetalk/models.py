"""Loading MuseTalk's networks from a models folder in the real layout (see ``layout``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import torch
from torch import nn

from inference.musetalk.bisenet import BiSeNet, width_of
from inference.musetalk.layout import MissingModelsError, ModelLayout, check_models

HubModel: TypeAlias = Any
"""A diffusers or transformers model: those libraries are read as untyped (see pyproject's mypy
overrides), so their models' methods (``decode``, ``encode``, ``config``) are not checked."""

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VAE_SCALING = 0.18215


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}") from None


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        weights: dict[str, torch.Tensor] = load_file(str(path))
        return weights
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state dict")
    return state


def load_unet(layout: ModelLayout) -> HubModel:
    """``UNet2DConditionModel(**musetalk.json)`` with a strict load of the checkpoint."""
    from diffusers import UNet2DConditionModel

    config = json.loads(layout.unet_config.read_text())
    unet = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    unet.load_state_dict(_load_weights(layout.unet_weights), strict=True)
    return unet


def load_vae(folder: Path) -> HubModel:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(folder), local_files_only=True)


def load_taesd(folder: Path) -> HubModel:
    from diffusers import AutoencoderTiny

    return AutoencoderTiny.from_pretrained(str(folder), local_files_only=True)


def load_whisper(folder: Path) -> tuple[HubModel, object]:
    """The whisper encoder (the decoder is dropped) and its log-mel feature extractor."""
    from transformers import WhisperFeatureExtractor, WhisperModel

    model = WhisperModel.from_pretrained(str(folder), local_files_only=True)
    extractor = WhisperFeatureExtractor.from_pretrained(str(folder), local_files_only=True)
    return model.get_encoder(), extractor


def load_face_parser(layout: ModelLayout) -> BiSeNet:
    """BiSeNet from ``79999_iter.pth``; its ResNet trunk is first initialised from the ResNet-18
    checkpoint as the original does, then the full parsing checkpoint is loaded strictly."""
    state = _load_weights(layout.face_parse_weights)
    net = BiSeNet(width=width_of(state))
    trunk = {k: v for k, v in _load_weights(layout.resnet_weights).items() if not k.startswith("fc.")}
    net.cp.resnet.load_state_dict(trunk, strict=True)
    net.load_state_dict(state, strict=True)
    return net


class PositionalEncoding(nn.Module):
    """The sinusoidal encoding MuseTalk adds to the audio features before the UNet."""

    pe: torch.Tensor

    def __init__(self, d_model: int = 384, max_len: int = 64) -> None:
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
        div = torch.exp(
            torch.arange(0, d_model, 2, dtype=torch.float32) * (-torch.log(torch.tensor(10000.0)) / d_model)
        )
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div)
        pe[:, 1::2] = torch.cos(position * div)
        self.register_buffer("pe", pe.unsqueeze(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[:, : x.shape[1]].to(x.dtype)


@dataclass
class MuseTalkModels:
    """Every network the engine uses, on one device in one dtype, in eval mode."""

    unet: HubModel
    vae: HubModel
    whisper: HubModel
    feature_extractor: object
    positional: PositionalEncoding
    device: torch.device
    dtype: torch.dtype
    face_parser: BiSeNet | None = None
    taesd: HubModel | None = None
    layout: ModelLayout | None = None

    @property
    def audio_dim(self) -> int:
        return int(self.whisper.config.d_model)

    @property
    def version(self) -> str:
        """The MuseTalk version the UNet was loaded as ("v15" unless loaded from v1's files)."""
        return self.layout.version if self.layout is not None else "v15"

    @property
    def vae_scaling(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", VAE_SCALING) or VAE_SCALING)


def load_models(
    root: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    version: str = "v15",
    face_parsing: bool | None = None,
    taesd: bool = False,
) -> MuseTalkModels:
    """Load the networks under ``root``. ``face_parsing=None`` uses BiSeNet when its files are there;
    ``taesd=True`` also loads the tiny decoder (``taesd/``)."""
    root = Path(root)
    problems = check_models(root, version=version, face_parsing=bool(face_parsing), taesd=taesd)
    if problems:
        raise MissingModelsError(root, problems)
    layout = ModelLayout(root, version)
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype)
    whisper, extractor = load_whisper(layout.whisper_dir)
    use_parser = layout.has_face_parsing() if face_parsing is None else face_parsing
    models = MuseTalkModels(
        unet=load_unet(layout),
        vae=load_vae(layout.vae_dir),
        whisper=whisper,
        feature_extractor=extractor,
        positional=PositionalEncoding(int(whisper.config.d_model)),
        device=device,
        dtype=torch_dtype,
        face_parser=load_face_parser(layout) if use_parser else None,
        taesd=load_taesd(layout.taesd_dir) if taesd else None,
        layout=layout,
    )
    for module in (models.unet, models.vae, models.whisper, models.positional, models.face_parser, models.taesd):
        if module is not None:
            module.to(device=device, dtype=torch_dtype).eval().requires_grad_(False)
    if models.face_parser is not None:
        models.face_parser.to(dtype=torch.float32)
    return models
