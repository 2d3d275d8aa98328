"""The flatness sweep runner: train a grid of small runs and measure each final checkpoint, without the landscape
scans or partner runs of the main pipeline.

``sweeps/params.yaml`` holds the preset: the ``data``, ``model``, ``train`` and ``hessian`` sections of the main
``params.yaml`` (the same keys and checks) and a ``grid`` of architectures, peak learning rates, batch sizes and
seeds. Every combination is one *point*, named like ``mlp-lr0.1-bs32-s0``:

- :func:`run_point` trains it (:func:`pipeline.training.trainer.train`, resumable from the point's checkpoints),
  measures the final checkpoint (:func:`pipeline.curvature.analysis.analyse` with the details: trace, flatness, gradient
  noise) and writes ``<points>/<name>/result.json`` atomically, keyed by a fingerprint of everything that decides its
  numbers. A rerun reuses a result whose fingerprint matches and recomputes the others, so a crashed sweep resumes.
- :func:`experiments` turns the points and their results into :class:`pipeline.sweep.stats.Experiment` s (one per
  point), so :func:`pipeline.sweep.stats.sweep_rows` gives one row per point; :func:`write_outputs` writes the
  tables, the ``dvc metrics`` file, the markdown summary and the figure.

No Prefect here: ``pipeline/flows/sweep.py`` wraps these functions in a flow.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch

from pipeline.config import (
    EXECUTORS,
    MAX_BATCH,
    ConfigError,
    DataConfig,
    HessianConfig,
    ModelConfig,
    ReproConfig,
    RunConfig,
    TrainConfig,
    build_section,
    check_batch_size,
    check_model_name,
    read_yaml,
    resolve_device,
    spec,
)
from pipeline.curvature.analysis import analyse
from pipeline.curvature.operators import ProbeSet
from pipeline.data import PreparedData
from pipeline.io import atomic_path, finite_tree, write_json
from pipeline.metrics import MEASURES, hessian_headline
from pipeline.provenance import code_fingerprint, provenance, source_fingerprint
from pipeline.report.claims import CLAIMS_CAPTION, claims_markdown, sweep_claims
from pipeline.sweep.figures import plot_sweep
from pipeline.sweep.stats import Experiment, batch_size_effect, kendall_table, markdown_table
from pipeline.training.checkpoints import parameters_finite
from pipeline.training.trainer import train

__all__ = [
    "SweepGrid",
    "SweepExecution",
    "SweepParams",
    "Point",
    "parse_sweep_params",
    "load_sweep_params",
    "grid_points",
    "check_grid_batch_sizes",
    "make_probe",
    "point_fingerprint",
    "point_code_fingerprint",
    "headline",
    "run_point",
    "load_result",
    "experiments",
    "write_outputs",
    "SWEEP_MEASURES",
    "BATCH_SIZE_MEASURES",
    "RESULT",
    "OUTPUT_FILES",
]

RESULT = "result.json"
CHECKPOINTS = "checkpoints"
RESULT_FORMAT = 1
MEASURE_SOURCES = ("curvature", "metrics.py")  # the code that turns a trained point into its measures
# Measures the sweep can produce: those read from the hessian stage (the scans of the main pipeline are not run).
SWEEP_MEASURES: tuple[str, ...] = tuple(m.name for m in MEASURES if all(stage == "hessian" for stage, _ in m.sources))
BATCH_SIZE_MEASURES: tuple[str, ...] = ("lambda_max", "epsilon_sharpness_absolute", "adaptive_worst_l2")
OUTPUT_FILES = (
    "points.parquet",
    "kendall.parquet",
    "batch_size.parquet",
    "sweep_metrics.json",
    "README.md",
    "sweep.png",
)


# --- params ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepGrid:
    """``grid`` section: every combination of these values is one point of the sweep."""

    model: tuple[str, ...] = spec(("mlp",), validate=check_model_name, doc="architectures (as a run's `model`)")
    lr: tuple[float, ...] = spec((0.05,), gt=0.0, unit="learning rate per step (peak of the schedule)")
    batch_size: tuple[int, ...] = spec((64,), ge=1, le=MAX_BATCH, unit="samples per step")
    seed: tuple[int, ...] = spec((0,), ge=0)  # initialisation and batch order

    def __post_init__(self):
        for key in ("model", "lr", "batch_size", "seed"):
            values = getattr(self, key)
            if not values:
                raise ConfigError(f"grid.{key}", "must list at least one value")
            if len(set(values)) != len(values):
                raise ConfigError(f"grid.{key}", f"values must not repeat, got {list(values)}")

    @property
    def size(self) -> int:
        return len(self.model) * len(self.lr) * len(self.batch_size) * len(self.seed)


def _check_address(key: str, value: str) -> str:
    if value and not re.fullmatch(r"(tcp|tls|ucx|inproc)://\S+", value):
        raise ConfigError(key, f"expected a Dask address like tcp://HOST:PORT, or empty; got {value!r}")
    return value


@dataclass(frozen=True)
class SweepExecution:
    """``sweep`` section: where the points run. It decides no number (a point's result is the same bits in this
    process and on any worker with the same kernels), so it is not a DVC parameter of the stage."""

    executor: str = spec("local", choices=EXECUTORS, doc="local (one point after another here) | dask (prefect-dask)")
    scheduler: str = spec(
        "",
        validate=lambda key, value: _check_address(key, value),
        doc='dask: scheduler address, e.g. tcp://10.0.0.5:8786 (workers: `landscape worker`); "" = LocalCluster',
    )
    workers: int = spec(2, ge=1, le=1024, unit="processes", doc="dask LocalCluster only (one point at a time each)")

    def __post_init__(self):
        if self.scheduler and self.executor != "dask":
            raise ConfigError(
                "sweep.scheduler", "is read only with executor: dask; set executor: dask or leave it empty"
            )


@dataclass(frozen=True)
class SweepParams:
    """The whole validated ``sweeps/params.yaml``."""

    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    hessian: HessianConfig
    grid: SweepGrid
    repro: ReproConfig = ReproConfig()  # applied by the stage wrapper before torch is imported
    sweep: SweepExecution = SweepExecution()  # where the points run


SWEEP_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "hessian": HessianConfig,
    "grid": SweepGrid,
    "repro": ReproConfig,
    "sweep": SweepExecution,
}


def parse_sweep_params(raw: Any) -> SweepParams:
    """Validate a parsed ``sweeps/params.yaml`` mapping.

    Raises:
        ConfigError: one line naming the dotted key (``grid.lr[1]: must be > 0, got -0.1``).
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(
            "", f"sweep params: expected a mapping of sections ({', '.join(SWEEP_SECTIONS)}), got {type(raw).__name__}"
        )
    for key in raw:
        if key not in SWEEP_SECTIONS:
            raise ConfigError(str(key), f"unknown section; allowed: {', '.join(SWEEP_SECTIONS)}")
    if "grid" not in raw:
        raise ConfigError("grid", "missing; e.g. grid: {model: [mlp], lr: [0.1], batch_size: [64], seed: [0]}")
    sections = {name: build_section(cls, raw.get(name), name) for name, cls in SWEEP_SECTIONS.items()}
    hessian = sections["hessian"]
    for key in ("checkpoints", "details"):  # run_point measures the final checkpoint, with the details, only
        if getattr(hessian, key) != "final":
            raise ConfigError(
                f"hessian.{key}",
                f"the sweep measures the final checkpoint only; allowed: final, got {getattr(hessian, key)!r}",
            )
    return SweepParams(**sections)


