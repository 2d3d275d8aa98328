"""Sweep analysis: rows from params + metrics (and from `dvc exp show --json`), Kendall's tau-b against the gap,
Jiang et al.'s granulated coefficient on a hand-computed grid, the batch-size effect, the figure and the table."""

import json
import math
import textwrap

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from pipeline.metrics import MEASURE_NAMES
from pipeline.sweep.figures import plot_sweep
from pipeline.sweep.stats import (
    KENDALL_COLUMNS,
    ROW_COLUMNS,
    Experiment,
    batch_size_effect,
    experiments_from_exp_show,
    granulated_tau,
    kendall_table,
    kendall_tau,
    markdown_table,
    rows_from_exp_show,
    sweep_rows,
)


def metrics(gap, status="completed", **hessian):
    """One run's metrics.json entry: a train stage with this loss gap and a hessian stage with ``hessian``."""
    return {
        "train": {
            "status": status,
            "generalization_gap": gap,
            "train_accuracy": 1.0,
            "test_accuracy": None if gap is None else 1.0 - gap / 10,
        },
        "hessian": hessian,
    }


def params(lr=0.1, batch_size=64, seed=0, runs=None):
    return {"train": {"lr": lr, "batch_size": batch_size, "seed": seed}, "runs": runs or {"mlp": {"model": "mlp"}}}


def frame_of(points):
    """One experiment (run ``mlp``) per dict of (lr, batch_size, seed, model, gap, status, measures...)."""
    experiments = []
    for i, p in enumerate(points):
        p = dict(p)
        model = p.pop("model", "mlp")
        settings = {k: p.pop(k) for k in ("lr", "batch_size", "seed") if k in p}
        gap, status = p.pop("gap"), p.pop("status", "completed")
        experiments.append(
            (f"exp{i}", params(runs={"mlp": {"model": model}}, **settings), {"mlp": metrics(gap, status, **p)})
        )
    return sweep_rows(experiments)


# --- rows -----------------------------------------------------------------------------------------------------------


def test_run_overrides_take_precedence_over_train_params_and_every_column_is_there():
    p = params(
        lr=0.1,
        batch_size=64,
        seed=3,
        runs={"mlp": {"model": "mlp", "lr": 0.5, "batch_size": 16}, "cnn": {"model": "resnet20"}},
    )
    m = {
        "mlp": metrics(0.2, lambda_max=3.0, trace_hutchinson=7.0, trace_hutchpp=9.0),
        "cnn": {
            **metrics(0.1, lambda_max=2.0, trace_hutchinson=5.0),
            "interpolate": {"barrier": 0.4},
            "surface": {"basin_fraction": 0.3},
        },
        "extra": metrics(0.3),
    }  # in the metrics but not in params: kept, model unknown
    frame = sweep_rows([("e1", p, m)])
    assert tuple(frame.columns) == ROW_COLUMNS
    frame = frame.set_index("run")
    assert list(frame.index) == ["mlp", "cnn", "extra"]
    assert frame.loc["mlp", ["lr", "batch_size", "seed"]].tolist() == [0.5, 16.0, 3.0]
    assert frame.loc["cnn", ["lr", "batch_size", "seed"]].tolist() == [0.1, 64.0, 3.0]
    assert frame.loc["mlp", "model"] == "mlp" and frame.loc["cnn", "model"] == "resnet20"
    assert pd.isna(frame.loc["extra", "model"])
    assert frame.loc["mlp", "trace"] == 9.0 and frame.loc["cnn", "trace"] == 5.0  # Hutch++, else Hutchinson
    assert frame.loc["cnn", "barrier"] == 0.4 and frame.loc["cnn", "basin_fraction"] == 0.3
    assert math.isnan(frame.loc["mlp", "barrier"])
    assert frame.loc["mlp", "accuracy_gap"] == pytest.approx(0.02)  # train - test accuracy
    assert (frame.experiment == "e1").all() and (frame.status == "completed").all()


