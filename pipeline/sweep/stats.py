"""Do flatter minima generalise better? Rank correlations between flatness measures and the generalisation gap
over the experiments of a ``dvc exp`` sweep (Keskar et al. 2017; Jiang et al. 2019, "Fantastic generalization
measures and where to find them").

A sweep is a set of experiments, each with its own ``params.yaml`` (``train.lr``, ``train.batch_size``,
``train.seed``, the ``runs`` section) and its own ``reports/metrics.json`` (``{run: {stage: {key: value}}}``).

- :func:`sweep_rows` / :func:`rows_from_exp_show`: one tidy row per (experiment, run): the hyper-parameters, the
  status, the generalisation gap and one column per measure of :data:`MEASURES`.
- :func:`kendall_table`: per measure, Kendall's tau-b against the gap over the completed runs, the sign the flatness
  hypothesis expects, and Jiang et al.'s granulated coefficient Psi (see :func:`granulated_tau`).
- :func:`batch_size_effect`: per (model, lr), tau between batch size and a measure (Keskar et al.: larger batches,
  less gradient noise, sharper minima).
- :func:`plot_sweep`, :func:`markdown_table`: the figure and the table of the report.

Only runs with status ``completed`` and finite numbers enter a correlation; diverged, failed, queued or unfinished
runs stay in the frame with their status.
"""

from __future__ import annotations

import json
import math
import warnings
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import matplotlib

matplotlib.use("Agg")  # no display: figures are files

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.stats import kendalltau  # noqa: E402

from pipeline.io import finite
from pipeline.metrics import BY_NAME, MEASURE_NAMES, MEASURES, lookup

# Targets and the sign that turns "larger gap" into their direction: a larger gap means a lower test accuracy.
# ``accuracy_gap`` (train - test accuracy) is Jiang et al.'s choice; the loss gap is the default here.
TARGETS: dict[str, tuple[int, str]] = {
    "generalization_gap": (+1, "generalisation gap (test − train loss, nats)"),
    "accuracy_gap": (+1, "accuracy gap (train − test accuracy)"),
    "test_accuracy": (-1, "test accuracy"),
}


# Hyper-parameter axes of the granulated coefficient; the seed is held fixed inside every group but is not an axis.
GRANULATED_AXES: tuple[str, ...] = ("lr", "batch_size", "model")


FIXED_IN_GROUPS: tuple[str, ...] = ("seed",)


ROW_COLUMNS: tuple[str, ...] = (
    "experiment",
    "run",
    "model",
    "lr",
    "batch_size",
    "seed",
    "status",
    "generalization_gap",
    "accuracy_gap",
    "test_accuracy",
    "train_accuracy",
    *MEASURE_NAMES,
)


KENDALL_COLUMNS: tuple[str, ...] = (
    "measure",
    "expected_sign",
    "tau",
    "p_value",
    "n",
    "observed_sign",
    "agrees",
    "significant",
    "verdict",
    "psi",
    *(f"psi_{a}" for a in GRANULATED_AXES),
    *(f"groups_{a}" for a in GRANULATED_AXES),
)


COMPLETED = "completed"


# Executor states of `dvc exp show` whose metrics are not the experiment's own: a failed queued experiment shows the
# metrics of the workspace it was queued from (checked with DVC 3.67), a queued or running one has none yet.
_NOT_FINISHED = ("failed", "queued", "running")


_SIGN = {+1: "+", -1: "-", 0: "none"}


def _number(value: Any) -> float:
    """A finite float, or NaN for None, booleans, text and non-finite numbers (a frame's missing value)."""
    return finite(value, math.nan)


class Experiment(NamedTuple):
    """One experiment of a sweep: the contents of its ``params.yaml`` and ``reports/metrics.json``.

    ``state`` is the executor state ``dvc exp show`` reports (``success``, ``failed``, ``queued``, ``running``) or
    ``None`` (ran in the workspace). For ``failed``, ``queued`` and ``running`` the metrics are ignored.
    """

    name: str
    params: Mapping[str, Any]
    metrics: Mapping[str, Any] | None
    state: str | None = None


