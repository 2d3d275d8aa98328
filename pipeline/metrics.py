"""Every ``metrics.json`` headline in one place: the measures, where each is read from, and the hessian headline.

``reports/metrics.json`` is ``{run: {stage: {key: value}}}`` (each stage's ``*_metrics.json``) plus the
``comparisons`` across runs. The seeds' intervals (:func:`summarise`) and the comparisons (:func:`comparisons`)
are made here too. :data:`MEASURES` names the flatness and sharpness measures that the report, the sweep
and ``landscape compare`` read from it, each with its sources in order of preference (the first one present wins:
:func:`source`, :func:`lookup`) — the one table of metric names and their fallbacks. :func:`hessian_headline` makes
the ``hessian`` stage's numbers; the flatness sweep uses the same function, so a sweep point's numbers have exactly
the keys and meaning of a run's. No Prefect here.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from pipeline.io import finite

__all__ = [
    "Measure",
    "MEASURES",
    "MEASURE_NAMES",
    "BY_NAME",
    "source",
    "lookup",
    "hessian_headline",
    "SEED_MEASURES",
    "COMPARED",
    "interval",
    "summarise",
    "compare",
    "comparisons",
    "collect",
    "metrics_json",
]

CONFIDENCE = 0.95
# The per-seed numbers (columns of the `seeds` table) that get an interval in `seeds_metrics.json`.
SEED_MEASURES = (
    "test_accuracy",
    "test_loss",
    "train_loss",
    "generalization_gap",
    "lambda_max",
    "lambda_min",
    "trace_hutchinson",
)
# The ones compared between runs in the `comparisons` of `metrics.json` (ratio of means, do the intervals separate).
COMPARED = ("lambda_max", "trace_hutchinson", "test_accuracy", "generalization_gap")


@dataclass(frozen=True)
class Measure:
    """A flatness or sharpness measure read from ``metrics.json``.

    ``sources`` are (stage, key) pairs, the first present one wins. ``expected_sign`` is the sign of Kendall's tau
    between the measure and the generalisation gap that the flatness hypothesis predicts: +1 for a sharpness
    measure (sharper, larger gap), -1 for a flatness measure (flatter, smaller gap), 0 for no prediction.
    """

    name: str
    sources: tuple[tuple[str, str], ...]
    expected_sign: int
    label: str
    meaning: str


MEASURES: tuple[Measure, ...] = (
    Measure(
        "lambda_max",
        (("hessian", "lambda_max"),),
        +1,
        "λmax",
        "top Hessian eigenvalue of the probe-set loss at the final checkpoint",
    ),
    Measure(
        "trace",
        (("hessian", "trace_hutchpp"), ("hessian", "trace_hutchinson")),
        +1,
        "tr H",
        "Hessian trace (Hutch++ when computed, else Hutchinson)",
    ),
    Measure(
        "epsilon_sharpness_absolute",
        (("hessian", "epsilon_sharpness_absolute"),),
        +1,
        "ε-sharpness, L2 ball",
        "largest loss increase found in an L2 ball of radius hessian.flatness_radius (nats)",
    ),
    Measure(
        "epsilon_sharpness_relative",
        (("hessian", "epsilon_sharpness_relative"),),
        +1,
        "ε-sharpness, box",
        "largest loss increase found in the box |δ_i| <= hessian.flatness_box (|w_i| + 1) (nats)",
    ),
    Measure(
        "epsilon_sharpness_keskar_absolute",
        (("hessian", "epsilon_sharpness_keskar_absolute"),),
        +1,
        "Keskar sharpness, L2 ball",
        "100 · increase / (1 + L) in the L2 ball (percent)",
    ),
    Measure(
        "epsilon_sharpness_keskar_relative",
        (("hessian", "epsilon_sharpness_keskar_relative"),),
        +1,
        "Keskar sharpness, box",
        "100 · increase / (1 + L) in the box: Keskar et al.'s metric (percent)",
    ),
    Measure(
        "grad_sharpness",
        (("hessian", "grad_sharpness"),),
        +1,
        "g'Hg/|g|²",
        "curvature along the probe-set gradient at the final checkpoint",
    ),
    Measure(
        "pac_bayes_sigma_isotropic",
        (("hessian", "pac_bayes_sigma_isotropic"),),
        -1,
        "PAC-Bayes σ",
        "largest isotropic weight-noise scale keeping the expected loss increase within hessian.pac_bayes_bound "
        "(larger: flatter)",
    ),
    Measure(
        "pac_bayes_sigma_magnitude",
        (("hessian", "pac_bayes_sigma_magnitude"),),
        -1,
        "PAC-Bayes σ, magnitude",
        "the same with noise proportional to |w_i| (Jiang et al.'s magnitude-aware σ'; larger: flatter)",
    ),
    Measure(
        "adaptive_worst_l2",
        (("hessian", "adaptive_sharpness_worst_l2"),),
        +1,
        "adaptive, worst l2",
        "largest loss increase found with ||δ/|w| ||₂ <= hessian.adaptive_l2, mean over batches of "
        "hessian.adaptive_m samples (m-sharpness, Auto-PGD; nats)",
    ),
    Measure(
        "adaptive_worst_linf",
        (("hessian", "adaptive_sharpness_worst_linf"),),
        +1,
        "adaptive, worst l∞",
        "the same with |δ_i| <= hessian.adaptive_linf |w_i| (nats)",
    ),
    Measure(
        "adaptive_average_l2",
        (("hessian", "adaptive_sharpness_average_l2"),),
        +1,
        "adaptive, average (Gaussian)",
        "expected loss increase for δ = hessian.adaptive_average |w| ⊙ z, z standard normal (nats)",
    ),
    Measure(
        "adaptive_average_linf",
        (("hessian", "adaptive_sharpness_average_linf"),),
        +1,
        "adaptive, average (uniform)",
        "the same with z uniform in [-1, 1] (nats)",
    ),
    # No prediction: B_simple = tr Σ / |g|² is a property of the gradient, not of the curvature, and at a minimum it
    # grows like 1/|g|², i.e. it says how close to a stationary point training stopped. Keskar et al.'s argument is
    # about the noise *during* training (set by the batch size), which batch_size_effect tests instead.
    Measure(
        "noise_scale",
        (("hessian", "noise_scale"),),
        0,
        "B_simple",
        "gradient noise scale tr(Σ)/|g|² at the final checkpoint (samples; McCandlish et al. 2018)",
    ),
    Measure(
        "lambda_max_lr_over_2",
        (("hessian", "lambda_max_lr_over_2"),),
        +1,
        "λmax·η/2",
        "λmax against the stability bound 2/η of the peak learning rate (>= 1: GD unstable)",
    ),
    # No prediction: the barrier separates two independently trained minima (linear mode connectivity); it is not a
    # property of the neighbourhood of one minimum, which is what the flatness hypothesis is about.
    Measure(
        "barrier",
        (("interpolate", "barrier_train"), ("interpolate", "barrier")),
        0,
        "barrier",
        "loss barrier on the straight path to the second-seed model (train split, nats)",
    ),
    Measure(
        "basin_fraction",
        (("surface", "basin_fraction"),),
        -1,
        "basin fraction",
        "fraction of the filter-normalised 2-D grid within 0.1 nats of the trained loss (larger: flatter)",
    ),
)


MEASURE_NAMES: tuple[str, ...] = tuple(m.name for m in MEASURES)


BY_NAME = {m.name: m for m in MEASURES}


def source(stages: Mapping[str, Any], measure: Measure | str) -> tuple[str, str] | None:
    """The ``(stage, key)`` of ``measure`` present in one run's ``stages`` (first of its sources), or None."""
    measure = BY_NAME[measure] if isinstance(measure, str) else measure
    for stage, key in measure.sources:
        section = stages.get(stage)
        if isinstance(section, Mapping) and section.get(key) is not None:
            return stage, key
    return None


