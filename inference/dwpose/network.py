"""RTMPose (CSPNeXt backbone, RTMCC head) in plain PyTorch, laid out so that mmpose checkpoints load by
their own key names: mmcv's ``ConvModule`` is ``conv``/``bn``/``activate``, its depthwise-separable
module ``depthwise_conv``/``pointwise_conv``, the head's attention unit ``gau``.

Only what inference with DWPose's ``rtmpose-l_8xb32-270e_coco-ubody-wholebody-384x288`` needs is
here: the P5 CSPNeXt with channel attention, SiLU and batch norm (eps 1e-5), and the RTMCC head with
a self-attention GAU without relative position bias or rotary encoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# CSPNeXt P5 stages: in channels, out channels, blocks, identity shortcut in blocks, SPP
P5_STAGES = (
    (64, 128, 3, True, False),
    (128, 256, 6, True, False),
    (256, 512, 6, True, False),
    (512, 1024, 3, False, True),
)


@dataclass(frozen=True)
class RTMPoseConfig:
    """The sizes that shape the network (the defaults are DWPose-l at 288x384, 133 keypoints)."""

    widen_factor: float = 1.0
    deepen_factor: float = 1.0
    input_size: tuple[int, int] = (288, 384)  # width, height
    keypoints: int = 133
    hidden_dims: int = 256
    attention_dims: int = 128  # ``s`` of the GAU
    expansion_factor: int = 2
    final_kernel: int = 7
    split_ratio: float = 2.0  # SimCC bins per input pixel

    @property
    def out_channels(self) -> int:
        return int(P5_STAGES[-1][1] * self.widen_factor)

    @property
    def feature_size(self) -> tuple[int, int]:
        """Width and height of the backbone's output (stride 32)."""
        return math.ceil(self.input_size[0] / 32), math.ceil(self.input_size[1] / 32)


DWPOSE_L = RTMPoseConfig()
TINY = RTMPoseConfig(widen_factor=0.125, deepen_factor=0.34, hidden_dims=32, attention_dims=16)