def test_the_real_metrics_shape_reads_without_error():
    real = {
        "mlp": {
            "train": {
                "status": "completed",
                "generalization_gap": 0.111,
                "test_accuracy": 0.97,
                "train_accuracy": 1.0,
                "diverged_step": None,
            },
            "hessian": {"lambda_max": 0.343, "trace_hutchpp": 3.74, "eigenvalues": [0.343, 0.27], "noise_scale": None},
            "interpolate": {"barrier": 0.398, "barrier_train": 0.398, "paths": {"eigen": {}}},
            "partner": {"status": "completed"},
        }
    }
    row = sweep_rows([("e", params(), real)]).iloc[0]
    assert row.lambda_max == 0.343 and row.barrier == 0.398 and math.isnan(row.noise_scale)


# --- Kendall's tau --------------------------------------------------------------------------------------------------


def test_tau_is_one_for_a_monotone_measure_minus_one_reversed_and_tau_b_with_ties():
    assert kendall_tau([1, 2, 3, 4], [0.1, 0.5, 0.7, 2.0])[0] == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [2.0, 0.7, 0.5, 0.1])[0] == pytest.approx(-1.0)
    # x tied in one of the 6 pairs, the other 5 concordant: tau_b = 5 / sqrt((6 - 1)(6 - 0)), not tau_a = 5/6
    tau, p_value, n = kendall_tau([1, 1, 2, 3], [1, 2, 3, 4])
    assert tau == pytest.approx(5 / math.sqrt(30)) and n == 4 and 0 < p_value <= 1
    # non-finite pairs dropped; a constant side or fewer than 2 points has no tau
    assert kendall_tau([1, np.nan, 2, np.inf], [1, 5, 2, 3])[2] == 2
    assert all(math.isnan(v) for v in kendall_tau([1, 1, 1], [1, 2, 3])[:2])
    assert math.isnan(kendall_tau([1.0], [2.0])[0])


def test_kendall_table_signs_and_verdicts_for_sharpness_and_sigma_measures():
    gaps = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    frame = frame_of(
        [
            {
                "gap": g,
                "batch_size": 2 ** (4 + i),
                "lambda_max": 10 * g,
                "trace_hutchpp": 1 / g,
                "pac_bayes_sigma_isotropic": 1 / g,
                "pac_bayes_sigma_magnitude": [3, 1, 2, 6, 4, 5][i],
                "noise_scale": g,
            }
            for i, g in enumerate(gaps)
        ]
    )
    table = kendall_table(frame).set_index("measure")
    assert tuple(table.reset_index().columns) == KENDALL_COLUMNS
    assert list(table.index) == list(MEASURE_NAMES)
    lam, trace, sigma = table.loc["lambda_max"], table.loc["trace"], table.loc["pac_bayes_sigma_isotropic"]
    # sharper, larger gap: tau = +1, as the flatness hypothesis expects; exact p of n = 6 is 2/6! = 0.0028
    assert (lam.tau, lam.n, lam.expected_sign, lam.agrees, lam.verdict) == (
        pytest.approx(1.0),
        6,
        "+",
        True,
        "supports",
    )
    assert lam.p_value == pytest.approx(2 / 720)
    # a sharpness measure that falls with the gap contradicts it
    assert (trace.tau, trace.agrees, trace.verdict) == (pytest.approx(-1.0), False, "contradicts")
    # sigma: larger sigma is flatter, so the expected sign is -, and tau = -1 agrees
    assert (sigma.tau, sigma.expected_sign, sigma.observed_sign, sigma.agrees, sigma.significant) == (
        pytest.approx(-1.0),
        "-",
        "-",
        True,
        True,
    )
    # 11 concordant, 4 discordant pairs: tau = +7/15, the wrong sign for sigma and not significant: both reported
    weak = table.loc["pac_bayes_sigma_magnitude"]
    assert weak.tau == pytest.approx(7 / 15) and weak.agrees is False and not weak.significant
    assert weak.verdict == "not significant"
    noise = table.loc["noise_scale"]
    assert noise.expected_sign == "none" and noise.agrees is None and noise.verdict == "no hypothesis"
    missing = table.loc["epsilon_sharpness_absolute"]
    assert missing.n == 0 and math.isnan(missing.tau) and missing.verdict == "too few runs"
    # test accuracy falls as the gap grows: the expected signs flip
    flipped = kendall_table(frame, "test_accuracy", measures=["lambda_max"]).iloc[0]
    assert (flipped.expected_sign, flipped.tau, flipped.agrees) == ("-", pytest.approx(-1.0), True)
    with pytest.raises(ValueError, match="target"):
        kendall_table(frame, "loss")
    with pytest.raises(ValueError, match="unknown 'flatness'"):
        kendall_table(frame, measures=["flatness"])