def load_sweep_params(path: str | Path = "sweeps/params.yaml") -> SweepParams:
    """Read and validate the sweep preset (see :func:`parse_sweep_params`); a missing or malformed file is a
    ConfigError naming the file."""
    return parse_sweep_params(read_yaml(path))


# --- points ---------------------------------------------------------------------------------------------------------


class Point(NamedTuple):
    """One grid point: its name (also its folder) and its run config (the base ``train`` section with the point's
    ``lr``, ``batch_size`` and ``seed``)."""

    name: str
    model: str
    lr: float
    batch_size: int
    seed: int
    run: RunConfig

    def settings(self) -> dict[str, Any]:
        return {"model": self.model, "lr": self.lr, "batch_size": self.batch_size, "seed": self.seed}


def point_name(model: str, lr: float, batch_size: int, seed: int) -> str:
    """``mlp-lr0.1-bs32-s0``: the learning rate in its shortest exact decimal form (``repr``, ``1.0`` as ``1``),
    so distinct values never share a name."""
    text = repr(float(lr))
    return f"{model}-lr{text.removesuffix('.0')}-bs{batch_size}-s{seed}"


def grid_points(params: SweepParams) -> list[Point]:
    """Every combination of the grid, model-major (model, lr, batch_size, seed), as :class:`Point` s."""
    grid = params.grid
    points = []
    for model, lr, batch_size, seed in itertools.product(grid.model, grid.lr, grid.batch_size, grid.seed):
        name = point_name(model, lr, batch_size, seed)
        run_train = dataclasses.replace(params.train, lr=float(lr), batch_size=int(batch_size), seed=int(seed))
        points.append(
            Point(
                name,
                model,
                float(lr),
                int(batch_size),
                int(seed),
                RunConfig(name=name, model_name=model, model=params.model, train=run_train),
            )
        )
    return points