def lookup(stages: Mapping[str, Any], measure: Measure | str) -> Any:
    """The raw value of ``measure`` in one run's ``stages`` (first present source), or None."""
    found = source(stages, measure)
    return None if found is None else stages[found[0]][found[1]]


RESCALED = "hessian_rescaled"  # analysis.RESCALED: the operator of the rows measured on the rescaled network
# hessian headlines compared before and after Dinh et al.'s rescaling (`reparametrisation` in hessian_metrics.json)
REPARAM_KEYS = (
    "lambda_max",
    "trace_hutchpp",
    "trace_hutchinson",
    "grad_sharpness",
    "epsilon_sharpness_absolute",
    "epsilon_sharpness_relative",
    "pac_bayes_sigma_isotropic",
    "pac_bayes_sigma_magnitude",
    "adaptive_sharpness_worst_l2",
    "adaptive_sharpness_worst_linf",
    "adaptive_sharpness_average_l2",
    "adaptive_sharpness_average_linf",
)


def _measured(last: pd.DataFrame, operator: str) -> dict:
    """The whole-network numbers of one checkpoint's rows ``last`` for ``operator`` (hessian or hessian_rescaled)."""

    def pick(quantity="eigenvalue", method=None, index=0):
        rows = last[
            (last.operator == operator) & (last.group == "all") & (last.quantity == quantity) & (last["index"] == index)
        ]
        if method is not None:
            rows = rows[rows.method == method]
        return rows.iloc[0] if len(rows) else None

    out: dict[str, Any] = {}
    top = pick()
    if top is None:
        return out
    out["lambda_max"] = float(top.value)
    out["lambda_max_residual"] = float(top.residual)
    out["eigenvalues"] = [
        float(r.value)
        for r in last[(last.operator == operator) & (last.group == "all") & (last.quantity == "eigenvalue")]
        .sort_values("index")
        .itertuples()
    ]
    low = pick(quantity="lambda_min")
    if low is not None:
        out["lambda_min"] = float(low.value)
        out["lambda_min_residual"] = float(low.residual)
    for method in ("hutchinson", "hutchpp"):
        trace = pick(quantity="trace", method=method)
        if trace is not None:
            out[f"trace_{method}"] = float(trace.value)
            out[f"trace_{method}_stderr"] = float(trace.stderr)
    for quantity in ("noise_scale", "noise_trace_covariance", "grad_sharpness"):
        row = pick(quantity=quantity)
        if row is not None:
            out[quantity] = float(row.value)
    for quantity, method in (
        ("epsilon_sharpness", "absolute"),
        ("epsilon_sharpness", "relative"),
        ("epsilon_sharpness_keskar", "absolute"),
        ("epsilon_sharpness_keskar", "relative"),
        ("pac_bayes_sigma", "isotropic"),
        ("pac_bayes_sigma", "magnitude"),
        ("adaptive_sharpness", "worst_l2"),
        ("adaptive_sharpness", "worst_linf"),
        ("adaptive_sharpness", "average_l2"),
        ("adaptive_sharpness", "average_linf"),
    ):
        row = pick(quantity=quantity, method=method)
        if row is not None:
            out[f"{quantity}_{method}"] = float(row.value)
    return out


