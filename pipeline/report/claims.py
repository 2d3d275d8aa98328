"""What the landscape says: the seed's claims, each tested on the pipeline's numbers with a stated rule.

One :class:`Claim` per claim: the numbers it rests on, the test (the rule, written before any number is read) and
the verdict it gives — ``supported``, ``not supported`` or ``not testable at this size``. The verdicts are computed
here from ``metrics.json``, the ``sharpness_history`` tables and the flatness sweep's tables; none is written in
advance. The rules:

- (a) *skip connections smooth the landscape*: for each pair of runs of the same ResNet depth with and without skips,
  the 95 % intervals of λmax over the ``seeds`` stage's seeds: supported when the run without skips is sharper and
  the intervals separate; not supported when they overlap or separate the other way; not testable with fewer than
  two seeds or without such a pair. |λmin/λmax| (per seed) and the surface's basin fraction are shown beside it.
- (b) *SGD noise finds flatter minima* (flatness sweep): Kendall's τ of each sharpness measure against the batch
  size (expected > 0) and against the learning rate (expected < 0), over the completed points: supported when both
  have the expected sign at p < 0.05.
- (c) *λmax and flatness predict generalisation* (flatness sweep): per measure, Kendall's τ against the
  generalisation gap with its p-value and the granulated Ψ: supported when τ has the predicted sign at p < 0.05.
- (d) *the quadratic model predicts ΔL of a step*: over every tracked step with a finite model, the median relative
  error |ΔL − ΔL_quad| / |ΔL|; supported when it is below 0.2. Kendall's τ of the error against η·λmax/2 is shown.
- (e) *gradient descent trains at the stability threshold* (Cohen et al. 2021; Andreyev & Beneventano 2024 for SGD):
  full batch, λmax over the threshold in the last quarter of the tracked steps within [0.8, 1.25]; mini-batch SGD,
  the largest batch sharpness over the threshold after the first tracked step (the initialisation) within
  [0.8, 1.25] while λmax stays below it; Adam, λmax(P⁻¹H) over its threshold in the last quarter within the band.
"""

from __future__ import annotations

import html
import math
import re
import statistics
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pandas as pd

from pipeline.metrics import BY_NAME, interval
from pipeline.report.summary import _mean_interval as _iv

__all__ = [
    "SUPPORTED",
    "NOT_SUPPORTED",
    "NOT_TESTABLE",
    "ALPHA",
    "Claim",
    "resnet_pair_key",
    "skip_claims",
    "quadratic_claim",
    "threshold_claims",
    "sweep_claims",
    "report_claims",
    "claims_markdown",
    "claims_html",
    "CLAIMS_CAPTION",
    "reparam_rows",
    "reparam_markdown",
    "reparam_html",
    "REPARAM_CAPTION",
]

SUPPORTED, NOT_SUPPORTED, NOT_TESTABLE = "supported", "not supported", "not testable at this size"
ALPHA = 0.05  # significance level of every rank test
QUADRATIC_TOLERANCE = 0.2  # (d): median relative error of the quadratic model below this
THRESHOLD_BAND = (0.8, 1.25)  # (e): "at the threshold"
SHARPNESS_MEASURES = ("lambda_max", "adaptive_worst_l2", "adaptive_worst_linf")  # (b)
CLAIMS_CAPTION = (
    "Each verdict comes from the numbers by the rule in its row (pipeline/report/claims.py), never from text written "
    "in advance: 95 % intervals over the seeds stage's seeds that separate, or a rank test at p < 0.05."
)


@dataclass(frozen=True)
class Claim:
    """One tested claim: its letter, what it says, the numbers, the rule and the verdict."""

    key: str
    claim: str
    numbers: str
    test: str
    verdict: str


def _g(value: Any, digits: int = 4) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}g}"


def resnet_pair_key(config: Mapping[str, Any]) -> tuple[int, bool] | None:
    """(depth, skips) of a run's stored config (``model_name`` and ``model``), None when it is not a ResNet."""
    name = str(config.get("model_name", ""))
    model = config.get("model") or {}
    found = re.fullmatch(r"resnet(\d+)(_noshort)?", name)
    if found:
        return int(found.group(1)), found.group(2) is None
    if name == "resnet":
        return int(model.get("resnet_depth", 20)), bool(model.get("resnet_shortcut", True))
    return None