class ConvModule(nn.Sequential):
    """Convolution, batch norm and SiLU (mmcv's ``ConvModule`` with those settings)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-5)
        self.activate = nn.SiLU(inplace=True)


class DepthwiseSeparableConvModule(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.depthwise_conv = ConvModule(cin, cin, kernel, groups=cin)
        self.pointwise_conv = ConvModule(cin, cout, 1)


class CSPNeXtBlock(nn.Module):
    def __init__(self, channels: int, add_identity: bool) -> None:
        super().__init__()
        self.conv1 = ConvModule(channels, channels, 3)
        self.conv2 = DepthwiseSeparableConvModule(channels, channels, 5)
        self.add_identity = add_identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv2(self.conv1(x))
        return out + x if self.add_identity else out


class ChannelAttention(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = nn.functional.hardsigmoid(self.fc(x.mean(dim=(2, 3), keepdim=True)))
        return x * weight


class CSPLayer(nn.Module):
    def __init__(self, channels: int, blocks: int, add_identity: bool) -> None:
        super().__init__()
        mid = int(channels * 0.5)
        self.main_conv = ConvModule(channels, mid, 1)
        self.short_conv = ConvModule(channels, mid, 1)
        self.final_conv = ConvModule(2 * mid, channels, 1)
        self.blocks = nn.Sequential(*(CSPNeXtBlock(mid, add_identity) for _ in range(blocks)))
        self.attention = ChannelAttention(2 * mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = torch.cat([self.blocks(self.main_conv(x)), self.short_conv(x)], dim=1)
        out: torch.Tensor = self.final_conv(self.attention(both))
        return out


class SPPBottleneck(nn.Module):
    def __init__(self, channels: int, kernels: tuple[int, ...] = (5, 9, 13)) -> None:
        super().__init__()
        mid = channels // 2
        self.conv1 = ConvModule(channels, mid, 1)
        self.poolings = nn.ModuleList(nn.MaxPool2d(k, 1, k // 2) for k in kernels)
        self.conv2 = ConvModule(mid * (len(kernels) + 1), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        out: torch.Tensor = self.conv2(torch.cat([x, *(pool(x) for pool in self.poolings)], dim=1))
        return out


class CSPNeXt(nn.Module):
    """The backbone; returns the last stage's features (stride 32)."""

    def __init__(self, config: RTMPoseConfig) -> None:
        super().__init__()
        widen = config.widen_factor
        first = int(P5_STAGES[0][0] * widen)
        self.stem = nn.Sequential(
            ConvModule(3, int(P5_STAGES[0][0] * widen // 2), 3, stride=2),
            ConvModule(int(P5_STAGES[0][0] * widen // 2), int(P5_STAGES[0][0] * widen // 2), 3),
            ConvModule(int(P5_STAGES[0][0] * widen // 2), first, 3),
        )
        self.stage_names: list[str] = []
        for i, (cin, cout, blocks, identity, spp) in enumerate(P5_STAGES):
            cin, cout = int(cin * widen), int(cout * widen)
            layers: list[nn.Module] = [ConvModule(cin, cout, 3, stride=2)]
            if spp:
                layers.append(SPPBottleneck(cout))
            layers.append(CSPLayer(cout, max(round(blocks * config.deepen_factor), 1), identity))
            self.add_module(f"stage{i + 1}", nn.Sequential(*layers))
            self.stage_names.append(f"stage{i + 1}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x


class ScaleNorm(nn.Module):
    """x / (||x|| / sqrt(dim)) * g, with the norm clamped at eps."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.scale = dim**-0.5
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True) * self.scale
        out: torch.Tensor = x / norm.clamp(min=self.eps) * self.g
        return out


class Scale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class GatedAttentionUnit(nn.Module):
    """RTMCC's self-attention GAU over the keypoint tokens (no position bias, no rotary encoding)."""

    def __init__(self, dims: int, s: int, expansion_factor: int) -> None:
        super().__init__()
        self.e = dims * expansion_factor
        self.s = s
        self.ln = ScaleNorm(dims)
        self.uv = nn.Linear(dims, 2 * self.e + s, bias=False)
        self.gamma = nn.Parameter(torch.ones(2, s))
        self.beta = nn.Parameter(torch.zeros(2, s))
        self.o = nn.Linear(self.e, dims, bias=False)
        self.res_scale = Scale(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        uv = nn.functional.silu(self.uv(self.ln(x)))
        u, v, base = torch.split(uv, [self.e, self.e, self.s], dim=2)
        qk = base.unsqueeze(2) * self.gamma + self.beta
        q, k = qk.unbind(dim=2)
        kernel = torch.square(torch.relu(torch.bmm(q, k.transpose(1, 2)) / math.sqrt(self.s)))
        out: torch.Tensor = self.res_scale(x) + self.o(u * torch.bmm(kernel, v))
        return out


class RTMCCHead(nn.Module):
    """Features -> one SimCC vector per keypoint along x (``W * split``) and y (``H * split``)."""

    def __init__(self, config: RTMPoseConfig) -> None:
        super().__init__()
        fw, fh = config.feature_size
        self.final_layer = nn.Conv2d(
            config.out_channels, config.keypoints, config.final_kernel, padding=config.final_kernel // 2
        )
        self.mlp = nn.Sequential(ScaleNorm(fw * fh), nn.Linear(fw * fh, config.hidden_dims, bias=False))
        self.gau = GatedAttentionUnit(config.hidden_dims, config.attention_dims, config.expansion_factor)
        self.cls_x = nn.Linear(config.hidden_dims, int(config.input_size[0] * config.split_ratio), bias=False)
        self.cls_y = nn.Linear(config.hidden_dims, int(config.input_size[1] * config.split_ratio), bias=False)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.gau(self.mlp(torch.flatten(self.final_layer(features), 2)))
        return self.cls_x(tokens), self.cls_y(tokens)


class RTMPose(nn.Module):
    """Normalised ``[B, 3, H, W]`` RGB crops -> SimCC x ``[B, K, W*split]`` and y ``[B, K, H*split]``."""

    def __init__(self, config: RTMPoseConfig = DWPOSE_L) -> None:
        super().__init__()
        self.config = config
        self.backbone = CSPNeXt(config)
        self.head = RTMCCHead(config)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out: tuple[torch.Tensor, torch.Tensor] = self.head(self.backbone(images))
        return out