def _run_setting(params: Mapping[str, Any], run: str, key: str) -> Any:
    """``runs.<run>.<key>`` when the run overrides it, else ``train.<key>``; None when neither is set."""
    override = (params.get("runs") or {}).get(run) or {}
    if key in override:
        return override[key]
    return (params.get("train") or {}).get(key)


def _row(
    name: str, run: str | None, params: Mapping[str, Any], stages: Mapping[str, Any], state: str | None
) -> dict[str, Any]:
    train = stages.get("train") if isinstance(stages.get("train"), Mapping) else {}
    if state in _NOT_FINISHED:
        status = state
    elif train:
        status = str(train.get("status", "unknown"))
    else:
        status = "not trained"
    runs = params.get("runs") or {}
    model = (runs.get(run) or {}).get("model") if run is not None else None
    train_acc, test_acc = _number(train.get("train_accuracy")), _number(train.get("test_accuracy"))
    row = {
        "experiment": name,
        "run": run,
        "model": None if model is None else str(model),
        "lr": _number(_run_setting(params, run, "lr")),
        "batch_size": _number(_run_setting(params, run, "batch_size")),
        "seed": _number(_run_setting(params, run, "seed")),
        "status": status,
        "generalization_gap": _number(train.get("generalization_gap")),
        "accuracy_gap": train_acc - test_acc,  # NaN when either is missing
        "test_accuracy": test_acc,
        "train_accuracy": train_acc,
    }
    row.update({m.name: _number(lookup(stages, m)) for m in MEASURES})
    return row


def sweep_rows(experiments: Iterable[Experiment | tuple]) -> pd.DataFrame:
    """One row per (experiment, run) of a sweep, with the columns of :data:`ROW_COLUMNS`.

    Args:
        experiments: ``Experiment`` or plain ``(name, params, metrics[, state])`` tuples; ``params`` is the parsed
            ``params.yaml``, ``metrics`` the parsed ``reports/metrics.json`` (``None`` or ``{}`` when missing).

    Returns:
        The runs are those of ``params['runs']`` and of the metrics, in that order (an experiment with neither gets
        one row with run ``None``). ``lr``, ``batch_size`` and ``seed`` come from ``runs.<run>`` when the run
        overrides them, else from ``train``; ``model`` from ``runs.<run>.model`` (missing when the run is not in
        ``params``). ``status`` is the train stage's status (``completed``, ``diverged``, ...), the experiment's
        state when it ``failed`` or is ``queued`` or ``running``, or ``not trained``. Numbers are floats, NaN where
        missing or non-finite.
    """
    rows = []
    for item in experiments:
        exp = item if isinstance(item, Experiment) else Experiment(*item)
        params = exp.params or {}
        metrics = {} if exp.state in _NOT_FINISHED else (exp.metrics or {})
        runs = list(params.get("runs") or {})
        runs += [r for r in metrics if r not in runs and isinstance(metrics[r], Mapping)]
        for run in runs or [None]:
            rows.append(_row(str(exp.name), run, params, metrics.get(run, {}) if run is not None else {}, exp.state))
    frame = pd.DataFrame(rows, columns=list(ROW_COLUMNS))
    numeric = [c for c in ROW_COLUMNS if c not in ("experiment", "run", "model", "status")]
    frame[numeric] = frame[numeric].astype(float)
    return frame


def _file_data(section: Any, path: str) -> dict[str, Any]:
    """``data`` of one file in a rev's ``params`` or ``metrics``; {} when absent or unreadable (``error``)."""
    entry = (section or {}).get(path) or {}
    data = entry.get("data") if isinstance(entry, Mapping) and not entry.get("error") else None
    return dict(data) if isinstance(data, Mapping) else {}


def _rev_name(rev: Mapping[str, Any]) -> str:
    """The rev's ``name``, else its commit abbreviated to 7 digits (``workspace`` stays whole)."""
    sha = str(rev.get("rev", "?"))
    return rev.get("name") or (sha[:7] if len(sha) == 40 else sha)


def _experiment(
    rev: Mapping[str, Any], name: str, state: str | None, params_file: str, metrics_file: str
) -> Experiment:
    data = rev.get("data") or {}
    if rev.get("error"):
        state = "failed"
    return Experiment(
        name, _file_data(data.get("params"), params_file), _file_data(data.get("metrics"), metrics_file), state
    )