def _per_seed_ratio(seeds: Mapping[str, Any]) -> dict[str, Any] | None:
    top, low = (seeds.get("lambda_max") or {}).get("values"), (seeds.get("lambda_min") or {}).get("values")
    if not top or not low or len(top) != len(low):
        return None
    return interval([abs(a / b) for a, b in zip(low, top) if b])


def skip_claims(metrics: Mapping[str, Any], configs: Mapping[str, Mapping[str, Any]]) -> list[Claim]:
    """(a) at depth 20 and at the deepest depth with a pair of runs with and without skips (see the module)."""
    by_key = {}
    for run, config in configs.items():
        key = resnet_pair_key(config)
        if key is not None and run in metrics:
            by_key.setdefault(key, run)
    depths = sorted(d for d, skips in by_key if skips and (d, False) in by_key)
    claim = "skip connections smooth the landscape (Li et al. 2018)"
    rule = "λmax intervals over seeds: without skips above and separate → supported"
    preset = "presets/skip_connections.yaml runs depths 20 and 56"
    out = [
        _skip_row(metrics, by_key, 20, claim, rule)
        if 20 in depths
        else Claim(
            "a (depth 20)", claim, f"no pair of runs with and without skips at depth 20; {preset}", rule, NOT_TESTABLE
        )
    ]
    if depths and depths[-1] > 20:
        out.append(_skip_row(metrics, by_key, depths[-1], claim, rule))
    else:
        out.append(
            Claim(
                "a (deeper)",
                claim,
                f"no pair of runs with and without skips deeper than 20; {preset}",
                rule,
                NOT_TESTABLE,
            )
        )
    return out


def _skip_row(metrics, by_key, depth: int, claim: str, rule: str) -> Claim:
    skip, plain = by_key[(depth, True)], by_key[(depth, False)]
    s, p = metrics[skip].get("seeds") or {}, metrics[plain].get("seeds") or {}
    a, b = s.get("lambda_max") or {}, p.get("lambda_max") or {}
    ratio_s, ratio_p = _per_seed_ratio(s), _per_seed_ratio(p)
    basin_s = (metrics[skip].get("surface") or {}).get("basin_fraction")
    basin_p = (metrics[plain].get("surface") or {}).get("basin_fraction")
    numbers = (
        f"λmax {skip} {_iv(a)}, {plain} {_iv(b)}; |λmin/λmax| {_iv(ratio_s)} vs {_iv(ratio_p)}; "
        f"basin fraction (one seed) {_g(basin_s, 3)} vs {_g(basin_p, 3)}"
    )
    if a.get("low") is None or b.get("low") is None:
        verdict = NOT_TESTABLE
        numbers += " (fewer than two completed seeds)"
    elif b["low"] > a["high"]:
        verdict = SUPPORTED
    else:
        verdict = NOT_SUPPORTED
        numbers += " (intervals overlap)" if b["high"] >= a["low"] else " (without skips is flatter)"
    n = min(a.get("n", 0), b.get("n", 0))
    return Claim(f"a (depth {depth})", claim, numbers, f"{rule}, n = {n}", verdict)


def _kendall(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, int]:
    from scipy.stats import kendalltau

    pairs = [(float(a), float(b)) for a, b in zip(x, y) if math.isfinite(float(a)) and math.isfinite(float(b))]
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return math.nan, math.nan, len(pairs)
    result = kendalltau([a for a, _ in pairs], [b for _, b in pairs])
    return float(result.statistic), float(result.pvalue), len(pairs)


