"""The report: a summary table of the runs, overview figures, small JSON exports for ``dvc plots``, and the two
documents ``reports/index.html`` (self-contained: every figure embedded, opens offline) and ``reports/README.md``
(figures beside it, renders on any git host).

Everything here reads the tidy tables and ``metrics.json`` that the earlier stages wrote; nothing is recomputed.
A run whose stages are missing or that diverged still gets its row, with the reason in its status.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display: figures are files

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.io import atomic_path  # noqa: E402
from pipeline.plotting import save_figure  # noqa: E402
from pipeline.tables import read_metadata  # noqa: E402

# The stages whose metrics a complete run has (``<tables>/<run>/<stage>_metrics.json``).
STAGES = ("train", "hessian", "partner", "interpolate", "surface")

# (key, header, unit or meaning) of the summary table, in column order.
SUMMARY_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("run", "run", ""),
    ("model", "model", ""),
    ("status", "status", "completed, diverged at step N, or the stages still missing"),
    ("test_accuracy", "test acc.", "fraction correct on the test split"),
    ("train_accuracy", "train acc.", "fraction correct on the train split"),
    ("generalization_gap", "gen. gap", "test loss − train loss (nats)"),
    ("accuracy_gap", "acc. gap", "train acc. − test acc."),
    ("lambda_max", "λmax", "top Hessian eigenvalue at the final checkpoint (probe set)"),
    ("trace", "trace", "Hessian trace (Hutch++ when computed, else Hutchinson)"),
    ("trace_stderr", "± trace", "standard error of the trace estimate"),
    ("barrier", "barrier", "loss barrier to the second-seed model (train split, nats)"),
    ("epsilon_sharpness", "ε-sharp.", "largest loss increase found in an L2 ball of radius hessian.flatness_radius"),
    ("pac_bayes_sigma", "σ PAC", "largest isotropic weight-noise scale keeping the expected loss increase within "
     "hessian.pac_bayes_bound (larger: flatter)"),
    ("noise_scale", "B_simple", "gradient noise scale tr(Σ)/|g|² at the final checkpoint (McCandlish et al. 2018)"),
    ("lambda_max_lr_over_2", "λmax·η/2", "≥ 1: plain gradient descent at the peak learning rate η is unstable along "
     "the top eigenvector (heavy-ball momentum β moves the threshold to 1 + β)"),
    ("lr", "η", "peak learning rate"),
    ("epochs", "epochs", ""),
)

# Files read per run, by name (all optional: a missing table leaves its figures and exports out).
RUN_TABLES = ("train_history", "sharpness_history", "hessian_spectrum", "hessian_density", "interpolation_1d")


@dataclass
class RunData:
    """One run's tables (the ones present) and their Parquet metadata."""

    name: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)


def load_runs(tables_dir: str | Path, runs: Sequence[str]) -> dict[str, RunData]:
    """Read every run's tables of :data:`RUN_TABLES` (and any other ``*.parquet``'s metadata) that exist."""
    loaded = {}
    for run in runs:
        data = RunData(run)
        folder = Path(tables_dir) / run
        for path in sorted(folder.glob("*.parquet")):
            data.metadata[path.stem] = read_metadata(path)
            if path.stem in RUN_TABLES:
                data.tables[path.stem] = pd.read_parquet(path)
        loaded[run] = data
    return loaded


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def summary_rows(metrics: Mapping[str, Mapping[str, Any]], runs: Sequence[str]) -> list[dict[str, Any]]:
    """One row per configured run with the :data:`SUMMARY_COLUMNS` (``None`` where a number is unavailable)."""
    rows = []
    for run in runs:
        m = metrics.get(run, {})
        train, hessian, interp = m.get("train", {}), m.get("hessian", {}), m.get("interpolate", {})
        missing = [stage for stage in STAGES if stage not in m]
        if train.get("status") == "diverged":
            status = f"diverged at step {train.get('diverged_step')}"
        elif "train" not in m:
            status = "not trained"
        elif missing:
            status = "missing: " + ", ".join(missing)
        else:
            status = str(train.get("status", "completed"))
        if interp.get("status") == "diverged" and not status.startswith("diverged"):
            status += " (scans: diverged)"
        train_acc, test_acc = _number(train.get("train_accuracy")), _number(train.get("test_accuracy"))
        trace = hessian.get("trace_hutchpp", hessian.get("trace_hutchinson"))
        trace_se = hessian.get("trace_hutchpp_stderr" if "trace_hutchpp" in hessian else "trace_hutchinson_stderr")
        rows.append({
            "run": run,
            "model": train.get("model_name") or m.get("model") or "",
            "status": status,
            "test_accuracy": test_acc,
            "train_accuracy": train_acc,
            "generalization_gap": _number(train.get("generalization_gap")),
            "accuracy_gap": None if train_acc is None or test_acc is None else train_acc - test_acc,
            "lambda_max": _number(hessian.get("lambda_max")),
            "trace": _number(trace),
            "trace_stderr": _number(trace_se),
            "barrier": _number(interp.get("barrier_train", interp.get("barrier"))),
            "epsilon_sharpness": _number(hessian.get("epsilon_sharpness_absolute")),
            "pac_bayes_sigma": _number(hessian.get("pac_bayes_sigma_isotropic")),
            "noise_scale": _number(hessian.get("noise_scale")),
            "lambda_max_lr_over_2": _number(hessian.get("lambda_max_lr_over_2")),
            "lr": None,
            "epochs": train.get("epochs"),
        })
    return rows