def check_grid_batch_sizes(grid: SweepGrid, n_train: int, dataset: str = "the dataset") -> None:
    """Every ``grid.batch_size`` must fit the train split (a larger one would silently be full-batch GD).

    Raises:
        ConfigError: ``grid.batch_size[i]: must be <= N, the train split of ..., got B``.
    """
    for i, batch_size in enumerate(grid.batch_size):
        check_batch_size(f"grid.batch_size[{i}]", batch_size, n_train, dataset)


def make_probe(data: PreparedData, cfg: HessianConfig) -> ProbeSet:
    """The fixed probe subset of the train split, in batches of ``hessian.batch_size`` (on the CPU)."""
    x, y = data.probe_tensors()
    return ProbeSet.from_tensors(x, y, cfg.batch_size)


def _measure_code_fingerprint() -> str:
    """sha256 over the sources of the measures (the curvature wing and the headline of :mod:`pipeline.metrics`): a
    change there recomputes them (training code is in :func:`pipeline.provenance.code_fingerprint`)."""
    return hashlib.sha256(f"{source_fingerprint(MEASURE_SOURCES)} result format {RESULT_FORMAT}".encode()).hexdigest()


def point_code_fingerprint() -> str:
    """sha256 of the code that decides a point's numbers (training and measures): a Dask worker must report the
    same, or it runs another version of the project (:mod:`pipeline.sweep.cluster`)."""
    return hashlib.sha256(f"{code_fingerprint()} {_measure_code_fingerprint()}".encode()).hexdigest()


