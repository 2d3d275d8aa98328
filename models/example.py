"""An example of a model from an import path: ``model: "models.example:small_cnn"`` in a run of params.yaml.

A factory is called as ``factory(input_shape, num_classes, **model_kwargs)`` with ``input_shape`` = (C, H, W) and
returns an ``nn.Module`` mapping ``(B, C, H, W)`` to ``(B, num_classes)`` logits. Any keyword it takes can be set per
run with ``model_kwargs`` (plain values).
"""

from __future__ import annotations

from torch import nn


def small_cnn(input_shape: tuple[int, int, int], num_classes: int, channels: int = 8, hidden: int = 32) -> nn.Module:
    """Two 3x3 convolutions (the second with stride 2), global average pooling, one hidden layer, the classifier."""
    in_channels = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * channels, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