def fill_from_config(rows: list[dict[str, Any]], runs: Mapping[str, RunData]) -> None:
    """Model name and peak learning rate from the config stored with each run's training table."""
    for row in rows:
        config = runs.get(row["run"], RunData(row["run"])).metadata.get("train_history", {}).get("run", {})
        row["model"] = row["model"] or config.get("model_name", "")
        row["lr"] = _number(config.get("train", {}).get("lr"))


def format_value(value: Any) -> str:
    """4 significant digits for floats, ``—`` for a missing or non-finite number."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# --------------------------------------------------------------------------------------------------- figures


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _epoch_rows(history: pd.DataFrame) -> pd.DataFrame:
    rows = history[history.scope == "epoch"] if "scope" in history else history
    return rows.sort_values("epoch")


def plot_training_curves(runs: Mapping[str, RunData], path: str | Path) -> Path:
    """Train (solid) and test (dashed) loss on a log scale, and test accuracy, over epochs; one colour per run."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    drawn = 0
    for i, (name, data) in enumerate(runs.items()):
        history = data.tables.get("train_history")
        if history is None or history.empty:
            continue
        rows = _epoch_rows(history)
        color = f"C{i % 10}"
        finite = lambda s: s.where(np.isfinite(s) & (s > 0))  # noqa: E731 (log scale: gaps, not zeros)
        ax_loss.plot(rows.epoch, finite(rows.train_loss), "-", color=color, label=f"{name} train")
        ax_loss.plot(rows.epoch, finite(rows.test_loss), "--", color=color, label=f"{name} test")
        ax_acc.plot(rows.epoch, rows.test_accuracy, "-", color=color, label=name)
        drawn += 1
    if not drawn:
        _empty(ax_loss, "no training history")
        _empty(ax_acc, "no training history")
    else:
        ax_loss.set_yscale("log")
        ax_loss.set(xlabel="epoch", ylabel="cross-entropy (nats)", title="loss: train (solid), test (dashed)")
        ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
        for ax in (ax_loss, ax_acc):
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    return save_figure(fig, path)


def _eigen(spectrum: pd.DataFrame, quantity: str = "eigenvalue") -> pd.DataFrame:
    s = spectrum
    return s[(s.operator == "hessian") & (s.group == "all") & (s.quantity == quantity)]


