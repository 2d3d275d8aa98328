"""Seed replicates: every run trained from ``repro.seeds`` seeds, its headline numbers as a mean with a 95%
confidence interval, and comparisons between runs that say whether the intervals separate.

One training run is one draw: on digits a single seed's λmax(ResNet20 without skips) / λmax(ResNet20) read 1.8 on
one machine and 0.87 on another. Seed ``k`` of run ``r`` is ``r`` trained from ``train.seed + k`` with sharpness
tracking off (tracking never changes the weights); ``k = 0`` is the run itself and ``k =
landscape.partner_seed_offset`` is its mode-connectivity partner, so with the defaults only one extra model per run
is trained. Every seed, the run itself included, is measured the same way at its final checkpoint
(:func:`measure_config`: λmax and λmin by Lanczos, the Hutchinson trace, the hessian section's tolerances), so the
interval compares like with like. No Prefect here: :mod:`pipeline.flows.seeds` orchestrates.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from typing import Any, Mapping, Sequence

from pipeline.config import HessianConfig, Params, RunConfig

CONFIDENCE = 0.95
# The per-seed numbers (columns of the `seeds` table) that get an interval.
MEASURES = ("test_accuracy", "test_loss", "train_loss", "generalization_gap", "lambda_max", "lambda_min",
            "trace_hutchinson")
# The ones compared between runs (ratio of means, and whether the intervals separate).
COMPARED = ("lambda_max", "trace_hutchinson", "test_accuracy", "generalization_gap")


def replica_run(params: Params, run_name: str, k: int) -> RunConfig:
    """Run ``run_name`` trained from seed ``train.seed + k`` (``k = 0``: the run itself, unchanged; else tracking
    off, exactly as the partner stage trains its model)."""
    run = params.run(run_name)
    if k == 0:
        return run
    return dataclasses.replace(run, train=dataclasses.replace(run.train, seed=run.train.seed + k,
                                                              track_sharpness_every=0))


def replica_source(params: Params, k: int) -> str:
    """Whose checkpoints seed ``k`` uses: ``train`` (k = 0), ``partner`` (k = partner_seed_offset), else ``seeds``."""
    if k == 0:
        return "train"
    return "partner" if k == params.landscape.partner_seed_offset else "seeds"


def measure_config(cfg: HessianConfig) -> HessianConfig:
    """What each seed is measured with: the ``hessian`` section narrowed to λmax, λmin and the Hutchinson trace
    (same solver, tolerance, products and probe set; no density, GGN, groups, noise or flatness)."""
    return dataclasses.replace(cfg, top_k=1, lambda_min=True, trace=("hutchinson",), density_runs=0,
                               operators=("hessian",), groups="none", noise=False, flatness=())


def seed_row(run_name: str, k: int, seed: int, source: str, payload: Mapping[str, Any],
             hessian: Mapping[str, Any] | None) -> dict[str, Any]:
    """One row of the ``seeds`` table from a final checkpoint's payload and its measured headline
    (:func:`pipeline.headlines.hessian_headline`; None for a diverged run)."""
    last = next(r for r in reversed(payload["history"]) if r["scope"] == "epoch")
    hessian = hessian or {}
    number = lambda key: _finite(hessian.get(key))  # noqa: E731
    return {"run": run_name, "seed_index": k, "seed": seed, "source": source, "status": payload["status"],
            "epoch": int(payload["epoch"]), "train_loss": last["train_loss"], "train_accuracy": last["train_accuracy"],
            "test_loss": last["test_loss"], "test_accuracy": last["test_accuracy"],
            "generalization_gap": last["test_loss"] - last["train_loss"],
            "lambda_max": number("lambda_max"), "lambda_min": number("lambda_min"),
            "trace_hutchinson": number("trace_hutchinson"), "trace_hutchinson_stderr": number("trace_hutchinson_stderr"),
            "hvps": int(hessian.get("hvps", 0) or 0), "seconds": float(hessian.get("seconds", 0.0) or 0.0)}


def _finite(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean and two-sided Student-t confidence interval of the finite ``values``.

    :math:`\\bar x \\pm t_{(1+c)/2,\\,n-1}\\, s/\\sqrt n` with :math:`s` the sample standard deviation (n − 1). With
    fewer than two finite values the interval is undefined (``None``). Non-finite values (a diverged seed) are left
    out and counted in ``excluded``.
    """
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    n = len(finite)
    out: dict[str, Any] = {"n": n, "excluded": len(values) - n, "confidence": confidence,
                           "mean": statistics.fmean(finite) if n else None, "std": None, "half_width": None,
                           "low": None, "high": None, "values": finite}
    if n >= 2:
        from scipy.stats import t

        std = statistics.stdev(finite)
        half = float(t.ppf((1.0 + confidence) / 2.0, n - 1)) * std / math.sqrt(n)
        out.update(std=std, half_width=half, low=out["mean"] - half, high=out["mean"] + half)
    return out


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``seeds_metrics.json`` of one run: the number of seeds, those that completed, and an :func:`interval` per
    :data:`MEASURES` over the completed ones."""
    done = [r for r in rows if r["status"] == "completed"]
    return {"seeds": len(rows), "completed": len(done), "seed_values": [int(r["seed"]) for r in rows],
            **{m: interval([r[m] for r in done]) for m in MEASURES}}


def compare(a: str, sa: Mapping[str, Any], b: str, sb: Mapping[str, Any],
            measures: Sequence[str] = COMPARED) -> dict[str, Any]:
    """Run ``b`` against run ``a``, per measure: the ratio of means ``b / a`` and whether the two intervals are
    disjoint (``separate``), with a one-phrase verdict. Overlapping intervals mean the seeds cannot tell the runs
    apart at this number of seeds, not that they are equal."""
    out: dict[str, Any] = {}
    for m in measures:
        ia, ib = sa.get(m) or {}, sb.get(m) or {}
        ma, mb = ia.get("mean"), ib.get("mean")
        ratio = mb / ma if ma not in (None, 0.0) and mb is not None else None
        if None in (ia.get("low"), ib.get("low")):
            separate, verdict = None, "not testable (fewer than two completed seeds)"
        else:
            separate = ib["low"] > ia["high"] or ib["high"] < ia["low"]
            direction = "larger" if mb > ma else "smaller"
            verdict = (f"{b} {direction} (intervals separate)" if separate
                       else f"intervals overlap: not distinguished at n = {min(ia['n'], ib['n'])}")
        out[m] = {"ratio": ratio, "separate": separate, "verdict": verdict}
    return out


def comparisons(summaries: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Every pair of runs (in ``params`` order), keyed ``"<b> vs <a>"``: :func:`compare`."""
    names = list(summaries)
    return {f"{b} vs {a}": compare(a, summaries[a], b, summaries[b]) for a, b in itertools.combinations(names, 2)}