def test_diverged_failed_and_unfinished_runs_are_kept_but_excluded_from_tau():
    points = [{"gap": g, "lambda_max": 10 * g} for g in (0.1, 0.2, 0.3, 0.4)]
    points += [
        {"gap": 0.05, "lambda_max": 99.0, "status": "diverged"},  # would break the ordering
        {"gap": None, "lambda_max": 5.0},
    ]  # completed but no gap: no pair
    frame = frame_of(points)
    frame = pd.concat(
        [frame, sweep_rows([Experiment("failed", params(), {"mlp": metrics(0.0, lambda_max=50.0)}, "failed")])],
        ignore_index=True,
    )
    assert len(frame) == 7
    assert frame.status.tolist() == ["completed"] * 4 + ["diverged", "completed", "failed"]
    assert math.isnan(frame.lambda_max.iloc[-1])  # a failed experiment's metrics are not its own: dropped
    row = kendall_table(frame, measures=["lambda_max"]).iloc[0]
    assert row.tau == pytest.approx(1.0) and row.n == 4


# --- granulated coefficient -----------------------------------------------------------------------------------------

# A 2x2x2 grid (lr, batch size, model), seed 0: (l, b, m) -> (gap, measure). Pairs along each axis, hand-counted:
#   lr    (b, m fixed): 000-100 +1, 010-110 -1, 001-101 +1, 011-111 -1  -> psi_lr = 0
#   batch (l, m fixed): 000-010 +1, 100-110 +1, 001-011 +1, 101-111 -1  -> psi_batch_size = 1/2
#   model (l, b fixed): 000-001 +1, 100-101 +1, 010-011 +1, 110-111 -1  -> psi_model = 1/2
# Psi = (0 + 1/2 + 1/2) / 3 = 1/3.
GRID = {
    (0, 0, 0): (1, 1.0),
    (1, 0, 0): (2, 2.0),
    (0, 1, 0): (3, 4.0),
    (1, 1, 0): (4, 3.0),
    (0, 0, 1): (5, 5.0),
    (1, 0, 1): (6, 6.0),
    (0, 1, 1): (7, 8.0),
    (1, 1, 1): (8, 0.5),
}


def grid_frame(grid=GRID, extra=()):
    points = [
        {
            "lr": (0.1, 0.2)[lr],
            "batch_size": (32, 128)[b],
            "model": ("mlp", "resnet20")[m],
            "seed": 0,
            "gap": gap,
            "lambda_max": value,
        }
        for (lr, b, m), (gap, value) in grid.items()
    ]
    return frame_of([*points, *extra])


