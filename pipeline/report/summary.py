"""The report's numbers: one summary row per run from ``metrics.json``, the run tables it reads, provenance and the
settings recorded with the tables, and the rows of the seeds section.

Everything here reads the tidy tables and ``metrics.json`` that the earlier stages wrote; nothing is recomputed.
A run whose stages are missing or that diverged still gets its row, with the reason in its status.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from pipeline.io import finite
from pipeline.metrics import lookup, source
from pipeline.tables import read_metadata

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
    (
        "pac_bayes_sigma",
        "σ PAC",
        "largest isotropic weight-noise scale keeping the expected loss increase within "
        "hessian.pac_bayes_bound (larger: flatter)",
    ),
    (
        "adaptive_sharpness",
        "adaptive",
        "adaptive sharpness, worst case in ||δ/|w| ||₂ <= hessian.adaptive_l2, m-sharpness (nats; invariant under "
        "rescalings that keep the function)",
    ),
    ("noise_scale", "B_simple", "gradient noise scale tr(Σ)/|g|² at the final checkpoint (McCandlish et al. 2018)"),
    (
        "lambda_max_lr_over_2",
        "λmax·η/2",
        "≥ 1: plain gradient descent at the peak learning rate η is unstable along "
        "the top eigenvector (heavy-ball momentum β moves the threshold to 1 + β)",
    ),
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


def summary_rows(metrics: Mapping[str, Mapping[str, Any]], runs: Sequence[str]) -> list[dict[str, Any]]:
    """One row per configured run with the :data:`SUMMARY_COLUMNS` (``None`` where a number is unavailable)."""
    rows = []
    for run in runs:
        m = metrics.get(run, {})
        train, interp = m.get("train", {}), m.get("interpolate", {})
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
        train_acc, test_acc = finite(train.get("train_accuracy")), finite(train.get("test_accuracy"))
        trace = source(m, "trace")  # Hutch++ when computed, else Hutchinson; its standard error beside it
        rows.append(
            {
                "run": run,
                "model": train.get("model_name") or m.get("model") or "",
                "status": status,
                "test_accuracy": test_acc,
                "train_accuracy": train_acc,
                "generalization_gap": finite(train.get("generalization_gap")),
                "accuracy_gap": None if train_acc is None or test_acc is None else train_acc - test_acc,
                "lambda_max": finite(lookup(m, "lambda_max")),
                "trace": finite(lookup(m, "trace")),
                "trace_stderr": None if trace is None else finite(m[trace[0]].get(f"{trace[1]}_stderr")),
                "barrier": finite(lookup(m, "barrier")),
                "epsilon_sharpness": finite(lookup(m, "epsilon_sharpness_absolute")),
                "pac_bayes_sigma": finite(lookup(m, "pac_bayes_sigma_isotropic")),
                "adaptive_sharpness": finite(lookup(m, "adaptive_worst_l2")),
                "noise_scale": finite(lookup(m, "noise_scale")),
                "lambda_max_lr_over_2": finite(lookup(m, "lambda_max_lr_over_2")),
                "lr": None,
                "epochs": train.get("epochs"),
            }
        )
    return rows


def fill_from_config(rows: list[dict[str, Any]], runs: Mapping[str, RunData]) -> None:
    """Model name and peak learning rate from the config stored with each run's training table."""
    for row in rows:
        config = runs.get(row["run"], RunData(row["run"])).metadata.get("train_history", {}).get("run", {})
        row["model"] = row["model"] or config.get("model_name", "")
        row["lr"] = finite(config.get("train", {}).get("lr"))


