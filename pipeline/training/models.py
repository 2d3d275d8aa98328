"""Architectures: an MLP and the CIFAR ResNets of He et al. (2016) at any depth 6n + 2 and width, with and without
skip connections, with a choice of normalisation; a user's own model comes from an import path
(:mod:`pipeline.training.custom`).

The ResNets follow the paper's CIFAR variant: a 3×3 stem with 16k channels, three stages of n basic blocks
(16k, 32k, 64k channels for width multiplier k; stride 2 at the start of stages 2 and 3), a normalisation after
every convolution (BatchNorm by default), global average pooling and one linear layer. Shortcuts are
parameter-free ("option A": subsample and zero-pad the channels), which gives the published parameter counts at
3×32×32 with 10 classes (ResNet-20 0.27M, -32 0.46M, -44 0.66M, -56 0.85M, -110 1.7M). ``_noshort`` removes the
shortcuts, as in Li et al. (2018), "Visualizing the Loss Landscape of Neural Nets", whose chaotic landscapes
without skips show at depth 56 and 110, not at 20.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import MODEL_NAMES, RESNET_NAME, RESNET_NORMS, ModelConfig

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "elu": nn.ELU}


class MLP(nn.Module):
    """Flatten, hidden layers of the given widths with an activation each, then a linear classifier."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int], activation: str = "relu"):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = in_features
        for width in hidden:
            layers += [nn.Linear(fan_in, width), _ACTIVATIONS[activation]()]
            fan_in = width
        layers.append(nn.Linear(fan_in, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PadShortcut(nn.Module):
    """Parameter-free shortcut: take every ``stride``-th pixel and zero-pad the new channels ("option A")."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # pad (W_left, W_right, H_top, H_bottom, C_front, C_back): half the new channels on each side
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


def norm_layer(kind: str, channels: int, groups: int = 8) -> nn.Module:
    """The normalisation after each convolution: ``batch`` (``BatchNorm2d``), ``group`` (``GroupNorm`` with the
    largest divisor of ``channels`` not above ``groups``), ``layer`` (``GroupNorm`` with one group: mean and variance
    over channels and pixels of each sample, a per-channel affine map) or ``none`` (identity)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0), channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalisation {kind!r}; allowed: {', '.join(RESNET_NORMS)}")


class BasicBlock(nn.Module):
    """conv3×3-norm-ReLU-conv3×3-norm, plus the shortcut when ``shortcut`` is true, then ReLU. Without a
    normalisation (``norm="none"``) the convolutions carry a bias."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, shortcut: bool, norm: str = "batch", groups: int = 8
    ):
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)
        self.bn1 = norm_layer(norm, out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=bias)
        self.bn2 = norm_layer(norm, out_channels, groups)
        self.shortcut: nn.Module | None = None
        if shortcut:
            needs_projection = stride != 1 or in_channels != out_channels
            self.shortcut = PadShortcut(in_channels, out_channels, stride) if needs_projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return F.relu(out)


class ResNet(nn.Module):
    """CIFAR-style ResNet with ``6n + 2`` layers (n = blocks per stage; n = 3 gives ResNet20, 9 ResNet56).

    ``widths``: channels of the three stages (16k, 32k, 64k for width multiplier k). The normalisation layers are
    named ``bn1``/``bn2`` whatever ``norm`` is, so parameter names do not depend on it.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        blocks_per_stage: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
        shortcut: bool = True,
        norm: str = "batch",
        groups: int = 8,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=norm == "none")
        self.bn1 = norm_layer(norm, widths[0], groups)
        stages = []
        channels = widths[0]
        for stage, width in enumerate(widths):
            blocks = []
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(BasicBlock(channels, width, stride, shortcut, norm, groups))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():  # He initialisation, as in the reference CIFAR implementations
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # [B, 64k]
        return self.fc(out)


def resnet_widths(k: float) -> tuple[int, int, int]:
    """Channels of the three stages for width multiplier ``k``: (16k, 32k, 64k), each a whole number."""
    widths = tuple(16 * m * k for m in (1, 2, 4))
    if any(w != int(w) or w < 1 for w in widths):
        raise ValueError(f"width multiplier {k}: 16 x {k} = {widths[0]:g} is not a whole number of channels")
    return tuple(int(w) for w in widths)  # type: ignore[return-value]


def build_model(name: str, cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build the architecture ``name`` for inputs of shape ``input_shape`` = (C, H, W).

    ``mlp``; ``resnet`` (depth, width multiplier, shortcuts and normalisation from ``cfg``); ``resnet<depth>`` and
    ``resnet<depth>_noshort`` (depth and shortcuts from the name, width and normalisation from ``cfg``: ``resnet20``
    is the network the pipeline always had, weight for weight); or ``package.module:callable``, called as
    ``callable(input_shape, num_classes, **cfg.model_kwargs)`` (see :mod:`pipeline.training.custom`).

    Raises:
        ValueError: for an unknown name (config validation normally catches it first).
        pipeline.errors.DataError: for an import path that does not give a usable model (one line).
    """
    channels, height, width = input_shape
    if ":" in name:
        from pipeline.training.custom import build_custom

        return build_custom(name, input_shape, num_classes, dict(cfg.model_kwargs))
    if name == "mlp":
        hidden = cfg.mlp_widths or (cfg.mlp_width,) * cfg.mlp_depth
        return MLP(channels * height * width, num_classes, hidden, cfg.mlp_activation)
    depth, shortcut = resnet_spec(name, cfg)
    return ResNet(
        channels,
        num_classes,
        blocks_per_stage=(depth - 2) // 6,
        widths=resnet_widths(cfg.resnet_width),
        shortcut=shortcut,
        norm=cfg.resnet_norm,
        groups=cfg.resnet_groups,
    )


def resnet_spec(name: str, cfg: ModelConfig) -> tuple[int, bool]:
    """(depth, shortcut) of a ResNet name: ``resnet`` takes both from ``cfg``, ``resnet<d>[_noshort]`` from the
    name."""
    if name == "resnet":
        return cfg.resnet_depth, cfg.resnet_shortcut
    match = RESNET_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"unknown model {name!r}; allowed: {MODEL_NAMES}")
    depth = int(match.group(1))
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"model {name!r}: a CIFAR ResNet has depth 6n + 2 (8, 14, 20, 32, 44, 56, 110), got {depth}")
    return depth, match.group(2) is None


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (BatchNorm running statistics are buffers and not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