def test_granulated_coefficient_on_a_hand_computed_grid():
    psi = granulated_tau(grid_frame(), "lambda_max")
    assert psi["psi_lr"] == pytest.approx(0.0) and psi["groups_lr"] == 4
    assert psi["psi_batch_size"] == pytest.approx(0.5) and psi["psi_model"] == pytest.approx(0.5)
    assert psi["psi"] == pytest.approx(1 / 3)
    # the same numbers in the table
    row = kendall_table(grid_frame(), measures=["lambda_max"]).iloc[0]
    assert (row.psi, row.psi_lr, row.groups_model) == (pytest.approx(1 / 3), pytest.approx(0.0), 4)
    # a second seed is never compared with the first: alone in each of its groups, it changes no psi
    outlier = {"lr": 0.1, "batch_size": 32, "model": "mlp", "seed": 1, "gap": 100.0, "lambda_max": -100.0}
    assert granulated_tau(grid_frame(extra=[outlier]), "lambda_max") == psi
    # a tie makes the (l=0, b=0) model group's tau undefined: it is skipped, not counted as 0
    tied = {**GRID, (0, 0, 1): (5, 1.0)}  # measure equal to that of (0, 0, 0); the other pairs keep their signs
    psi = granulated_tau(grid_frame(tied), "lambda_max")
    assert psi["groups_model"] == 3 and psi["psi_model"] == pytest.approx(1 / 3)
    assert psi["psi"] == pytest.approx((0 + 1 / 2 + 1 / 3) / 3)
    # an axis that never varies (one model only) is left out of the average
    one_model = {k: v for k, v in GRID.items() if k[2] == 0}
    psi = granulated_tau(grid_frame(one_model), "lambda_max")
    assert psi["groups_model"] == 0 and math.isnan(psi["psi_model"])
    assert psi["psi"] == pytest.approx((0 + 1) / 2)  # lr: +1, -1; batch: +1, +1


def test_batch_size_effect_per_model_and_lr():
    points = []
    for seed in (0, 1):
        for bs in (16, 64, 256):
            points.append(
                {
                    "model": "mlp",
                    "lr": 0.1,
                    "batch_size": bs,
                    "seed": seed,
                    "gap": 0.1,
                    "lambda_max": bs / 16 + seed * 0.1,
                }
            )  # sharper with larger batches
            points.append(
                {"model": "resnet20", "lr": 0.1, "batch_size": bs, "seed": seed, "gap": 0.1, "lambda_max": 1000 / bs}
            )  # flatter with larger batches
    points.append({"model": "mlp", "lr": 0.2, "batch_size": 64, "gap": 0.1, "lambda_max": 1.0})
    effect = batch_size_effect(frame_of(points)).set_index(["model", "lr"])
    mlp, resnet = effect.loc[("mlp", 0.1)], effect.loc[("resnet20", 0.1)]
    # 6 runs, 3 pairs tied in batch size, the other 12 concordant: tau_b = 12 / sqrt((15 - 3) * 15)
    assert mlp.tau == pytest.approx(12 / math.sqrt(12 * 15)) and mlp.n == 6 and mlp.agrees
    assert (mlp.smallest_batch, mlp.largest_batch, mlp.median_at_smallest, mlp.median_at_largest) == (
        16,
        256,
        pytest.approx(1.05),
        pytest.approx(16.05),
    )
    assert resnet.tau == pytest.approx(-1.0) and resnet.agrees is False and resnet.expected_sign == "+"
    single = effect.loc[("mlp", 0.2)]
    assert single.n == 1 and math.isnan(single.tau) and single.agrees is None
    sigma = batch_size_effect(frame_of(points), "generalization_gap").iloc[0]
    assert sigma.expected_sign == "none" and math.isnan(sigma.tau)  # constant gap: no tau


# --- dvc exp show ---------------------------------------------------------------------------------------------------