def format_value(value: Any) -> str:
    """4 significant digits for floats, ``—`` for a missing or non-finite number."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


LIBRARIES = (
    "torch",
    "torchvision",
    "numpy",
    "pandas",
    "pyarrow",
    "scipy",
    "matplotlib",
    "curvlinops-for-pytorch",
    "prefect",
    "dvc",
)


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
            rows.append(
                {
                    "run": name,
                    "table": table,
                    "git_revision": str(prov.get("git_revision", "unknown")),
                    "code": str(prov.get("code_fingerprint", ""))[:12],
                    "data": str(meta.get("data_fingerprint", ""))[:12],
                    "torch": str(prov.get("torch", "")),
                }
            )
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
    connectivity: list[dict[str, Any]] = field(default_factory=list)  # connectivity_rows
    reparam: list[dict[str, Any]] = field(default_factory=list)  # claims.reparam_rows
    claims: list[Any] = field(default_factory=list)  # claims.Claim, in order


# (measure of the `seeds` stage, header)
SEED_COLUMNS = (
    ("test_accuracy", "test acc."),
    ("generalization_gap", "gen. gap"),
    ("lambda_max", "λmax"),
    ("lambda_min", "λmin"),
    ("trace_hutchinson", "trace"),
)


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
            rows.append(
                {
                    "run": run,
                    "seeds": f"{seeds['completed']}/{seeds['seeds']}",
                    **{key: _mean_interval(seeds.get(key)) for key, _ in SEED_COLUMNS},
                }
            )
    return rows


def comparison_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (pair of runs, measure) of ``metrics["comparisons"]``: ratio of means and the verdict."""
    return [
        {
            "pair": pair,
            "measure": measure,
            "ratio": "–" if v["ratio"] is None else f"{v['ratio']:.3g}",
            "verdict": v["verdict"],
        }
        for pair, measures in (metrics.get("comparisons") or {}).items()
        for measure, v in measures.items()
    ]


# Variant of the path to the second-seed model -> its name in the report.
CONNECTIVITY_VARIANTS = {
    "partner": "naive",
    "partner_aligned": "aligned",
    "partner_reset": "reset",
    "partner_aligned_reset": "aligned + reset",
    "partner_repair": "REPAIR",
    "partner_aligned_repair": "aligned + REPAIR",
}
# (key, header): the columns of the mode-connectivity table after run and variant.
CONNECTIVITY_COLUMNS = (
    ("train_loss_barrier", "loss barrier (train)"),
    ("test_loss_barrier", "loss barrier (test)"),
    ("test_accuracy_barrier", "acc. barrier (test, pp)"),
    ("test_midpoint_accuracy", "midpoint acc. (test)"),
    ("test_end_accuracies", "endpoint acc. (test)"),
)
CONNECTIVITY_CAPTION = (
    "The straight path from each run to its second-seed model (partner@<run>): naive; with the partner's hidden units "
    "permuted to the run's (landscape.align); and on that path with BatchNorm statistics recomputed at every point "
    "(reset) or each hidden channel's mean and standard deviation set to the interpolation of the endpoints' "
    "(REPAIR). Loss barrier: max over the path of the loss minus the mean of the endpoints' (nats). Accuracy "
    "barrier: the mean of the endpoints' accuracies minus the lowest on the path, in percentage points. With reset "
    "the endpoints are the two models with recomputed statistics."
)


def connectivity_rows(metrics: Mapping[str, Any], runs: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (run, variant of the path to the partner) with the :data:`CONNECTIVITY_COLUMNS` as text."""
    rows = []
    for run in runs:
        paths = ((metrics.get(run) or {}).get("interpolate") or {}).get("connectivity") or {}
        for name, entry in paths.items():
            train, test = entry.get("train") or {}, entry.get("test") or {}

            def pct(value):
                return "—" if value is None else f"{100 * value:.1f} %"

            rows.append(
                {
                    "run": run,
                    "variant": CONNECTIVITY_VARIANTS.get(name, name),
                    "train_loss_barrier": format_value(finite(train.get("loss_barrier"))),
                    "test_loss_barrier": format_value(finite(test.get("loss_barrier"))),
                    "test_accuracy_barrier": format_value(finite(test.get("accuracy_barrier"))),
                    "test_midpoint_accuracy": pct(finite(test.get("midpoint_accuracy"))),
                    "test_end_accuracies": (
                        f"{pct(finite(test.get('start_accuracy')))} / {pct(finite(test.get('end_accuracy')))}"
                        if test
                        else "—"
                    ),
                }
            )
    return rows