def point_fingerprint(point: Point, hessian_cfg: HessianConfig, data_fingerprint: str) -> str:
    """sha256 of what decides a point's numbers: run config, hessian config, data, training and curvature code."""
    payload = json.dumps(
        {
            "run": point.run.to_dict(),
            "hessian": dataclasses.asdict(hessian_cfg),
            "data": data_fingerprint,
            "code": code_fingerprint(),
            "measures": _measure_code_fingerprint(),
        },
        sort_keys=True,
        default=list,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def headline(rows: Sequence[Mapping[str, Any]], peak_lr: float, *, epoch: int, checkpoint: str) -> dict:
    """The ``hessian`` metrics of one :func:`~pipeline.curvature.analysis.analyse` report: the rows as the one
    checkpoint of a spectrum table, through the function the ``hessian`` stage uses."""
    if not rows:
        return {"status": "no finite checkpoint"}
    return hessian_headline(pd.DataFrame([{**row, "epoch": epoch, "checkpoint": checkpoint} for row in rows]), peak_lr)


def load_result(folder: str | Path, fingerprint: str | None = None) -> dict | None:
    """The point's ``result.json``; None when missing, unreadable, or made with another ``fingerprint``."""
    path = Path(folder) / RESULT
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or result.get("format") != RESULT_FORMAT:
        return None
    if fingerprint is not None and result.get("fingerprint") != fingerprint:
        return None
    return result


def run_point(
    point: Point,
    data: PreparedData,
    probe: ProbeSet,
    folder: str | Path,
    hessian_cfg: HessianConfig,
    *,
    data_fingerprint: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train one grid point and measure its final checkpoint; write ``<folder>/result.json`` atomically.

    Args:
        point: from :func:`grid_points`.
        data: the prepared data of the sweep; ``probe``: :func:`make_probe` of it.
        folder: the point's folder: ``checkpoints/`` (init and final, resumable) and ``result.json``.
        hessian_cfg: what to measure (always the final checkpoint, with the details).
        data_fingerprint: ``data.fingerprint()`` when the caller has it (computed here otherwise).
        log: called with one line per training epoch and per measure.

    Returns:
        The result: ``{"format", "name", "point", "fingerprint", "metrics": {"train": ..., "hessian": ...},
        "wall_seconds", "provenance"}`` plus ``"reused": True`` when ``result.json`` already held a result with the
        same fingerprint (then nothing is trained or measured). A diverged run has ``metrics.train.status ==
        "diverged"`` and no ``hessian`` entry.
    """
    say = log or (lambda message: None)
    check_batch_size("grid.batch_size", point.batch_size, len(data.y_train), data.name)  # before any training
    folder = Path(folder)
    fingerprint = point_fingerprint(point, hessian_cfg, data_fingerprint or data.fingerprint())
    cached = load_result(folder, fingerprint)
    if cached is not None:
        say(f"{point.name}: reusing {folder / RESULT} (same config, data and code)")
        return {**cached, "reused": True}

    started = time.perf_counter()

    def on_epoch(row: dict) -> None:
        say(
            f"{point.name}: epoch {row['epoch']}/{point.run.train.epochs}: train loss {row['train_loss']:.4f} "
            f"acc {row['train_accuracy']:.4f} | test loss {row['test_loss']:.4f} acc {row['test_accuracy']:.4f}"
        )

    trainer = train(point.run, data, folder / CHECKPOINTS, on_epoch=on_epoch)
    trained = time.perf_counter()
    metrics: dict[str, Any] = {"train": finite_tree(trainer.summary())}
    status = trainer.state.status
    if status == "diverged":
        say(f"{point.name}: diverged at step {trainer.state.diverged_step} (non-finite loss); no measures")
    elif not parameters_finite(trainer.model):
        say(f"{point.name}: non-finite weights after training; no measures")
        metrics["hessian"] = {"status": "no finite checkpoint"}
    else:
        device = torch.device(resolve_device(hessian_cfg.device, "hessian.device"))
        model = copy.deepcopy(trainer.model).eval().to(device=device, dtype=getattr(torch, hessian_cfg.dtype))
        report = analyse(
            model,
            probe,
            hessian_cfg,
            details=True,
            on_step=lambda m: say(f"{point.name}: {m}"),
            loss=point.run.train.loss,
        )
        epoch = trainer.state.epoch
        metrics["hessian"] = headline(report.rows, point.lr, epoch=epoch, checkpoint=f"epoch_{epoch:04d}.pt")
    finished = time.perf_counter()
    result = finite_tree(
        {
            "format": RESULT_FORMAT,
            "name": point.name,
            "point": point.settings(),
            "fingerprint": fingerprint,
            "metrics": metrics,
            "wall_seconds": {"train": round(trained - started, 3), "measure": round(finished - trained, 3)},
            "provenance": provenance(),
        }
    )
    write_json(folder / RESULT, result)
    return {**result, "reused": False}


# --- aggregation ----------------------------------------------------------------------------------------------------


def experiments(
    points: Sequence[Point], results: Mapping[str, Mapping[str, Any] | None], base_train: TrainConfig | None = None
) -> list[Experiment]:
    """One :class:`~pipeline.sweep.stats.Experiment` per point, shaped like a main-pipeline experiment: params
    ``{"train": {...}, "runs": {name: {model, lr, batch_size, seed}}}`` and metrics ``{name: {"train", "hessian"}}``
    (None for a point without a result: its row says ``not trained``)."""
    train_section = dataclasses.asdict(base_train if base_train is not None else points[0].run.train) if points else {}
    out = []
    for point in points:
        result = results.get(point.name)
        params = {"train": train_section, "runs": {point.name: point.settings()}}
        metrics = {point.name: dict(result["metrics"])} if result else None
        out.append(Experiment(point.name, params, metrics, None))
    return out


def _write_parquet(frame: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return path


def _write_text(text: str, path: Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.3g}"
    return str(value)


def _markdown(frame: pd.DataFrame, columns: Sequence[tuple[str, str]]) -> str:
    header = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(row[key]) for key, _ in columns) + " |" for row in frame.to_dict("records")]
    return "\n".join([header, rule, *body])


def _readme(frame: pd.DataFrame, kendall: pd.DataFrame, batch: pd.DataFrame, summary: dict) -> str:
    points = _markdown(
        frame,
        [
            ("run", "point"),
            ("status", "status"),
            ("generalization_gap", "gap (nats)"),
            ("test_accuracy", "test acc"),
            ("lambda_max", "λmax"),
            ("epsilon_sharpness_absolute", "ε-sharpness"),
            ("pac_bayes_sigma_isotropic", "PAC-Bayes σ"),
            ("adaptive_worst_l2", "adaptive l2"),
            ("adaptive_worst_linf", "adaptive l∞"),
        ],
    )
    effect = _markdown(
        batch,
        [
            ("model", "model"),
            ("lr", "lr"),
            ("measure", "measure"),
            ("n", "n"),
            ("smallest_batch", "smallest batch"),
            ("largest_batch", "largest batch"),
            ("median_at_smallest", "median at smallest"),
            ("median_at_largest", "median at largest"),
            ("tau", "τ"),
            ("p_value", "p"),
            ("expected_sign", "expected"),
            ("agrees", "sign agrees"),
        ],
    )
    return "\n".join(
        [
            "# Flatness sweep: do flatter minima generalise better?",
            "",
            f"{summary['n_completed']} of {summary['n_points']} grid points completed "
            f"({summary['n_diverged']} diverged). Kendall's τ-b of each measure against the generalisation gap "
            "(test − train loss) over the completed points; Ψ is Jiang et al.'s granulated coefficient (τ inside groups "  # noqa: E501
            "where one of lr, batch size, model varies, averaged).",
            "",
            "## Kendall's τ against the generalisation gap",
            "",
            markdown_table(kendall),
            "",
            "## Batch size and sharpness (Keskar et al.)",
            "",
            "Per (model, lr): τ between batch size and the measure; a sharpness measure should grow with the batch "
            "size.",
            "",
            effect,
            "",
            "## What the landscape says",
            "",
            claims_markdown(sweep_claims(frame, kendall)),
            "",
            CLAIMS_CAPTION,
            "",
            "## Figure",
            "",
            "![Flatness measures against the generalisation gap](sweep.png)",
            "",
            "## Points",
            "",
            points,
            "",
        ]
    )


def write_outputs(frame: pd.DataFrame, out_dir: str | Path) -> dict[str, Any]:
    """Write the sweep's outputs under ``out_dir``, each atomically:

    ``points.parquet`` (``frame``, the rows of :func:`pipeline.sweep.stats.sweep_rows`), ``kendall.parquet``
    (:func:`~pipeline.sweep.stats.kendall_table` of :data:`SWEEP_MEASURES`), ``batch_size.parquet``
    (:func:`~pipeline.sweep.stats.batch_size_effect` for :data:`BATCH_SIZE_MEASURES`), ``sweep_metrics.json`` (for
    ``dvc metrics``: per measure tau, p_value, n, agrees; n_points, n_completed, n_diverged), ``README.md`` and
    ``sweep.png`` (:func:`~pipeline.sweep.figures.plot_sweep`).

    Returns:
        ``{"kendall": DataFrame, "batch_size": DataFrame, "metrics": dict, "files": [Path, ...]}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kendall = kendall_table(frame, measures=list(SWEEP_MEASURES))
    batch = pd.concat([batch_size_effect(frame, m) for m in BATCH_SIZE_MEASURES], ignore_index=True)
    summary = {
        "n_points": int(len(frame)),
        "n_completed": int((frame["status"] == "completed").sum()),
        "n_diverged": int((frame["status"] == "diverged").sum()),
        "target": "generalization_gap",
        "measures": {
            row["measure"]: {"tau": row["tau"], "p_value": row["p_value"], "n": int(row["n"]), "agrees": row["agrees"]}
            for row in kendall.to_dict("records")
        },
    }
    summary = finite_tree(summary)
    files = [
        _write_parquet(frame, out_dir / "points.parquet"),
        _write_parquet(kendall, out_dir / "kendall.parquet"),
        _write_parquet(batch, out_dir / "batch_size.parquet"),
    ]
    write_json(out_dir / "sweep_metrics.json", summary)
    files.append(out_dir / "sweep_metrics.json")
    files.append(_write_text(_readme(frame, kendall, batch, summary), out_dir / "README.md"))
    files.append(plot_sweep(frame, out_dir / "sweep.png", kendall=kendall))
    return {"kendall": kendall, "batch_size": batch, "metrics": summary, "files": files}