# Trimmed from `dvc exp show --json` of DVC 3.67 (a temporary repo: `dvc exp run -n good`, then `--queue`d
# experiments, one of which failed and one still waiting). Note that the failed queued experiment shows the
# workspace's metrics, not its own, and that a missing metrics file is an "error" entry.
EXP_SHOW = textwrap.dedent("""
[
  {"rev": "workspace", "name": null, "error": null, "experiments": null,
   "data": {"rev": "workspace", "timestamp": null,
            "params": {"params.yaml": {"data": {"train": {"lr": 0.3, "batch_size": 64, "seed": 0},
                                                "runs": {"mlp": {"model": "mlp", "lr": 0.2}}}}},
            "metrics": {"reports/metrics.json": {"data": {"mlp": {"train": {"status": "completed",
                        "generalization_gap": 0.3, "test_accuracy": 0.8}, "hessian": {"lambda_max": 3.3}}}}},
            "deps": {}, "outs": {}, "meta": {}}},
  {"rev": "9b0aa9cd660df4a4da28d63083def1487fce39ec", "name": "master", "error": null,
   "data": {"rev": "9b0aa9cd660df4a4da28d63083def1487fce39ec", "timestamp": "2026-11-29T13:52:42",
            "params": {"params.yaml": {"data": {"train": {"lr": 0.1, "batch_size": 64, "seed": 0},
                                                "runs": {"mlp": {"model": "mlp"}}}}},
            "metrics": {"reports/metrics.json": {"error": {"type": "FileNotFoundError",
                        "msg": "[Errno 2] No storage files available: 'reports/metrics.json'"}}},
            "deps": {}, "outs": {}, "meta": {}},
   "experiments": [
     {"name": "q2",
      "executor": {"state": "success", "name": "dvc-task",
                   "local": {"root": null, "log": "x.out", "pid": 28202, "returncode": 0, "task_id": "0d64"}},
      "revs": [{"rev": "63a73337993c0c6d8da3a294150306cbbcc9fb35", "name": "q2", "error": null, "experiments": null,
                "data": {"rev": "63a73337993c0c6d8da3a294150306cbbcc9fb35", "timestamp": "2026-11-29T13:53:02",
                         "params": {"params.yaml": {"data": {"train": {"lr": 0.3, "batch_size": 32, "seed": 0},
                                                             "runs": {"mlp": {"model": "mlp"}}}}},
                         "metrics": {"reports/metrics.json": {"data": {"mlp": {"train": {"status": "completed",
                                     "generalization_gap": 0.25, "test_accuracy": 0.8, "train_accuracy": 1.0},
                                     "hessian": {"lambda_max": 4.0}}}}},
                         "deps": {}, "outs": {}, "meta": {}}}]},
     {"name": "good", "executor": null,
      "revs": [{"rev": "9aac0fad876b82189f838090b901daf4844ca4c9", "name": "good", "error": null,
                "experiments": null,
                "data": {"rev": "9aac0fad876b82189f838090b901daf4844ca4c9", "timestamp": "2026-11-29T13:52:46",
                         "params": {"params.yaml": {"data": {"train": {"lr": 0.3, "batch_size": 64, "seed": 0},
                                                             "runs": {"mlp": {"model": "mlp", "lr": 0.2}}}}},
                         "metrics": {"reports/metrics.json": {"data": {"mlp": {"train": {"status": "completed",
                                     "generalization_gap": 0.3, "test_accuracy": 0.8},
                                     "hessian": {"lambda_max": 3.3}}}}},
                         "deps": {}, "outs": {}, "meta": {}}}]},
     {"name": "bad",
      "executor": {"state": "failed", "name": null,
                   "local": {"root": null, "log": "y.out", "pid": 28195, "returncode": 255, "task_id": "e73a"}},
      "revs": [{"rev": "e73aa44fa873fe55571d693de7940072510e96f9", "name": "bad",
                "error": {"msg": "Experiment run failed", "type": ""}, "experiments": null,
                "data": {"rev": "e73aa44fa873fe55571d693de7940072510e96f9", "timestamp": "2026-11-29T13:52:48",
                         "params": {"params.yaml": {"data": {"train": {"lr": 2, "batch_size": 64, "seed": 0},
                                                             "runs": {"mlp": {"model": "mlp"}}}}},
                         "metrics": {"reports/metrics.json": {"data": {"mlp": {"train": {"status": "completed",
                                     "generalization_gap": 0.3, "test_accuracy": 0.8},
                                     "hessian": {"lambda_max": 3.3}}}}},
                         "deps": {}, "outs": {}, "meta": {}}}]},
     {"name": "waiting",
      "executor": {"state": "queued", "name": "dvc-task",
                   "local": {"root": null, "log": null, "pid": null, "returncode": null, "task_id": "0a95"}},
      "revs": [{"rev": "0a95fed21665d4806ba9b1438b2e920e1d9bdcf2", "name": "waiting", "error": null,
                "experiments": null,
                "data": {"rev": "0a95fed21665d4806ba9b1438b2e920e1d9bdcf2", "timestamp": "2026-11-29T13:54:03",
                         "params": {"params.yaml": {"data": {"train": {"lr": 0.5, "batch_size": 64, "seed": 0},
                                                             "runs": {"mlp": {"model": "mlp"}}}}},
                         "metrics": {}, "deps": {}, "outs": {}, "meta": {}}}]}
   ]}
]
""")


