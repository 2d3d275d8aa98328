"""Shared set-up of the benchmarks: the trained models of the default runs (or fresh ones) and a fair timer.

Every benchmark reports ratios against a baseline measured in the same process, interleaved round by round, so the
machine's speed and load cancel out; absolute times are printed for context only.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import repro  # noqa: E402

# Like with like: the kernels and threads of the stages (params.yaml's repro section), set before torch is imported.
repro.apply_from_params(REPO / "params.yaml")

import torch  # noqa: E402

from pipeline.config import DataConfig, ModelConfig  # noqa: E402
from pipeline.data import load_prepared, prepare_dataset  # noqa: E402
from pipeline.stage import tune_malloc  # noqa: E402
from pipeline.training.checkpoints import list_checkpoints, load_checkpoint  # noqa: E402
from pipeline.training.models import build_model  # noqa: E402

tune_malloc()  # like with like: every process gets the same malloc thresholds (see README, "Benchmarks")


def load_data():
    """The prepared data of the pipeline when present (same probe set as the stages), else digits defaults."""
    folder = REPO / "artifacts" / "data"
    return load_prepared(folder) if (folder / "data.pt").is_file() else prepare_dataset(DataConfig())


def final_checkpoint(folder: Path) -> Path | None:
    """The newest readable checkpoint in ``folder``, or None when there is none."""
    entries = list_checkpoints(folder) if folder.is_dir() else []
    return folder / entries[-1]["file"] if entries else None


def load_model(run: str, model_name: str, data) -> tuple[torch.nn.Module, str]:
    """The final checkpoint of ``run`` when the pipeline has trained it, else a seeded fresh network."""
    final = final_checkpoint(REPO / "artifacts" / "checkpoints" / run)
    model = build_model(model_name, ModelConfig(), data.input_shape, data.num_classes)
    if final is not None:
        model.load_state_dict(load_checkpoint(final)["model"])
        origin = f"{run}/{final.name}"
    else:
        torch.manual_seed(0)
        model = build_model(model_name, ModelConfig(), data.input_shape, data.num_classes)
        origin = "fresh initialisation (run `make run` first for trained weights)"
    return model.eval(), origin


def interleaved(candidates: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each candidate, measured round-robin (one call of each per round)."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