def experiments_from_exp_show(
    shown: Any,
    *,
    params_file: str = "params.yaml",
    metrics_file: str = "reports/metrics.json",
    include_baseline: bool = False,
) -> list[Experiment]:
    """The experiments in the output of ``dvc exp show --json`` (DVC 3).

    The output is a list with one entry per baseline (``workspace``, then each commit); a commit's ``experiments``
    list holds ``{name, executor: {state} | null, revs: [{name, rev, error, data: {params, metrics}}]}``, the
    newest rev first. A rev whose ``error`` is set, or whose executor state is ``failed``, is a failed experiment.

    Args:
        shown: the parsed JSON, or its text.
        params_file, metrics_file: the files to read from each rev's ``params`` and ``metrics``.
        include_baseline: also the baselines themselves (the workspace and the commits).

    Raises:
        ValueError: ``shown`` is not a list of objects (e.g. the dict that DVC 2 printed).
    """
    if isinstance(shown, (str, bytes)):
        shown = json.loads(shown)
    if not isinstance(shown, list) or not all(isinstance(e, Mapping) for e in shown):
        raise ValueError(
            f"dvc exp show --json: expected a list of baseline objects (DVC >= 3), got {type(shown).__name__}"
        )
    out = []
    for baseline in shown:
        if include_baseline:
            out.append(_experiment(baseline, _rev_name(baseline), None, params_file, metrics_file))
        for exp in baseline.get("experiments") or []:
            revs = exp.get("revs") or []
            if not revs:
                continue
            rev = revs[0]
            name = exp.get("name") or _rev_name(rev)
            state = (exp.get("executor") or {}).get("state")
            out.append(_experiment(rev, name, state, params_file, metrics_file))
    return out


def rows_from_exp_show(shown: Any, **kwargs: Any) -> pd.DataFrame:
    """:func:`sweep_rows` of :func:`experiments_from_exp_show` (same keyword arguments)."""
    return sweep_rows(experiments_from_exp_show(shown, **kwargs))


def check_frame(frame: pd.DataFrame, columns: Iterable[str], name: str = "frame") -> None:
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"{name}: expected a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name}: missing column(s) {', '.join(repr(c) for c in missing)}")


def check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"target: {target!r} is not one of {', '.join(TARGETS)}")


