"""The small JSON files that ``dvc plots`` draws (:data:`PLOT_EXPORTS`): one per run and quantity, from the run
tables, strict JSON (non-finite numbers as null). The per-epoch training curves are not among them: DVCLive writes
those during training (:mod:`pipeline.live`, ``reports/live/<run>/``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")  # no display: figures are files

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.io import atomic_path, finite_tree  # noqa: E402
from pipeline.report.figures import eigen_rows
from pipeline.report.summary import RunData

# <quantity folder>: (x field, y fields, meaning); one JSON file per run, so `dvc plots diff` overlays revisions per run.  # noqa: E501
PLOT_EXPORTS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "sharpness": ("epoch", ("lambda_max", "two_over_lr"), "Hessian λmax per checkpoint and 2/η"),
    "density": ("lambda", ("density",), "smoothed spectral density, final checkpoint"),
    "partner_path": ("t", ("train_loss", "test_loss"), "loss from the run (t=0) to its second-seed model (t=1)"),
    "random_line": ("alpha", ("train_loss", "test_loss"), "loss along the filter-normalised random direction"),
    "tracked_sharpness": (
        "step",
        ("lambda_max", "stability_threshold", "grad_sharpness", "batch_sharpness"),
        "λmax tracked during training, the optimiser's stability threshold, g'Hg/|g|² and the batch sharpness",
    ),
    "step_model": (
        "step",
        ("actual_change", "predicted_change"),
        "change of the probe loss over a tracked step and its quadratic-model prediction",
    ),
}


def _path_frame(line: pd.DataFrame, path: str, x: str) -> pd.DataFrame:
    rows = line[line.path == path]
    if rows.empty:
        return pd.DataFrame()
    wide = rows.pivot_table(index="alpha", columns="split", values="loss", aggfunc="first", observed=True)
    wide = wide.rename(columns={split: f"{split}_loss" for split in wide.columns}).reset_index()
    # both columns always (NaN for a split not scanned), so every file has the fields its dvc.yaml plot names
    return wide.rename(columns={"alpha": x}).reindex(columns=[x, "train_loss", "test_loss"])


def plot_exports(data: RunData) -> dict[str, pd.DataFrame]:
    """The frames of :data:`PLOT_EXPORTS` that this run's tables allow (an empty table gives none)."""
    frames: dict[str, pd.DataFrame] = {}
    spectrum = data.tables.get("hessian_spectrum")
    if spectrum is not None and not spectrum.empty:
        top = eigen_rows(spectrum).query("index == 0").sort_values("epoch")
        if len(top):
            frames["sharpness"] = pd.DataFrame(
                {
                    "epoch": top.epoch.to_numpy(),
                    "lambda_max": top.value.to_numpy(),
                    "two_over_lr": np.where(top.lr > 0, 2.0 / top.lr.where(top.lr > 0, 1.0), np.nan),
                }
            )
    tracked = data.tables.get("sharpness_history")
    if tracked is not None and not tracked.empty:
        rows = tracked.sort_values("step")
        x, ys, _ = PLOT_EXPORTS["tracked_sharpness"]  # tables of older code lack batch_sharpness: NaN, left out
        frames["tracked_sharpness"] = rows.reindex(columns=[x, *ys])
        frames["step_model"] = rows[["step", "actual_change", "predicted_change"]]
    density = data.tables.get("hessian_density")
    if density is not None and not density.empty:
        smooth = density[(density.kind == "smoothed") & (density.operator == "hessian")]
        if len(smooth):
            frames["density"] = smooth[smooth.epoch == smooth.epoch.max()][["lambda", "density"]]
    line = data.tables.get("interpolation_1d")
    if line is not None and not line.empty:
        for name, path, x in (("partner_path", "partner", "t"), ("random_line", "random", "alpha")):
            frame = _path_frame(line, path, x)
            if len(frame):
                frames[name] = frame
    return {name: frame.reset_index(drop=True) for name, frame in frames.items()}


def write_plot_exports(runs: Mapping[str, RunData], out_dir: str | Path) -> list[Path]:
    """``<out_dir>/<quantity>/<run>.json`` for every export a run has (see :data:`PLOT_EXPORTS`).

    JSON records rather than CSV: a missing number is ``null``, which vega leaves out of the line; DVC reads an empty
    CSV cell as 0 and would draw it (2/η where η = 0 at the end of a cosine schedule).
    """
    written = []
    for name, data in runs.items():
        for quantity, frame in plot_exports(data).items():
            path = Path(out_dir) / quantity / f"{name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            records = [
                {k: (v if isinstance(v, str) else finite_tree(v)) for k, v in row.items()}
                for row in frame.astype(object).to_dict(orient="records")
            ]
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(records, allow_nan=False) + "\n")
            written.append(path)
    return written