def plot_sharpness_overview(runs: Mapping[str, RunData], path: str | Path) -> Path:
    """λmax over the checkpoints for every run, each against its own stability bound 2/η (thin line, same colour)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = 0
    bounds: dict[tuple, list[tuple[str, str]]] = {}
    for i, (name, data) in enumerate(runs.items()):
        spectrum = data.tables.get("hessian_spectrum")
        if spectrum is None or spectrum.empty:
            continue
        top = _eigen(spectrum).query("index == 0").sort_values("epoch")
        if top.empty:
            continue
        color = f"C{i % 10}"
        ax.plot(top.epoch, top.value.where(top.value > 0), "o-", ms=3, color=color, label=rf"{name} $\lambda_{{max}}$")
        bound = top[top.lr > 0]
        if len(bound):
            bounds.setdefault(tuple(zip(bound.epoch.tolist(), bound.lr.tolist())), []).append((name, color))
        drawn += 1
    for schedule, owners in bounds.items():  # runs with the same schedule share one line
        epochs, lrs = np.array(schedule).T
        shared = len(owners) > 1 or len(bounds) == 1
        ax.plot(epochs, 2.0 / lrs, "-", lw=1, color="k" if shared else owners[0][1], alpha=0.8,
                label=r"$2/\eta$" + ("" if len(bounds) == 1 else " (" + ", ".join(n for n, _ in owners) + ")"))
    if not drawn:
        _empty(ax, "no Hessian spectrum")
    else:
        ax.set_yscale("log")
        ax.set(xlabel="epoch", ylabel="curvature", title=r"sharpness $\lambda_{max}$ against the stability bound $2/\eta$")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def plot_tracked_sharpness(tables: Mapping[str, pd.DataFrame], path: str | Path, *, title: str = "") -> Path:
    """The ``sharpness_history`` tables of some runs (``{run: frame}``), two panels.

    Left: tracked λmax (solid) and the curvature along the gradient g'Hg/|g|² (dotted) over the steps, each run
    against its optimiser's stability threshold (dashed; 2/η for plain gradient descent, (2+2β)/η with momentum).
    Right: how well the quadratic model predicts the change of the probe loss over one step, as
    |actual − predicted| / |first-order term|, against η·λmax/2 (1 = the edge of stability).
    """
    fig, (ax_sharp, ax_model) = plt.subplots(1, 2, figsize=(11, 4))
    drawn, spans, edges = 0, [], []
    thresholds: dict[tuple, list[tuple[str, str, bool]]] = {}  # runs with the same schedule share one line
    for i, (name, frame) in enumerate(tables.items()):
        if frame is None or frame.empty:
            continue
        rows = frame.sort_values("step")
        color = f"C{i % 10}"
        positive = lambda s: s.where(np.isfinite(s) & (s > 0))  # noqa: E731 (log scale: gaps, not zeros)
        ax_sharp.plot(rows.step, positive(rows.lambda_max), "-", color=color, lw=1.2, label=rf"{name} $\lambda_{{max}}$")
        ax_sharp.plot(rows.step, positive(rows.grad_sharpness), ":", color=color, lw=1,
                      label=rf"{name} $g^\top Hg/\|g\|^2$")
        threshold = rows.stability_threshold.where(np.isfinite(rows.stability_threshold))
        if threshold.notna().any():
            momentum = not np.allclose(threshold.dropna(), rows.two_over_lr[threshold.notna()], rtol=1e-9)
            key = tuple(zip(rows.step.tolist(), threshold.round(12).tolist()))
            thresholds.setdefault(key, []).append((name, color, momentum))
        spans += [float(v) for v in (rows.lambda_max.min(), rows.lambda_max.max(), threshold.min(), threshold.max())
                  if math.isfinite(v)]
        relative = (rows.model_error.abs() / rows.first_order.abs()).where(rows.first_order.abs() > 0)
        edge = rows.lr * rows.lambda_max / 2.0
        edges += [float(v) for v in edge if math.isfinite(v) and v > 0]
        ax_model.scatter(edge, positive(relative), s=8, color=color, alpha=0.7, label=name)
        drawn += 1
    for schedule, owners in thresholds.items():
        steps, values = np.array(schedule, dtype=float).T
        shared = len(owners) > 1 or len(thresholds) == 1
        label = r"$(2+2\beta)/\eta$" if owners[0][2] else r"$2/\eta$"
        ax_sharp.plot(steps, values, "--", lw=1, color="k" if shared else owners[0][1], alpha=0.8,
                      label=label + ("" if len(thresholds) == 1 else " (" + ", ".join(n for n, _, _ in owners) + ")"))
    if not drawn:
        _empty(ax_sharp, "no tracked sharpness (train.track_sharpness_every: 0)")
        _empty(ax_model, "no tracked steps")
    else:
        positive_spans = [v for v in spans if v > 0]
        if positive_spans and max(positive_spans) > 30 * min(positive_spans):  # linear shows "at 2/η" best
            ax_sharp.set_yscale("log")
        else:
            ax_sharp.set_ylim(bottom=0, top=1.15 * max(spans + [1e-12]))
        ax_sharp.set(xlabel="step", ylabel="curvature (probe set)",
                     title=title or r"tracked $\lambda_{max}$ against the stability threshold")
        ax_model.set_yscale("log")
        if edges and max(edges) > 30 * min(edges):
            ax_model.set_xscale("log")
        ax_model.axvline(1.0, color="k", lw=1, ls="--")
        ax_model.set(xlabel=r"$\eta\,\lambda_{max}/2$ (1: edge of stability)",
                     ylabel=r"$|\Delta L - \Delta L_{quad}|\,/\,|g^\top\Delta\theta|$",
                     title="quadratic model of the step taken: relative error")
        for ax in (ax_sharp, ax_model):
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_dynamics_overview(runs: Mapping[str, RunData], path: str | Path) -> Path:
    """:func:`plot_tracked_sharpness` of every run that tracked its sharpness during training."""
    return plot_tracked_sharpness({name: data.tables.get("sharpness_history") for name, data in runs.items()}, path)


def plot_spectra_overview(runs: Mapping[str, RunData], path: str | Path) -> Path:
    """Left: the top-k Hessian eigenvalues at the final checkpoint. Right: the spectral densities (SLQ, final
    checkpoint) of every run on one log-density axis."""
    fig, (ax_top, ax_density) = plt.subplots(1, 2, figsize=(11, 4))
    top_drawn = density_drawn = 0
    for i, (name, data) in enumerate(runs.items()):
        color = f"C{i % 10}"
        spectrum = data.tables.get("hessian_spectrum")
        if spectrum is not None and not spectrum.empty:
            eig = _eigen(spectrum)
            if len(eig):
                last = eig[eig.epoch == eig.epoch.max()].sort_values("index")
                ax_top.plot(last["index"] + 1, last.value, "o-", color=color, label=f"{name} (epoch {last.epoch.iloc[0]})")
                top_drawn += 1
        density = data.tables.get("hessian_density")
        if density is not None and not density.empty:
            smooth = density[(density.kind == "smoothed") & (density.operator == "hessian")]
            if len(smooth):
                smooth = smooth[smooth.epoch == smooth.epoch.max()]
                floor = 1e-12 * max(float(smooth.density.max()), 1e-300)
                ax_density.plot(smooth["lambda"], np.maximum(smooth.density, floor), color=color, lw=1, label=name)
                density_drawn += 1
    if top_drawn:
        ax_top.set_yscale("symlog", linthresh=1e-3)
        ax_top.set(xlabel="rank k", ylabel=r"$\lambda_k$", title="top Hessian eigenvalues, final checkpoint")
        ax_top.grid(True, alpha=0.3)
        ax_top.legend(fontsize=7)
    else:
        _empty(ax_top, "no Hessian spectrum")
    if density_drawn:
        ax_density.set_yscale("log")
        ax_density.set(xlabel=r"eigenvalue $\lambda$", ylabel="density (smoothed)",
                       title="spectral density (stochastic Lanczos quadrature)")
        ax_density.grid(True, alpha=0.3)
        ax_density.legend(fontsize=7)
    else:
        _empty(ax_density, "no spectral density")
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------ dvc plots exports

# <quantity folder>: (x field, y fields, meaning); one JSON file per run, so `dvc plots diff` overlays revisions per run.
PLOT_EXPORTS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "loss": ("epoch", ("train_loss", "test_loss"), "cross-entropy per epoch"),
    "accuracy": ("epoch", ("train_accuracy", "test_accuracy"), "accuracy per epoch"),
    "sharpness": ("epoch", ("lambda_max", "two_over_lr"), "Hessian λmax per checkpoint and 2/η"),
    "density": ("lambda", ("density",), "smoothed spectral density, final checkpoint"),
    "partner_path": ("t", ("train_loss", "test_loss"), "loss from the run (t=0) to its second-seed model (t=1)"),
    "random_line": ("alpha", ("train_loss", "test_loss"), "loss along the filter-normalised random direction"),
    "tracked_sharpness": ("step", ("lambda_max", "stability_threshold", "grad_sharpness"),
                          "λmax tracked during training, the optimiser's stability threshold and g'Hg/|g|²"),
    "step_model": ("step", ("actual_change", "predicted_change"),
                   "change of the probe loss over a tracked step and its quadratic-model prediction"),
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
    history = data.tables.get("train_history")
    if history is not None and not history.empty:
        rows = _epoch_rows(history)
        frames["loss"] = rows[["epoch", "train_loss", "test_loss"]]
        frames["accuracy"] = rows[["epoch", "train_accuracy", "test_accuracy"]]
    spectrum = data.tables.get("hessian_spectrum")
    if spectrum is not None and not spectrum.empty:
        top = _eigen(spectrum).query("index == 0").sort_values("epoch")
        if len(top):
            frames["sharpness"] = pd.DataFrame({
                "epoch": top.epoch.to_numpy(), "lambda_max": top.value.to_numpy(),
                "two_over_lr": np.where(top.lr > 0, 2.0 / top.lr.where(top.lr > 0, 1.0), np.nan)})
    tracked = data.tables.get("sharpness_history")
    if tracked is not None and not tracked.empty:
        rows = tracked.sort_values("step")
        frames["tracked_sharpness"] = rows[["step", "lambda_max", "stability_threshold", "grad_sharpness"]]
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
            records = [{k: (v if isinstance(v, str) or math.isfinite(v) else None) for k, v in row.items()}
                       for row in frame.astype(object).to_dict(orient="records")]
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(records, allow_nan=False) + "\n")
            written.append(path)
    return written


# ------------------------------------------------------------------------------------------------ provenance

LIBRARIES = ("torch", "torchvision", "numpy", "pandas", "pyarrow", "scipy", "matplotlib", "curvlinops-for-pytorch",
             "prefect", "dvc")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


def provenance_rows(runs: Mapping[str, RunData]) -> list[dict[str, str]]:
    """Per run and table: the git revision, code and data fingerprints and torch version recorded with it."""
    rows = []
    for name, data in runs.items():
        for table, meta in sorted(data.metadata.items()):
            prov = meta.get("provenance", {})
            rows.append({"run": name, "table": table, "git_revision": str(prov.get("git_revision", "unknown")),
                         "code": str(prov.get("code_fingerprint", ""))[:12],
                         "data": str(meta.get("data_fingerprint", ""))[:12], "torch": str(prov.get("torch", ""))})
    return rows


def recorded_settings(runs: Mapping[str, RunData]) -> dict[str, dict[str, Any]]:
    """The settings stored with the tables: each run's model and train config, and the hessian and landscape
    sections the scans were made with (taken from the first run that has them)."""
    settings: dict[str, dict[str, Any]] = {}
    for name, data in runs.items():
        run = data.metadata.get("train_history", {}).get("run")
        if run:
            settings[f"runs.{name}"] = run
        for table, section in (("hessian_spectrum", "hessian"), ("surface_2d", "landscape")):
            value = data.metadata.get(table, {}).get(section)
            if value and section not in settings:
                settings[section] = value
    return settings


@dataclass
class Report:
    """What both documents show."""

    summary: list[dict[str, Any]]
    figures: list[tuple[str, Path, str]]  # (title, PNG path, caption)
    provenance: list[dict[str, str]]
    settings: dict[str, dict[str, Any]]
    revision: str
    libraries: dict[str, str]
    exports: list[Path] = field(default_factory=list)
    seeds: list[dict[str, Any]] = field(default_factory=list)  # seed_rows
    comparisons: list[dict[str, Any]] = field(default_factory=list)  # comparison_rows


# ------------------------------------------------------------------------------------------------- across seeds

# (measure of the `seeds` stage, header)
SEED_COLUMNS = (("test_accuracy", "test acc."), ("generalization_gap", "gen. gap"), ("lambda_max", "λmax"),
                ("lambda_min", "λmin"), ("trace_hutchinson", "trace"))


def _mean_interval(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("mean") is None:
        return "–"
    if entry.get("half_width") is None:
        return f"{entry['mean']:.4g} (n = {entry['n']})"
    return f"{entry['mean']:.4g} ± {entry['half_width']:.2g}"


def seed_rows(metrics: Mapping[str, Any], runs: Sequence[str]) -> list[dict[str, Any]]:
    """One row per run that has ``seeds`` metrics: the seeds completed and each :data:`SEED_COLUMNS` measure as
    ``mean ± half-width`` of its 95% interval."""
    rows = []
    for run in runs:
        seeds = (metrics.get(run) or {}).get("seeds")
        if seeds:
            rows.append({"run": run, "seeds": f"{seeds['completed']}/{seeds['seeds']}",
                         **{key: _mean_interval(seeds.get(key)) for key, _ in SEED_COLUMNS}})
    return rows


def comparison_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (pair of runs, measure) of ``metrics["comparisons"]``: ratio of means and the verdict."""
    return [{"pair": pair, "measure": measure, "ratio": "–" if v["ratio"] is None else f"{v['ratio']:.3g}",
             "verdict": v["verdict"]}
            for pair, measures in (metrics.get("comparisons") or {}).items() for measure, v in measures.items()]