def reparam_headline(last: pd.DataFrame, before: Mapping[str, Any]) -> dict | None:
    """``reparametrisation`` of ``hessian_metrics.json``: the rescaling (α, the layer pair, the relative change of
    the outputs) and, per :data:`REPARAM_KEYS` measured both times, ``before``, ``after`` and ``ratio`` = after /
    before. None when the checkpoint has no rows of the rescaled network."""
    after = _measured(last, RESCALED)
    if not after:
        return None
    meta = last[(last.operator == RESCALED) & (last.quantity == "reparam_alpha")]
    change = last[(last.operator == RESCALED) & (last.quantity == "reparam_output_change")]
    measures = {}
    for key in REPARAM_KEYS:
        if key in before and key in after:
            b, a = before[key], after[key]
            measures[key] = {"before": b, "after": a, "ratio": a / b if b not in (0.0, None) else None}
    return {
        "alpha": float(meta.value.iloc[0]) if len(meta) else None,
        "pair": meta.method.iloc[0].split(",") if len(meta) else [],
        "output_change": float(change.value.iloc[0]) if len(change) else None,
        "measures": {k: {f: finite(v) for f, v in m.items()} for k, m in measures.items()},
    }


def hessian_headline(spectrum: pd.DataFrame, peak_lr: float) -> dict:
    """The ``hessian`` numbers of ``metrics.json``: those of the newest checkpoint in ``spectrum`` (the
    ``hessian_spectrum`` table, or the rows of :func:`pipeline.curvature.analysis.analyse` with ``epoch`` and
    ``checkpoint`` columns added), plus the products and seconds spent over all of its checkpoints, and (when the
    newest checkpoint has them) the measures on the rescaled network, ``reparametrisation`` (:func:`reparam_headline`).

    ``lambda_max_lr_over_2`` uses ``peak_lr``; non-finite numbers become ``None`` (strict JSON).
    """
    if spectrum.empty:
        return {"status": "no finite checkpoint"}
    last = spectrum[spectrum.epoch == spectrum.epoch.max()]
    out: dict[str, Any] = {"epoch": int(last.epoch.iloc[0]), "checkpoint": last.checkpoint.iloc[0]}
    measured = _measured(last, "hessian")
    out["lambda_max"] = measured.pop("lambda_max")
    out["lambda_max_residual"] = measured.pop("lambda_max_residual")
    out["lambda_max_lr_over_2"] = out["lambda_max"] * peak_lr / 2.0  # > 1: sharper than GD at the peak lr tolerates
    out.update(measured)
    ggn = last[
        (last.operator == "ggn") & (last.group == "all") & (last.quantity == "eigenvalue") & (last["index"] == 0)
    ]
    if len(ggn):
        out["ggn_lambda_max"] = float(ggn.value.iloc[0])
    totals = spectrum[spectrum.quantity == "products"]  # one row per checkpoint: every product and second spent
    out["hvps"] = int(totals.hvps.sum())
    out["seconds"] = round(float(totals.seconds.sum()), 3)
    out = {k: (finite(v) if isinstance(v, float) else v) for k, v in out.items()}
    reparam = reparam_headline(last, out)
    if reparam is not None:
        out["reparametrisation"] = reparam
    return out


