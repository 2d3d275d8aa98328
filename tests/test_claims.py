"""The claims section is computed from the numbers: changing a number in a fixture changes the verdict."""

import copy
import math

import pandas as pd

from pipeline.metrics import interval
from pipeline.report.claims import (
    NOT_SUPPORTED,
    NOT_TESTABLE,
    SUPPORTED,
    claims_html,
    claims_markdown,
    quadratic_claim,
    reparam_rows,
    report_claims,
    resnet_pair_key,
    skip_claims,
    sweep_claims,
    threshold_claims,
)

CONFIGS = {
    "resnet20": {"model_name": "resnet20", "model": {}, "train": {"optimizer": "sgd", "batch_size": 64}},
    "resnet20_noshort": {
        "model_name": "resnet20_noshort",
        "model": {},
        "train": {"optimizer": "sgd", "batch_size": 64},
    },
}


def seeds(top, low):
    return {"lambda_max": interval(top), "lambda_min": interval(low)}


def metrics(noshort_top):
    return {
        "resnet20": {"seeds": seeds([1.0, 1.1, 0.9], [-0.1, -0.1, -0.2]), "surface": {"basin_fraction": 0.3}},
        "resnet20_noshort": {"seeds": seeds(noshort_top, [-0.5, -0.4, -0.6]), "surface": {"basin_fraction": 0.1}},
    }


def test_model_names_give_depth_and_skips():
    assert resnet_pair_key({"model_name": "resnet56_noshort"}) == (56, False)
    assert resnet_pair_key({"model_name": "resnet20"}) == (20, True)
    assert resnet_pair_key({"model_name": "resnet", "model": {"resnet_depth": 32, "resnet_shortcut": False}}) == (
        32,
        False,
    )
    assert resnet_pair_key({"model_name": "mlp"}) is None


def test_skip_claim_follows_the_intervals():
    sharper, deeper = skip_claims(metrics([3.0, 3.2, 2.9]), CONFIGS)
    assert sharper.verdict == SUPPORTED and "resnet20_noshort 3.033" in sharper.numbers
    assert deeper.key == "a (deeper)" and deeper.verdict == NOT_TESTABLE  # no pair deeper than 20 among these runs
    overlap, _ = skip_claims(metrics([1.0, 1.3, 0.8]), CONFIGS)
    assert overlap.verdict == NOT_SUPPORTED and "overlap" in overlap.numbers
    flatter, _ = skip_claims(metrics([0.3, 0.31, 0.29]), CONFIGS)
    assert flatter.verdict == NOT_SUPPORTED and "flatter" in flatter.numbers
    one = metrics([3.0])
    untestable, _ = skip_claims(one, CONFIGS)
    assert untestable.verdict == NOT_TESTABLE
    # |lambda_min / lambda_max| per seed: 0.1/1.0, 0.1/1.1, 0.2/0.9
    assert f"{(0.1 + 0.1 / 1.1 + 0.2 / 0.9) / 3:.4g}" in sharper.numbers


def test_a_deeper_pair_adds_a_row_and_its_absence_is_said():
    configs = {**CONFIGS, "r56": {"model_name": "resnet56"}, "r56n": {"model_name": "resnet56_noshort"}}
    m = {
        **metrics([3.0, 3.2, 2.9]),
        "r56": metrics([1, 1.1, 0.9])["resnet20"],
        "r56n": metrics([0.9, 1.2, 1.0])["resnet20"],
    }
    rows = skip_claims(m, configs)
    assert [r.key for r in rows] == ["a (depth 20)", "a (depth 56)"]
    assert [r.verdict for r in rows] == [SUPPORTED, NOT_SUPPORTED]
    assert {c.verdict for c in skip_claims({}, {"mlp": {"model_name": "mlp"}})} == {NOT_TESTABLE}


def history(actual, predicted, lr=0.1, lam=1.0):
    return pd.DataFrame(
        {
            "actual_change": actual,
            "predicted_change": predicted,
            "lr": lr,
            "lambda_max": [lam * (i + 1) for i in range(len(actual))],
        }
    )


def test_quadratic_claim_uses_the_median_relative_error():
    good = quadratic_claim({"a": history([-1.0, -2.0, -3.0, -4.0], [-1.05, -2.1, -2.9, -4.2])})
    assert good.verdict == SUPPORTED and "median relative error 0.05" in good.numbers
    bad = quadratic_claim({"a": history([-1.0, -2.0, -3.0, -4.0], [-1.5, -3.0, -2.0, -4.2])})
    assert bad.verdict == NOT_SUPPORTED
    assert quadratic_claim({"a": history([-1.0], [-1.0])}).verdict == NOT_TESTABLE
    assert quadratic_claim({}).verdict == NOT_TESTABLE
    with_nan = quadratic_claim({"a": history([-1.0, -2.0, math.nan, -4.0, 0.0], [-1.05, -2.1, -2.9, -4.2, 1.0])})
    assert "over 3 tracked steps" in with_nan.numbers


def tracked(batch, top, threshold=10.0):
    steps = range(len(batch))
    return pd.DataFrame(
        {"step": [10 * i for i in steps], "batch_sharpness": batch, "lambda_max": top, "stability_threshold": threshold}
    )


