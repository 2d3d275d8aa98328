"""Architectures: an MLP and the CIFAR ResNet20 of He et al. (2016), with and without skip connections.

ResNet20 follows the paper's CIFAR variant: a 3×3 stem with 16 channels, three stages of three basic blocks
(16, 32, 64 channels; stride 2 at the start of stages 2 and 3), BatchNorm, global average pooling and one linear
layer. Shortcuts are parameter-free ("option A": subsample and zero-pad the channels), which gives the published
0.27M parameters at 3×32×32 with 10 classes. ``resnet20_noshort`` removes the shortcuts, as in Li et al. (2018),
"Visualizing the Loss Landscape of Neural Nets".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "elu": nn.ELU}


class MLP(nn.Module):
    """Flatten, ``depth`` hidden layers of ``width`` units with an activation, then a linear classifier."""

    def __init__(self, in_features: int, num_classes: int, depth: int, width: int, activation: str = "relu"):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = in_features
        for _ in range(depth):
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


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN, plus the shortcut when ``shortcut`` is true, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
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
    """CIFAR-style ResNet with ``6n + 2`` layers (n = blocks per stage; n = 3 gives ResNet20)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        blocks_per_stage: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
        shortcut: bool = True,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        channels = widths[0]
        for stage, width in enumerate(widths):
            blocks = []
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(BasicBlock(channels, width, stride, shortcut))
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
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # [B, 64]
        return self.fc(out)


def build_model(name: str, cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build the architecture ``name`` for inputs of shape ``input_shape`` = (C, H, W).

    Raises:
        ValueError: for an unknown name (config validation normally catches it first).
    """
    channels, height, width = input_shape
    if name == "mlp":
        return MLP(channels * height * width, num_classes, cfg.mlp_depth, cfg.mlp_width, cfg.mlp_activation)
    if name == "resnet20":
        return ResNet(channels, num_classes, blocks_per_stage=3, shortcut=True)
    if name == "resnet20_noshort":
        return ResNet(channels, num_classes, blocks_per_stage=3, shortcut=False)
    raise ValueError(f"unknown model {name!r}; allowed: mlp, resnet20, resnet20_noshort")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (BatchNorm running statistics are buffers and not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