# ---------------------------------------------------------------------------------------------------------
# Across seeds (`seeds_metrics.json`) and across runs (`comparisons`)


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean and two-sided Student-t confidence interval of the finite ``values``.

    :math:`\\bar x \\pm t_{(1+c)/2,\\,n-1}\\, s/\\sqrt n` with :math:`s` the sample standard deviation (n − 1). With
    fewer than two finite values the interval is undefined (``None``). Non-finite values (a diverged seed) are left
    out and counted in ``excluded``.
    """
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    n = len(finite)
    out: dict[str, Any] = {
        "n": n,
        "excluded": len(values) - n,
        "confidence": confidence,
        "mean": statistics.fmean(finite) if n else None,
        "std": None,
        "half_width": None,
        "low": None,
        "high": None,
        "values": finite,
    }
    if n >= 2:
        from scipy.stats import t

        std = statistics.stdev(finite)
        half = float(t.ppf((1.0 + confidence) / 2.0, n - 1)) * std / math.sqrt(n)
        out.update(std=std, half_width=half, low=out["mean"] - half, high=out["mean"] + half)
    return out


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``seeds_metrics.json`` of one run: the number of seeds, those that completed, and an :func:`interval` per
    :data:`SEED_MEASURES` over the completed ones."""
    done = [r for r in rows if r["status"] == "completed"]
    return {
        "seeds": len(rows),
        "completed": len(done),
        "seed_values": [int(r["seed"]) for r in rows],
        **{m: interval([r[m] for r in done]) for m in SEED_MEASURES},
    }


def compare(
    a: str, sa: Mapping[str, Any], b: str, sb: Mapping[str, Any], measures: Sequence[str] = COMPARED
) -> dict[str, Any]:
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
            verdict = (
                f"{b} {direction} (intervals separate)"
                if separate
                else f"intervals overlap: not distinguished at n = {min(ia['n'], ib['n'])}"
            )
        out[m] = {"ratio": ratio, "separate": separate, "verdict": verdict}
    return out


def comparisons(summaries: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Every pair of runs (in ``params`` order), keyed ``"<b> vs <a>"``: :func:`compare`."""
    names = list(summaries)
    return {f"{b} vs {a}": compare(a, summaries[a], b, summaries[b]) for a, b in itertools.combinations(names, 2)}


# ---------------------------------------------------------------------------------------------------------
# reports/metrics.json


def collect(tables_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``{run: {stage: metrics}}`` from every ``<tables_dir>/<run>/<stage>_metrics.json`` (train, hessian, ...),
    for the runs that have a ``train`` entry."""
    collected: dict[str, dict] = {}
    for path in sorted(Path(tables_dir).glob("*/*_metrics.json")):
        stage = path.name[: -len("_metrics.json")]
        collected.setdefault(path.parent.name, {})[stage] = json.loads(path.read_text())
    return {run: m for run, m in collected.items() if "train" in m}


def metrics_json(collected: Mapping[str, Mapping[str, Any]], runs: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """``reports/metrics.json`` of the configured ``runs`` (in their order) and the runs that have no metrics yet.

    With two or more seeded runs it carries ``comparisons``: every pair's ratio of means and whether their
    intervals over seeds separate (:func:`comparisons`).
    """
    metrics = {name: collected[name] for name in runs if name in collected}
    missing = [name for name in runs if name not in collected]
    seeded = {name: m["seeds"] for name, m in metrics.items() if "seeds" in m}
    if len(seeded) >= 2:
        metrics["comparisons"] = comparisons(seeded)
    return metrics, missing
