"""Seed replicates: every run trained from ``repro.seeds`` seeds, its headline numbers as a mean with a 95%
confidence interval, and comparisons between runs that say whether the intervals separate.

One training run is one draw: on digits a single seed's λmax(ResNet20 without skips) / λmax(ResNet20) read 1.8 on
one machine and 0.87 on another. Seed ``k`` of run ``r`` is ``r`` trained from ``train.seed + k`` with sharpness
tracking off (tracking never changes the weights); ``k = 0`` is the run itself and ``k =
landscape.partner_seed_offset`` is its mode-connectivity partner, so with the defaults only one extra model per run
is trained. Every seed, the run itself included, is measured the same way at its final checkpoint
(:func:`measure_config`: λmax and λmin by Lanczos, the Hutchinson trace, the hessian section's tolerances), so the
interval compares like with like; the intervals and the comparisons across runs are in :mod:`pipeline.metrics`. No
Prefect here: :mod:`pipeline.flows.seeds` orchestrates.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from pipeline.config import HessianConfig, Params, RunConfig
from pipeline.io import finite
from pipeline.metrics import hessian_headline


def replica_run(params: Params, run_name: str, k: int) -> RunConfig:
    """Run ``run_name`` trained from seed ``train.seed + k`` (``k = 0``: the run itself, unchanged; else tracking
    off, exactly as the partner stage trains its model)."""
    run = params.run(run_name)
    if k == 0:
        return run
    return dataclasses.replace(
        run, train=dataclasses.replace(run.train, seed=run.train.seed + k, track_sharpness_every=0)
    )


def replica_source(params: Params, k: int) -> str:
    """Whose checkpoints seed ``k`` uses: ``train`` (k = 0), ``partner`` (k = partner_seed_offset), else ``seeds``."""
    if k == 0:
        return "train"
    return "partner" if k == params.landscape.partner_seed_offset else "seeds"


def measure_config(cfg: HessianConfig) -> HessianConfig:
    """What each seed is measured with: the ``hessian`` section narrowed to λmax, λmin and the Hutchinson trace
    (same solver, tolerance, products and probe set; no density, GGN, groups, noise or flatness)."""
    return dataclasses.replace(
        cfg,
        top_k=1,
        lambda_min=True,
        trace=("hutchinson",),
        density_runs=0,
        operators=("hessian",),
        groups="none",
        noise=False,
        flatness=(),
    )


def seed_row(
    run_name: str, k: int, seed: int, source: str, payload: Mapping[str, Any], hessian: Mapping[str, Any] | None
) -> dict[str, Any]:
    """One row of the ``seeds`` table from a final checkpoint's payload and its measured headline
    (:func:`pipeline.metrics.hessian_headline`; None for a diverged run)."""
    last = next(r for r in reversed(payload["history"]) if r["scope"] == "epoch")
    hessian = hessian or {}
    number = lambda key: finite(hessian.get(key), math.nan)  # noqa: E731
    return {
        "run": run_name,
        "seed_index": k,
        "seed": seed,
        "source": source,
        "status": payload["status"],
        "epoch": int(payload["epoch"]),
        "train_loss": last["train_loss"],
        "train_accuracy": last["train_accuracy"],
        "test_loss": last["test_loss"],
        "test_accuracy": last["test_accuracy"],
        "generalization_gap": last["test_loss"] - last["train_loss"],
        "lambda_max": number("lambda_max"),
        "lambda_min": number("lambda_min"),
        "trace_hutchinson": number("trace_hutchinson"),
        "trace_hutchinson_stderr": number("trace_hutchinson_stderr"),
        "hvps": int(hessian.get("hvps", 0) or 0),
        "seconds": float(hessian.get("seconds", 0.0) or 0.0),
    }


def measure_replica(
    model, probe, cfg: HessianConfig, run: RunConfig, payload: Mapping[str, Any], checkpoint: str, *, on_step=None
) -> dict:
    """The hessian headline of one seed's final checkpoint (``payload``, file name ``checkpoint``), measured with
    ``cfg`` (:func:`measure_config`): :func:`pipeline.curvature.analysis.analyse` then
    :func:`pipeline.metrics.hessian_headline` at the run's peak learning rate."""
    import pandas as pd

    from pipeline.curvature.analysis import analyse

    report = analyse(model, probe, cfg, details=True, loss=run.train.loss, on_step=on_step)
    rows = pd.DataFrame([{**row, "epoch": payload["epoch"], "checkpoint": checkpoint} for row in report.rows])
    return hessian_headline(rows, run.train.lr)
