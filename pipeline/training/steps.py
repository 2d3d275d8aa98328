"""What one training step is made of, as pure functions: the learning-rate schedule (a function of the global
step), the seeded batch order of an epoch, the loss (cross-entropy, or squared error to the one-hot target) and
evaluation over a split. Resuming from any checkpoint replays exactly these."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import FULL_BATCH, TrainConfig


def learning_rate(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate for global step ``step`` (0-based) of the schedule ``cfg.schedule``.

    ``cosine``: :math:`\\eta_t = \\tfrac12 \\eta (1 + \\cos(\\pi t / T))` with ``T`` the total number of steps;
    ``step``: :math:`\\eta \\gamma^k` with ``k`` the number of milestones (epochs) already reached.
    """
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        epoch = step // steps_per_epoch
        return cfg.lr * cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)
    total = cfg.epochs * steps_per_epoch
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * step / total))


def batch_order(n: int, batch_size: int | str, seed: int, epoch: int) -> list[torch.Tensor]:
    """Index batches for ``epoch`` (1-based); a trailing batch of one sample is dropped (BatchNorm needs two).

    ``batch_size`` ``"full"`` gives one batch of all ``n`` samples (full-batch gradient descent).
    """
    if batch_size == FULL_BATCH:
        batch_size = n
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=generator)
    batches = list(perm.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()
    return batches


def batch_loss(
    outputs: torch.Tensor, targets: torch.Tensor, loss: str = "cross_entropy", reduction: str = "mean"
) -> torch.Tensor:
    """The training loss of a batch: ``cross_entropy``, or ``mse``, the squared error to the one-hot target summed
    over the outputs (no factor ½; the same per-sample loss as the curvature operators), averaged over the batch."""
    if loss == "cross_entropy":
        return F.cross_entropy(outputs, targets, reduction=reduction)
    if loss == "mse":
        per_sample = ((outputs - F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)) ** 2).sum(dim=-1)
        return per_sample.mean() if reduction == "mean" else per_sample.sum()
    raise ValueError(f"loss: unknown name {loss!r}; allowed: cross_entropy, mse")


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, loss: str = "cross_entropy"
) -> tuple[float, float]:
    """Mean loss (``cross_entropy`` or ``mse``) and accuracy over all of ``(x, y)`` in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss_sum += batch_loss(logits, target, loss, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    model.train(was_training)
    return loss_sum / len(x), correct / len(x)


def parameter_norm(model: nn.Module) -> float:
    return torch.linalg.vector_norm(torch.stack([p.detach().norm() for p in model.parameters()])).item()