def seeds_markdown(seeds: Sequence[Mapping[str, Any]], comparisons: Sequence[Mapping[str, Any]]) -> str:
    """The "Across seeds" section in markdown (empty without seed metrics)."""
    if not seeds:
        return ""
    lines = ["| run | seeds | " + " | ".join(h for _, h in SEED_COLUMNS) + " |",
             "|---|---:|" + "---:|" * len(SEED_COLUMNS)]
    lines += ["| " + " | ".join([r["run"], r["seeds"], *(r[k] for k, _ in SEED_COLUMNS)]) + " |" for r in seeds]
    if comparisons:
        lines += ["", "| runs | measure | ratio of means | verdict |", "|---|---|---:|---|"]
        lines += [f"| {c['pair']} | {c['measure']} | {c['ratio']} | {c['verdict']} |" for c in comparisons]
    return "\n".join(lines)


SEEDS_CAPTION = ("Mean ± half-width of the 95% Student-t interval over the seeds of each run (train.seed + k, every "
                 "seed measured alike at its final checkpoint: λmax and λmin by Lanczos, Hutchinson trace). Two runs "
                 "differ in a measure when their intervals separate; overlapping intervals mean the seeds cannot "
                 "tell them apart, not that they are equal.")


def _html_table(table_id: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<div class='wide'><table id='{table_id}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def seeds_html(seeds: Sequence[Mapping[str, Any]], comparisons: Sequence[Mapping[str, Any]]) -> str:
    """The "Across seeds" section in HTML (empty without seed metrics)."""
    if not seeds:
        return ""
    out = ["<h2>Across seeds</h2>", _html_table("seeds", ["run", "seeds", *(h for _, h in SEED_COLUMNS)],
                                                  [[r["run"], r["seeds"], *(r[k] for k, _ in SEED_COLUMNS)] for r in seeds])]
    if comparisons:
        out.append(_html_table("comparisons", ["runs", "measure", "ratio of means", "verdict"],
                               [[c["pair"], c["measure"], c["ratio"], c["verdict"]] for c in comparisons]))
    out.append(f"<p class='meta'>{html.escape(SEEDS_CAPTION)}</p>")
    return "".join(out)


# ------------------------------------------------------------------------------------------------- rendering


def summary_markdown(summary: Sequence[Mapping[str, Any]]) -> str:
    """The summary table in GitHub markdown (also the Prefect markdown artifact)."""
    header = "| " + " | ".join(h for _, h, _ in SUMMARY_COLUMNS) + " |"
    rule = "|" + "|".join("---" if k in ("run", "model", "status") else "---:" for k, _, _ in SUMMARY_COLUMNS) + "|"
    body = ["| " + " | ".join(format_value(row.get(k)) for k, _, _ in SUMMARY_COLUMNS) + " |" for row in summary]
    return "\n".join([header, rule, *body])


def _legend_markdown() -> str:
    return "\n".join(f"- **{h}**: {meaning}" for _, h, meaning in SUMMARY_COLUMNS if meaning)


def render_markdown(report: Report, base: Path) -> str:
    """``reports/README.md``: figures linked relative to ``base`` (the folder the file is written to)."""
    lines = ["# Loss-landscape report", "",
             f"Built from the pipeline's tables at git revision `{report.revision}`. "
             "`index.html` beside this file is the same report with every figure embedded.", "",
             "## Summary", "", summary_markdown(report.summary), "", _legend_markdown(), ""]
    if report.seeds:
        lines += ["## Across seeds", "", seeds_markdown(report.seeds, report.comparisons), "", SEEDS_CAPTION, ""]
    for title, path, caption in report.figures:
        rel = Path(path).resolve().relative_to(base.resolve()) if Path(path).resolve().is_relative_to(base.resolve()) \
            else Path(path)
        lines += [f"## {title}", "", f"![{title}]({rel.as_posix()})", "", caption, ""]
    lines += ["## Provenance", "", "| run | table | git revision | code | data | torch |", "|---|---|---|---|---|---|"]
    lines += [f"| {p['run']} | {p['table']} | `{p['git_revision']}` | `{p['code']}` | `{p['data']}` | {p['torch']} |"
              for p in report.provenance]
    lines += ["", "Libraries at report time: " + ", ".join(f"{k} {v}" for k, v in report.libraries.items()), "",
              "### Settings recorded with the tables", ""]
    for name, value in report.settings.items():
        lines += [f"<details><summary><code>{name}</code></summary>", "", "```json",
                  json.dumps(value, indent=2, sort_keys=True), "```", "", "</details>", ""]
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1400px;padding:0 1rem;
color:#1d1d1f;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}th,td{border:1px solid #ddd;padding:.25rem .5rem}
th{background:#f4f4f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.bad td{background:#fff1f0}figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85rem;color:#555}.meta{color:#666;font-size:.85rem}code{font-size:.85em}
figure.broken::after{content:"this figure failed to load";color:#b00020;font-weight:600}
dl.legend{font-size:.8rem;color:#444;display:grid;grid-template-columns:max-content 1fr;gap:.1rem 1rem}
dl.legend dt{font-weight:600}dl.legend dd{margin:0}
pre{background:#f7f7f9;padding:.5rem;overflow-x:auto;font-size:.8rem}
.wide{overflow-x:auto}
"""

# Marks each figure that failed to decode (visible) and records "<decoded>/<total>" on <body data-figures>.
_CHECK_FIGURES = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.querySelectorAll("figure img"));
  var bad = images.filter(function (img) { return !img.complete || img.naturalWidth === 0; });
  bad.forEach(function (img) { img.closest("figure").classList.add("broken"); });
  document.body.setAttribute("data-figures", (images.length - bad.length) + "/" + images.length);
});
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def render_html(report: Report) -> str:
    """``reports/index.html``: one file, figures embedded as data URIs, no external resources."""
    e = html.escape
    head = "".join(f"<th title='{e(meaning)}'>{e(h)}</th>" for _, h, meaning in SUMMARY_COLUMNS)
    body = []
    for row in report.summary:
        cells = "".join(f"<td class='num'>{e(format_value(row.get(k)))}</td>" if k not in ("run", "model", "status")
                        else f"<td>{e(format_value(row.get(k)))}</td>" for k, _, _ in SUMMARY_COLUMNS)
        bad = row.get("status") != "completed"
        body.append(f"<tr class='{'bad' if bad else ''}'>{cells}</tr>")
    legend = "".join(f"<dt>{e(h)}</dt><dd>{e(meaning)}</dd>" for _, h, meaning in SUMMARY_COLUMNS if meaning)
    figures = "".join(
        f"<h2>{e(title)}</h2><figure><img src='{_data_uri(path)}' alt='{e(title)}'>"
        f"<figcaption>{e(caption)}</figcaption></figure>" for title, path, caption in report.figures)
    prov = "".join(f"<tr><td>{e(p['run'])}</td><td>{e(p['table'])}</td><td><code>{e(p['git_revision'])}</code></td>"
                   f"<td><code>{e(p['code'])}</code></td><td><code>{e(p['data'])}</code></td><td>{e(p['torch'])}</td></tr>"
                   for p in report.provenance)
    libs = ", ".join(f"{e(k)} {e(v)}" for k, v in report.libraries.items())
    settings = "".join(f"<details><summary><code>{e(name)}</code></summary><pre>"
                       f"{e(json.dumps(value, indent=2, sort_keys=True))}</pre></details>"
                       for name, value in report.settings.items())
    exports = ", ".join(sorted({p.parent.name for p in report.exports}))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Loss-landscape report</title><style>{_CSS}</style></head>
<body>
<h1>Loss-landscape report</h1>
<p class="meta">git revision <code>{e(report.revision)}</code> · {len(report.summary)} runs · self-contained
(figures embedded) · data for <code>dvc plots</code>: {e(exports) or "none"}</p>
<h2>Summary</h2>
<div class="wide"><table id="summary"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>
<dl class="legend">{legend}</dl>
{seeds_html(report.seeds, report.comparisons)}
{figures}
<h2>Provenance</h2>
<table id="provenance"><thead><tr><th>run</th><th>table</th><th>git revision</th><th>code</th><th>data</th><th>torch</th>
</tr></thead><tbody>{prov}</tbody></table>
<p class="meta">Libraries at report time: {libs}</p>
<h3>Settings recorded with the tables</h3>
{settings}
<script>{_CHECK_FIGURES}</script>
</body></html>
"""


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