def test_rows_from_exp_show_including_a_failed_and_a_queued_experiment():
    frame = rows_from_exp_show(EXP_SHOW).set_index("experiment")
    assert list(frame.index) == ["q2", "good", "bad", "waiting"]  # experiments only, not the baselines
    assert frame.loc["q2", ["lr", "batch_size", "generalization_gap", "lambda_max"]].tolist() == [0.3, 32.0, 0.25, 4.0]
    assert frame.loc["q2", "accuracy_gap"] == pytest.approx(0.2)
    assert frame.loc["good", "lr"] == 0.2  # runs.mlp.lr overrides train.lr
    assert math.isnan(frame.loc["good", "accuracy_gap"])  # no train accuracy recorded
    assert frame.loc["bad", "status"] == "failed" and frame.loc["bad", "lr"] == 2.0
    assert frame.loc["bad", ["generalization_gap", "lambda_max"]].isna().all()  # stale workspace metrics dropped
    assert frame.loc["waiting", "status"] == "queued" and frame.loc["waiting", "run"] == "mlp"
    assert kendall_table(frame.reset_index(), measures=["lambda_max"]).iloc[0].n == 2

    with_base = experiments_from_exp_show(json.loads(EXP_SHOW), include_baseline=True)
    assert [e.name for e in with_base] == ["workspace", "master", "q2", "good", "bad", "waiting"]
    base = sweep_rows(with_base[1:2]).iloc[0]  # no metrics file at the commit: the error entry reads as none
    assert base.status == "not trained" and base.run == "mlp" and base.lr == 0.1
    assert rows_from_exp_show("[]").empty
    with pytest.raises(ValueError, match="DVC >= 3"):
        rows_from_exp_show({"workspace": {"baseline": {}}})


# --- figure and table -----------------------------------------------------------------------------------------------


def sweep_frame():
    points = []
    for m, model in enumerate(("mlp", "resnet20")):
        for b, bs in enumerate((16, 64, 256)):
            gap = 0.05 + 0.03 * b + 0.01 * m
            points.append(
                {
                    "model": model,
                    "batch_size": bs,
                    "lr": 0.1,
                    "gap": gap,
                    "lambda_max": 2.0**b + m,
                    "pac_bayes_sigma_isotropic": 0.1 / (1 + b),
                    "noise_scale": None,
                }
            )
    points.append({"model": "mlp", "batch_size": 1024, "gap": 9.0, "lambda_max": 1e4, "status": "diverged"})
    frame = frame_of(points)
    frame["barrier"] = np.linspace(-0.05, 0.2, len(frame))  # negative values: a linear x axis
    return frame


@pytest.mark.parametrize("case", ["normal", "all_nan", "single_row"])
def test_the_figure_decodes(tmp_path, case):
    frame = sweep_frame()
    if case == "all_nan":
        frame[list(MEASURE_NAMES)] = np.nan
    elif case == "single_row":
        frame = frame.iloc[:1]
    path = plot_sweep(frame, tmp_path / "sweep.png")
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300
    assert not list(tmp_path.glob(".sweep.png.*"))  # no temporary file left behind


def test_markdown_table():
    table = kendall_table(sweep_frame(), measures=["lambda_max", "pac_bayes_sigma_isotropic", "noise_scale"])
    lines = markdown_table(table).splitlines()
    assert len(lines) == 5 and lines[0].startswith("| measure | expected | τ | p | n | sign agrees | verdict | Ψ |")
    assert lines[1].startswith("|---|:---:|---:|")
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:3] == ["lambda_max", "+", f"{table.tau.iloc[0]:+.3f}"] and cells[4] == "6"
    assert [c.strip() for c in lines[4].strip("|").split("|")][2:7] == ["—", "—", "0", "—", "too few runs"]
