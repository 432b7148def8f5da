"""Tiny seeded MuseTalk networks written in the real file layout, so tests load them through the
same code users run. The architectures are the real ones; only the widths and depths shrink."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from inference.musetalk.bisenet import BiSeNet, Resnet18
from inference.musetalk.configs import (
    TINY_BISENET_WIDTH,
    TINY_TAESD,
    TINY_UNET,
    TINY_VAE,
    TINY_WHISPER,
)
from inference.musetalk.layout import ModelLayout


def _seeded(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def write_tiny_models(
    root: str | Path,
    *,
    seed: int = 0,
    face_parsing: bool = True,
    taesd: bool = False,
    v1: bool = False,
) -> Path:
    """Build the tiny networks with fixed seeds and save them below ``root``; returns ``root``."""
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    root = Path(root)
    versions = ("v15", "v1") if v1 else ("v15",)
    for offset, version in enumerate(versions):
        layout = ModelLayout(root, version)
        _seeded(seed + offset)
        unet = UNet2DConditionModel(**TINY_UNET)
        _perturb(unet, seed + offset)
        layout.unet_config.parent.mkdir(parents=True, exist_ok=True)
        layout.unet_config.write_text(json.dumps({"_class_name": "UNet2DConditionModel", **TINY_UNET}, indent=2))
        torch.save(unet.state_dict(), layout.unet_weights)
    layout = ModelLayout(root)

    _seeded(seed + 10)
    AutoencoderKL(**TINY_VAE).save_pretrained(str(layout.vae_dir), safe_serialization=False)

    _seeded(seed + 20)
    WhisperModel(WhisperConfig(**TINY_WHISPER)).save_pretrained(str(layout.whisper_dir))
    WhisperFeatureExtractor(feature_size=TINY_WHISPER["num_mel_bins"]).save_pretrained(str(layout.whisper_dir))

    if face_parsing:
        _seeded(seed + 30)
        layout.face_parse_weights.parent.mkdir(parents=True, exist_ok=True)
        trunk = Resnet18(TINY_BISENET_WIDTH).state_dict()
        trunk["fc.weight"] = torch.zeros(4, 8 * TINY_BISENET_WIDTH)
        trunk["fc.bias"] = torch.zeros(4)
        torch.save(trunk, layout.resnet_weights)
        torch.save(BiSeNet(width=TINY_BISENET_WIDTH).state_dict(), layout.face_parse_weights)
    if taesd:
        _seeded(seed + 40)
        AutoencoderTiny(**TINY_TAESD).save_pretrained(str(layout.taesd_dir))
    return root


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """diffusers zero-initialises the UNet's output convolutions, which would make every output equal;
    give every parameter some seeded noise so that different inputs give different faces."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