def quadratic_claim(histories: Mapping[str, pd.DataFrame]) -> Claim:
    """(d) from the runs' ``sharpness_history`` tables (see the module)."""
    frames = [h for h in histories.values() if h is not None and len(h)]
    rule = f"median relative error < {QUADRATIC_TOLERANCE:g} over the tracked steps → supported"
    claim = "the quadratic model predicts the loss change of a step"
    if not frames:
        return Claim("d", claim, "no tracked steps (train.track_sharpness_every: 0)", rule, NOT_TESTABLE)
    h = pd.concat(frames, ignore_index=True)
    h = h[pd.to_numeric(h["actual_change"], errors="coerce").abs() > 0]
    error = ((h["actual_change"] - h["predicted_change"]).abs() / h["actual_change"].abs()).astype(float)
    x = (h["lr"] * h["lambda_max"] / 2.0).astype(float)
    keep = error.map(math.isfinite) & x.map(math.isfinite)
    error, x = error[keep], x[keep]
    if len(error) < 3:
        return Claim("d", claim, f"{len(error)} tracked steps with a finite model", rule, NOT_TESTABLE)
    median = statistics.median(error)
    tau, p, n = _kendall(x, error)
    numbers = (
        f"median relative error {median:.3g} over {n} tracked steps (max {max(error):.3g}); η·λmax/2 from "
        f"{min(x):.3g} to {max(x):.3g}; Kendall τ(error, η·λmax/2) = {_g(tau, 3)} (p = {_g(p, 2)})"
    )
    return Claim("d", claim, numbers, rule, SUPPORTED if median < QUADRATIC_TOLERANCE else NOT_SUPPORTED)


def _within(value: Any) -> bool:
    return isinstance(value, (int, float)) and THRESHOLD_BAND[0] <= value <= THRESHOLD_BAND[1]


def _largest_ratio(history: pd.DataFrame | None, value: str, threshold: str) -> float | None:
    """max of ``value / threshold`` over the tracked steps after the first (the initialisation is no trained state,
    and a BatchNorm network's eval-mode curvature there rests on the default running statistics)."""
    if history is None or value not in history.columns or threshold not in history.columns:
        return None
    later = history[history["step"] > history["step"].min()]
    ratios = (later[value] / later[threshold]).astype(float)
    ratios = ratios[ratios.map(math.isfinite) & (later[threshold] > 0)]
    return float(ratios.max()) if len(ratios) else None


def threshold_claims(
    metrics: Mapping[str, Any],
    configs: Mapping[str, Mapping[str, Any]],
    histories: Mapping[str, pd.DataFrame | None] | None = None,
) -> list[Claim]:
    """(e) per run with tracked sharpness (see the module); the SGD rule reads the run's ``sharpness_history``."""
    histories = histories or {}
    out = []
    band = f"[{THRESHOLD_BAND[0]:g}, {THRESHOLD_BAND[1]:g}]"
    for run, config in configs.items():
        train = (metrics.get(run) or {}).get("train") or {}
        cfg = config.get("train") or {}
        if not train.get("tracked_steps"):
            continue
        if str(cfg.get("optimizer", "sgd")) != "sgd":
            ratio = train.get("preconditioned_over_threshold_last_quarter")
            out.append(
                Claim(
                    f"e ({run})",
                    "Adam's preconditioned sharpness trains at (2 + 2β₁)/((1 − β₁)η) (Cohen et al. 2022)",
                    f"λmax(P⁻¹H) / threshold, last quarter: {_g(ratio, 3)}",
                    f"last-quarter ratio within {band} → supported",
                    NOT_TESTABLE if ratio is None else SUPPORTED if _within(ratio) else NOT_SUPPORTED,
                )
            )
        elif str(cfg.get("batch_size")) == "full":
            ratio = train.get("sharpness_over_threshold_last_quarter")
            out.append(
                Claim(
                    f"e ({run})",
                    "full-batch gradient descent trains at the stability threshold (Cohen et al. 2021)",
                    f"λmax / threshold, last quarter of the tracked steps: {_g(ratio, 3)}",
                    f"last-quarter ratio within {band} → supported",
                    NOT_TESTABLE if ratio is None else SUPPORTED if _within(ratio) else NOT_SUPPORTED,
                )
            )
        else:
            history = histories.get(run)
            batch = _largest_ratio(history, "batch_sharpness", "stability_threshold")
            top = _largest_ratio(history, "lambda_max", "stability_threshold")
            numbers = (
                f"largest over the tracked steps after the first: batch sharpness / threshold {_g(batch, 3)}, "
                f"λmax / threshold {_g(top, 3)}; last quarter: "
                f"{_g(train.get('batch_sharpness_over_threshold_last_quarter'), 3)}"
            )
            if batch is None or top is None:
                verdict = NOT_TESTABLE
            else:
                verdict = SUPPORTED if _within(batch) and top < batch else NOT_SUPPORTED
            out.append(
                Claim(
                    f"e ({run})",
                    "SGD trains with its batch sharpness at the stability threshold (Andreyev & Beneventano 2024)",
                    numbers,
                    f"largest batch-sharpness ratio after the first tracked step within {band} and λmax's below it "
                    "→ supported",
                    verdict,
                )
            )
    if not out:
        out.append(
            Claim(
                "e",
                "gradient descent trains at the stability threshold",
                "no run tracked its sharpness",
                "",
                NOT_TESTABLE,
            )
        )
    return out