def test_threshold_claims_per_optimiser():
    m = {
        "sgd": {"train": {"tracked_steps": 5}},  # its rule reads the sharpness_history table
        "gd": {"train": {"tracked_steps": 5, "sharpness_over_threshold_last_quarter": 1.021}},
        "adam": {"train": {"tracked_steps": 5, "preconditioned_over_threshold_last_quarter": 0.5}},
        "off": {"train": {"tracked_steps": 0}},
    }
    configs = {
        "sgd": {"train": {"optimizer": "sgd", "batch_size": 64}},
        "gd": {"train": {"optimizer": "sgd", "batch_size": "full"}},
        "adam": {"train": {"optimizer": "adam", "batch_size": 64}},
        "off": {"train": {"optimizer": "sgd", "batch_size": 64}},
    }
    # the first tracked step (the initialisation) is left out of SGD's largest ratio
    histories = {"sgd": tracked([50.0, 9.5, 7.0], [80.0, 2.0, 1.0])}
    rows = {c.key: c.verdict for c in threshold_claims(m, configs, histories)}
    assert rows == {"e (sgd)": SUPPORTED, "e (gd)": SUPPORTED, "e (adam)": NOT_SUPPORTED}
    m2 = copy.deepcopy(m)
    m2["gd"]["train"]["sharpness_over_threshold_last_quarter"] = 1.6
    rows = {c.key: c.verdict for c in threshold_claims(m2, configs, {"sgd": tracked([50.0, 3.0, 2.0], [80.0, 2, 1])})}
    assert rows["e (sgd)"] == NOT_SUPPORTED and rows["e (gd)"] == NOT_SUPPORTED
    above = threshold_claims(m, configs, {"sgd": tracked([1.0, 9.5, 7.0], [1.0, 9.9, 1.0])})
    assert above[0].verdict == NOT_SUPPORTED  # lambda_max not below the batch sharpness
    assert threshold_claims(m, configs, {})[0].verdict == NOT_TESTABLE  # no table
    assert threshold_claims({}, {})[0].verdict == NOT_TESTABLE


def sweep_points(sign):
    rows = []
    for lr in (0.02, 0.05, 0.1):
        for bs in (16, 64, 256):
            for seed in (0, 1):
                sharp = (bs / 16) ** sign / lr + 0.01 * seed
                rows.append({"status": "completed", "lr": lr, "batch_size": bs, "seed": seed, "lambda_max": sharp})
    return pd.DataFrame(rows)


def test_sweep_claims_read_the_rank_tests():
    kendall = pd.DataFrame(
        [
            {
                "measure": "lambda_max",
                "expected_sign": "+",
                "tau": 0.4,
                "p_value": 0.01,
                "n": 24,
                "agrees": True,
                "psi": 0.3,
            },
            {
                "measure": "pac_bayes_sigma_isotropic",
                "expected_sign": "-",
                "tau": -0.1,
                "p_value": 0.5,
                "n": 24,
                "agrees": True,
                "psi": 0.0,
            },
            {
                "measure": "noise_scale",
                "expected_sign": "none",
                "tau": 0.2,
                "p_value": 0.2,
                "n": 24,
                "agrees": None,
                "psi": 0.1,
            },
        ]
    )
    rows = {c.key: c.verdict for c in sweep_claims(sweep_points(+1), kendall)}
    assert rows == {"b (λmax)": SUPPORTED, "c (λmax)": SUPPORTED, "c (PAC-Bayes σ)": NOT_SUPPORTED}
    rows = {c.key: c.verdict for c in sweep_claims(sweep_points(-1), kendall.assign(p_value=0.2))}
    assert rows == {"b (λmax)": NOT_SUPPORTED, "c (λmax)": NOT_SUPPORTED, "c (PAC-Bayes σ)": NOT_SUPPORTED}
    assert {c.verdict for c in sweep_claims(None, None)} == {NOT_TESTABLE}


def test_report_claims_and_rendering():
    claims = report_claims(metrics([3.0, 3.2, 2.9]), CONFIGS, {})
    assert [c.key for c in claims] == ["a (depth 20)", "a (deeper)", "b", "c", "d", "e"]
    text = claims_markdown(claims)
    assert text.count("\n") == len(claims) + 1 and "**supported**" in text
    assert "\\|λmin/λmax\\|" in text  # a pipe inside a cell is escaped
    assert all(line.count(" | ") == 4 for line in text.splitlines()[2:])
    assert "<table id='claims'>" in claims_html(claims) and claims_markdown([]) == ""


def test_reparam_rows_mark_what_moves():
    entry = {
        "alpha": 10.0,
        "output_change": 1e-7,
        "measures": {
            "lambda_max": {"before": 0.3, "after": 30.0, "ratio": 100.0},
            "adaptive_sharpness_worst_l2": {"before": 0.01, "after": 0.01001, "ratio": 1.001},
        },
    }
    rows = reparam_rows({"mlp": {"hessian": {"reparametrisation": entry}}, "r": {"hessian": {}}}, ["mlp", "r"])
    assert [(r["measure"], r["verdict"]) for r in rows] == [("λmax", "moves"), ("adaptive, worst l2", "invariant")]
    entry["measures"]["adaptive_sharpness_worst_l2"]["ratio"] = 1.5
    assert reparam_rows({"mlp": {"hessian": {"reparametrisation": entry}}}, ["mlp"])[1]["verdict"] == "moves"