def completed_rows(frame: pd.DataFrame, columns: Sequence[str] = ()) -> pd.DataFrame:
    """The rows with status ``completed`` whose ``columns`` are all finite numbers."""
    check_frame(frame, ["status", *columns])
    keep = frame["status"] == COMPLETED
    for column in columns:
        keep &= np.isfinite(pd.to_numeric(frame[column], errors="coerce").astype(float))
    return frame[keep]


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, int]:
    """Kendall's tau-b between ``x`` and ``y`` over the pairs where both are finite.

    .. math:: \\tau_b = \\frac{n_c - n_d}{\\sqrt{(n_0 - n_x)(n_0 - n_y)}}, \\quad n_0 = n(n-1)/2,

    with :math:`n_c, n_d` the concordant and discordant pairs and :math:`n_x, n_y` the pairs tied in x and in y.

    Returns:
        (tau, two-sided p-value, n); tau and p are NaN when n < 2 or either side is constant.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(x.size)
    if n < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan, math.nan, n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's small-sample notes; the cases it warns about are excluded above
        result = kendalltau(x, y, variant="b")
    return float(result.statistic), float(result.pvalue), n


def granulated_tau(
    frame: pd.DataFrame,
    measure: str,
    target: str = "generalization_gap",
    *,
    axes: Sequence[str] = GRANULATED_AXES,
    fixed: Sequence[str] = FIXED_IN_GROUPS,
) -> dict[str, float]:
    """Jiang et al.'s granulated Kendall coefficient :math:`\\Psi` of ``measure`` against ``target``.

    For each axis :math:`i` (of ``axes``), the completed rows are grouped by the values of every *other* axis and of
    the ``fixed`` columns (the seed), so that inside a group only axis :math:`i` varies; then

    .. math:: \\psi_i = \\frac{1}{m_i} \\sum_{g} \\tau_b(\\text{measure}_g, \\text{target}_g), \\qquad
              \\Psi = \\frac{1}{|A|} \\sum_{i \\in A} \\psi_i,

    where the sum runs over the :math:`m_i` groups that count: at least 2 rows, at least 2 distinct values of axis
    :math:`i`, and a defined tau (neither side constant). :math:`A` is the set of axes with at least one such
    group; Jiang et al. average over all axes because every axis of their grid varies. A missing value of a grouping
    column (NaN, None) is a value of its own.

    Returns:
        ``{"psi": Psi, "psi_<axis>": psi_i, "groups_<axis>": m_i}``, NaN where undefined.
    """
    check_target(target)
    check_frame(frame, [measure, target, *axes, *fixed])
    rows = completed_rows(frame, [measure, target])
    out: dict[str, float] = {}
    for axis in axes:
        others = [c for c in (*axes, *fixed) if c != axis]
        taus = []
        groups = rows.groupby(others, dropna=False, sort=False) if others else [((), rows)]
        for _, group in groups:
            if len(group) < 2 or group[axis].nunique(dropna=False) < 2:
                continue
            tau, _, _ = kendall_tau(group[measure], group[target])
            if not math.isnan(tau):
                taus.append(tau)
        out[f"psi_{axis}"] = float(np.mean(taus)) if taus else math.nan
        out[f"groups_{axis}"] = len(taus)
    psis = [out[f"psi_{a}"] for a in axes if not math.isnan(out[f"psi_{a}"])]
    out["psi"] = float(np.mean(psis)) if psis else math.nan
    return out


def _verdict(expected: int, tau: float, p_value: float, alpha: float) -> tuple[str | None, bool | None, str]:
    """(observed sign, agrees, verdict) of one tau; ``agrees`` is None without a hypothesis or a tau."""
    if math.isnan(tau):
        return None, None, "too few runs"
    observed = "+" if tau > 0 else "-" if tau < 0 else "0"
    if expected == 0:
        return observed, None, "no hypothesis"
    agrees = bool(np.sign(tau) == expected)
    if not p_value < alpha:
        return observed, agrees, "not significant"
    return observed, agrees, "supports" if agrees else "contradicts"


def kendall_table(
    frame: pd.DataFrame,
    target: str = "generalization_gap",
    *,
    measures: Sequence[str] | None = None,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Per measure: Kendall's tau-b against ``target`` over the completed runs, and the flatness verdict.

    Args:
        frame: rows of :func:`sweep_rows`.
        target: a key of :data:`TARGETS`; for ``test_accuracy`` the expected signs flip (larger gap, lower accuracy).
        measures: names from :data:`MEASURE_NAMES` (default: all of them that are columns of ``frame``).
        alpha: significance level of the verdict.

    Returns:
        One row per measure with the columns of :data:`KENDALL_COLUMNS`: ``expected_sign`` ("+", "-" or "none"),
        ``tau``, ``p_value`` (two-sided), ``n`` (rows used), ``observed_sign``, ``agrees`` (the observed sign is
        the expected one, whatever the p-value; None without a hypothesis or a tau), ``significant``
        (p < ``alpha``), ``verdict`` ("supports" / "contradicts": significant and agreeing or not; "not
        significant"; "no hypothesis"; "too few runs") and the granulated coefficients of :func:`granulated_tau`.

    Raises:
        ValueError: an unknown target or measure, or a column missing from ``frame``.
    """
    check_target(target)
    if measures is None:
        measures = [m for m in MEASURE_NAMES if m in frame.columns]
    unknown = [m for m in measures if m not in BY_NAME]
    if unknown:
        raise ValueError(f"measures: unknown {', '.join(map(repr, unknown))}; known: {', '.join(MEASURE_NAMES)}")
    check_frame(frame, ["status", target, *measures, *GRANULATED_AXES, *FIXED_IN_GROUPS])
    orientation = TARGETS[target][0]
    rows = []
    for name in measures:
        expected = BY_NAME[name].expected_sign * orientation
        usable = completed_rows(frame, [name, target])
        tau, p_value, n = kendall_tau(usable[name], usable[target])
        observed, agrees, verdict = _verdict(expected, tau, p_value, alpha)
        rows.append(
            {
                "measure": name,
                "expected_sign": _SIGN[expected],
                "tau": tau,
                "p_value": p_value,
                "n": n,
                "observed_sign": observed,
                "agrees": agrees,
                "significant": bool(p_value < alpha) if not math.isnan(p_value) else False,
                "verdict": verdict,
                **granulated_tau(frame, name, target),
            }
        )
    return pd.DataFrame(rows, columns=list(KENDALL_COLUMNS))


