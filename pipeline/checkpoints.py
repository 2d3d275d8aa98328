"""Reading training checkpoints for analysis: which to analyse, the model they hold, the learning rate in effect."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.config import ModelConfig, TrainConfig, build_section
from pipeline.data import DataError, PreparedData
from pipeline.models import build_model
from pipeline.training import batch_order, learning_rate, list_checkpoints, load_checkpoint


def select_checkpoints(entries: list[dict], selection: str | int) -> list[dict]:
    """The entries (oldest first, as :func:`pipeline.training.list_checkpoints`) picked by ``selection``.

    ``final``: the newest; ``all``: every one; an integer ``k``: every k-th by epoch order (starting with the first),
    plus the newest.
    """
    if not entries:
        return []
    if selection == "final":
        return [entries[-1]]
    if selection == "all":
        return list(entries)
    picked = entries[::selection]
    return picked if picked[-1] is entries[-1] else [*picked, entries[-1]]


def require_checkpoints(checkpoint_dir: str | Path, run: str, *, stage: str = "train") -> list[dict]:
    """The readable checkpoints of ``checkpoint_dir``, or a one-line :class:`DataError` saying how to make them
    (``dvc repro <stage>@<run>``)."""
    entries = list_checkpoints(checkpoint_dir) if Path(checkpoint_dir).is_dir() else []
    if not entries:
        raise DataError(f"{checkpoint_dir}: no readable checkpoints (epoch_*.pt); run `dvc repro {stage}@{run}` first")
    return entries


def model_from_checkpoint(payload: dict, data: PreparedData, *, data_fingerprint: str | None = None) -> nn.Module:
    """The network of a checkpoint payload, weights loaded, in eval mode, on the CPU in float32.

    ``data_fingerprint``: ``data.fingerprint()`` when the caller has it already (it hashes every tensor, so a caller
    reading several checkpoints computes it once); computed here otherwise.

    Raises:
        DataError: when the checkpoint was trained on other data than ``data`` (fingerprints differ).
    """
    config = payload["config"]
    if payload.get("data_fingerprint") != (data_fingerprint or data.fingerprint()):
        raise DataError(f"checkpoint of run {config['name']!r} (epoch {payload['epoch']}) was trained on other data "
                        "than the prepared data; rerun its train stage")
    model_cfg = build_section(ModelConfig, dict(config["model"]), "model")
    model = build_model(config["model_name"], model_cfg, data.input_shape, data.num_classes)
    model.load_state_dict(payload["model"])
    return model.eval()


def next_learning_rate(payload: dict, train_samples: int) -> float:
    """Learning rate of the step that would follow the checkpoint (the one the 2/η stability bound concerns)."""
    cfg = build_section(TrainConfig, dict(payload["config"]["train"]), "train")
    steps_per_epoch = len(batch_order(train_samples, cfg.batch_size, 0, 1))
    return learning_rate(cfg, payload["step"], steps_per_epoch)


def parameters_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


__all__ = ["select_checkpoints", "require_checkpoints", "model_from_checkpoint", "next_learning_rate",
           "parameters_finite", "load_checkpoint"]
