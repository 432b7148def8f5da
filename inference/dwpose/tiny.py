"""A tiny seeded DWPose checkpoint in the real file layout (``{"state_dict": ...}`` with mmpose's key
names), so tests load it through the same code users run. The architecture is the real one; only
the widths, depths and the attention size shrink (``network.TINY``)."""

from __future__ import annotations

from pathlib import Path

import torch

from inference.dwpose.network import TINY, RTMPose, RTMPoseConfig


def tiny_state(seed: int = 0, config: RTMPoseConfig = TINY) -> dict[str, torch.Tensor]:
    """Seeded weights, batch-norm statistics included (so that no layer is an identity)."""
    torch.manual_seed(seed)
    model = RTMPose(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif name.endswith("running_mean"):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
            elif name.endswith(("gamma", "beta", ".g", "res_scale.scale")):
                tensor.copy_(1.0 + 0.1 * torch.randn(tensor.shape, generator=generator))
    return {k: v.clone() for k, v in model.state_dict().items()}


def write_tiny_dwpose(path: str | Path, seed: int = 0, config: RTMPoseConfig = TINY) -> Path:
    """Save a tiny checkpoint at ``path`` (a ``.pth`` file, folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": tiny_state(seed, config)}, path)
    return path