def sweep_claims(points: pd.DataFrame | None, kendall: pd.DataFrame | None) -> list[Claim]:
    """(b) and (c) from the flatness sweep's ``points`` rows and ``kendall`` table; not testable without them."""
    where = "the flatness sweep (`landscape sweep`; reports/sweep/README.md)"
    if points is None or kendall is None or points.empty:
        return [
            Claim("b", "SGD noise finds flatter minima", f"measured by {where}", "", NOT_TESTABLE),
            Claim("c", "λmax and flatness predict generalisation", f"measured by {where}", "", NOT_TESTABLE),
        ]
    done = points[points["status"] == "completed"]
    out = []
    for measure in [m for m in SHARPNESS_MEASURES if m in done.columns]:
        tb, pb, n = _kendall(done["batch_size"], done[measure])
        tl, pl, _ = _kendall(done["lr"], done[measure])
        verdict = (
            NOT_TESTABLE
            if math.isnan(tb) or math.isnan(tl)
            else SUPPORTED
            if tb > 0 and pb < ALPHA and tl < 0 and pl < ALPHA
            else NOT_SUPPORTED
        )
        out.append(
            Claim(
                f"b ({BY_NAME[measure].label})",
                "SGD noise finds flatter minima (Keskar et al. 2017)",
                f"τ(batch size) = {_g(tb, 3)} (p = {_g(pb, 2)}), τ(lr) = {_g(tl, 3)} (p = {_g(pl, 2)}), n = {n}",
                "τ(batch size) > 0 and τ(lr) < 0, both at p < 0.05 → supported",
                verdict,
            )
        )
    for row in kendall.to_dict("records"):
        if row["expected_sign"] == "none":
            continue
        tau, p = row["tau"], row["p_value"]
        verdict = (
            NOT_TESTABLE
            if tau is None or math.isnan(tau)
            else SUPPORTED
            if row["agrees"] and p < ALPHA
            else NOT_SUPPORTED
        )
        out.append(
            Claim(
                f"c ({BY_NAME[row['measure']].label})",
                "the measure predicts the generalisation gap (Jiang et al. 2019)",
                f"τ = {_g(tau, 3)} (p = {_g(p, 2)}, n = {row['n']}), Ψ = {_g(row.get('psi'), 3)}",
                f"τ of the predicted sign ({row['expected_sign']}) at p < 0.05 → supported",
                verdict,
            )
        )
    return out


def report_claims(
    metrics: Mapping[str, Any],
    configs: Mapping[str, Mapping[str, Any]],
    histories: Mapping[str, pd.DataFrame],
) -> list[Claim]:
    """The main report's claims: (a), (d) and (e) from its runs; (b) and (c) belong to the flatness sweep."""
    return [
        *skip_claims(metrics, configs),
        *sweep_claims(None, None),
        quadratic_claim(histories),
        *threshold_claims(metrics, configs, histories),
    ]


def _cell(text: str) -> str:
    """A markdown table cell: a ``|`` inside (as in |λmin/λmax|) would end the cell."""
    return str(text).replace("|", "\\|")


def claims_markdown(claims: Sequence[Claim]) -> str:
    """The claims table in markdown (empty without claims)."""
    if not claims:
        return ""
    lines = ["| claim | says | numbers | test | verdict |", "|---|---|---|---|---|"]
    lines += [
        "| " + " | ".join(_cell(v) for v in (c.key, c.claim, c.numbers, c.test)) + f" | **{c.verdict}** |"
        for c in claims
    ]
    return "\n".join(lines)