def batch_size_effect(frame: pd.DataFrame, measure: str = "lambda_max", *, alpha: float = 0.05) -> pd.DataFrame:
    """Per (model, lr): Kendall's tau-b between batch size and ``measure`` over the completed runs.

    Keskar et al.'s claim: a larger batch means less gradient noise and a sharper minimum, so tau > 0 for a
    sharpness measure and tau < 0 for a flatness measure (``expected_sign`` of the measure; "none" for a measure
    without a hypothesis or a column that is not a measure). Seeds of one batch size are ties in batch size.

    Returns:
        One row per (model, lr) with ``n`` (runs), ``batch_sizes`` (distinct), ``smallest_batch`` and
        ``largest_batch``, the median of the measure over the runs at each (``median_at_smallest``,
        ``median_at_largest``), ``tau``, ``p_value``, ``expected_sign``, ``agrees`` and ``significant``.
    """
    check_frame(frame, ["status", "model", "lr", "batch_size", measure])
    expected = BY_NAME[measure].expected_sign if measure in BY_NAME else 0
    rows = []
    usable = completed_rows(frame, [measure, "batch_size"])
    for (model, lr), group in usable.groupby(["model", "lr"], dropna=False, sort=True):
        tau, p_value, n = kendall_tau(group["batch_size"], group[measure])
        small, large = group["batch_size"].min(), group["batch_size"].max()
        rows.append(
            {
                "model": model,
                "lr": lr,
                "measure": measure,
                "n": n,
                "batch_sizes": int(group["batch_size"].nunique()),
                "smallest_batch": small,
                "largest_batch": large,
                "median_at_smallest": float(group.loc[group["batch_size"] == small, measure].median()),
                "median_at_largest": float(group.loc[group["batch_size"] == large, measure].median()),
                "tau": tau,
                "p_value": p_value,
                "expected_sign": _SIGN[expected],
                "agrees": None if expected == 0 or math.isnan(tau) else bool(np.sign(tau) == expected),
                "significant": bool(p_value < alpha) if not math.isnan(p_value) else False,
            }
        )
    columns = [
        "model",
        "lr",
        "measure",
        "n",
        "batch_sizes",
        "smallest_batch",
        "largest_batch",
        "median_at_smallest",
        "median_at_largest",
        "tau",
        "p_value",
        "expected_sign",
        "agrees",
        "significant",
    ]
    return pd.DataFrame(rows, columns=columns)


def _cell(value: Any, kind: str = "g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if kind == "tau":
        return f"{float(value):+.3f}"
    if kind == "p":
        return f"{float(value):.2g}"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.3g}"
    return str(value)


def markdown_table(kendall: pd.DataFrame) -> str:
    """A :func:`kendall_table` in GitHub markdown: measure, expected and observed sign, tau, p, n, agreement,
    verdict, and the granulated coefficient with its per-axis parts."""
    check_frame(kendall, KENDALL_COLUMNS, "kendall")
    columns = [
        ("measure", "measure", "s", "---"),
        ("expected_sign", "expected", "s", ":---:"),
        ("tau", "τ", "tau", "---:"),
        ("p_value", "p", "p", "---:"),
        ("n", "n", "g", "---:"),
        ("agrees", "sign agrees", "g", ":---:"),
        ("verdict", "verdict", "s", "---"),
        ("psi", "Ψ", "tau", "---:"),
        *((f"psi_{a}", f"ψ {a}", "tau", "---:") for a in GRANULATED_AXES),
    ]
    header = "| " + " | ".join(h for _, h, _, _ in columns) + " |"
    rule = "|" + "|".join(a for _, _, _, a in columns) + "|"
    body = [
        "| " + " | ".join(_cell(row[k], kind) for k, _, kind, _ in columns) + " |" for row in kendall.to_dict("records")
    ]
    return "\n".join([header, rule, *body])