def claims_html(claims: Sequence[Claim]) -> str:
    """The claims section in HTML (empty without claims)."""
    if not claims:
        return ""
    head = "".join(f"<th>{h}</th>" for h in ("claim", "says", "numbers", "test", "verdict"))
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in (c.key, c.claim, c.numbers, c.test)) + f"<td><b>"
        f"{html.escape(c.verdict)}</b></td></tr>"
        for c in claims
    )
    return (
        f"<h2>What the landscape says</h2><div class='wide'><table id='claims'><tr>{head}</tr>{body}</table></div>"
        f"<p class='meta'>{html.escape(CLAIMS_CAPTION)}</p>"
    )


# (key in hessian_metrics.json's reparametrisation.measures, label, what an invariant measure does)
REPARAM_LABELS = (
    ("lambda_max", "λmax"),
    ("trace_hutchpp", "tr H (Hutch++)"),
    ("grad_sharpness", "g'Hg/|g|²"),
    ("epsilon_sharpness_absolute", "ε-sharpness, L2 ball"),
    ("epsilon_sharpness_relative", "ε-sharpness, Keskar's box"),
    ("pac_bayes_sigma_isotropic", "PAC-Bayes σ"),
    ("pac_bayes_sigma_magnitude", "PAC-Bayes σ, magnitude"),
    ("adaptive_sharpness_worst_l2", "adaptive, worst l2"),
    ("adaptive_sharpness_worst_linf", "adaptive, worst l∞"),
    ("adaptive_sharpness_average_l2", "adaptive, average (Gaussian)"),
    ("adaptive_sharpness_average_linf", "adaptive, average (uniform)"),
)
INVARIANCE_TOLERANCE = 0.01  # |ratio - 1| below this: the measure does not move
REPARAM_CAPTION = (
    "Dinh et al. (2017): the first ReLU layer pair of the network rescaled by α and 1/α (the same function: the "
    "outputs' relative change is shown), every measure computed again with the same seeds and draws. A measure "
    f"that moves (|after/before − 1| ≥ {INVARIANCE_TOLERANCE:g}) measures the parametrisation, not the minimum."
)


def reparam_rows(metrics: Mapping[str, Any], runs: Sequence[str]) -> list[dict[str, str]]:
    """One row per (run with a ``reparametrisation`` entry, measure): before, after, ratio and moves / invariant."""
    rows = []
    for run in runs:
        entry = ((metrics.get(run) or {}).get("hessian") or {}).get("reparametrisation")
        if not entry:
            continue
        alpha, change = entry.get("alpha"), entry.get("output_change")
        for key, label in REPARAM_LABELS:
            m = (entry.get("measures") or {}).get(key)
            if not m:
                continue
            ratio = m.get("ratio")
            rows.append(
                {
                    "run": f"{run} (α = {_g(alpha, 3)}, outputs ±{_g(change, 2)})",
                    "measure": label,
                    "before": _g(m.get("before")),
                    "after": _g(m.get("after")),
                    "ratio": _g(ratio),
                    "verdict": "–"
                    if ratio is None
                    else "invariant"
                    if abs(ratio - 1) < INVARIANCE_TOLERANCE
                    else "moves",
                }
            )
    return rows


def reparam_markdown(rows: Sequence[Mapping[str, str]]) -> str:
    if not rows:
        return ""
    lines = ["| run | measure | before | after | after / before | |", "|---|---|---:|---:|---:|---|"]
    lines += [
        f"| {r['run']} | {r['measure']} | {r['before']} | {r['after']} | {r['ratio']} | {r['verdict']} |" for r in rows
    ]
    return "\n".join(lines)


def reparam_html(rows: Sequence[Mapping[str, str]]) -> str:
    if not rows:
        return ""
    keys = ("run", "measure", "before", "after", "ratio", "verdict")
    head = "".join(f"<th>{h}</th>" for h in ("run", "measure", "before", "after", "after / before", ""))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(r[k])}</td>" for k in keys) + "</tr>" for r in rows)
    return (
        f"<h2>Reparametrisation (Dinh et al.)</h2><table id='reparam'><tr>{head}</tr>{body}</table>"
        f"<p class='meta'>{html.escape(REPARAM_CAPTION)}</p>"
    )
