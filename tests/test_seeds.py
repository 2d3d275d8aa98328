"""Seed replicates (pipeline.sweep.seeds): intervals against closed forms, comparisons that say whether intervals
separate, the replica configs (seed k = partner_seed_offset is exactly the partner model), and the report section."""

from __future__ import annotations

import math

import pytest
from conftest import make_params

from pipeline.config import HessianConfig
from pipeline.metrics import compare, comparisons, interval, summarise
from pipeline.report.render import seeds_markdown
from pipeline.report.summary import comparison_rows, seed_rows
from pipeline.sweep.seeds import measure_config, replica_run, replica_source, seed_row
from pipeline.training.checkpoints import partner_config, run_fingerprint

# Student t quantile with 2 degrees of freedom has a closed form: t_p = (2p - 1) / sqrt(2 p (1 - p)); p = 0.975 here.
T_975_2 = (2 * 0.975 - 1) / math.sqrt(2 * 0.975 * 0.025)  # 4.3027


def test_interval_is_the_student_t_interval():
    i = interval([1.0, 2.0, 3.0])
    assert i["n"] == 3 and i["mean"] == 2.0 and i["std"] == 1.0
    assert i["half_width"] == pytest.approx(T_975_2 / math.sqrt(3), rel=1e-12)
    assert (i["low"], i["high"]) == pytest.approx((2.0 - i["half_width"], 2.0 + i["half_width"]))
    one = interval([5.0, math.nan, None])  # a diverged seed is left out, and counted
    assert one["n"] == 1 and one["excluded"] == 2 and one["mean"] == 5.0 and one["half_width"] is None
    assert interval([])["mean"] is None


def test_compare_says_whether_intervals_separate():
    a = {"lambda_max": interval([1.0, 1.1, 0.9])}
    far = {"lambda_max": interval([2.0, 2.1, 1.9])}
    near = {"lambda_max": interval([1.05, 1.2, 0.95])}
    out = compare("a", a, "b", far, measures=["lambda_max"])["lambda_max"]
    assert (
        out["separate"] is True
        and out["ratio"] == pytest.approx(2.0)
        and out["verdict"] == "b larger (intervals separate)"
    )
    out = compare("a", a, "b", near, measures=["lambda_max"])["lambda_max"]
    assert out["separate"] is False and out["verdict"] == "intervals overlap: not distinguished at n = 3"
    out = compare("a", {"lambda_max": interval([1.0])}, "b", far, measures=["lambda_max"])["lambda_max"]
    assert out["separate"] is None and out["verdict"].startswith("not testable")
    assert list(comparisons({"x": a, "y": far, "z": near})) == ["y vs x", "z vs x", "z vs y"]


def test_replicas_reuse_the_run_and_its_partner():
    params = make_params(runs={"mlp": {"model": "mlp", "seed": 7}})
    assert replica_run(params, "mlp", 0) == params.run("mlp")
    offset = params.landscape.partner_seed_offset
    assert replica_source(params, 0) == "train" and replica_source(params, offset) == "partner"
    assert replica_source(params, offset + 1) == "seeds"
    partner = replica_run(params, "mlp", offset)
    assert partner == partner_config(params, "mlp")  # so the partner's checkpoints are a legitimate seed
    assert run_fingerprint(partner, "data") == run_fingerprint(partner_config(params, "mlp"), "data")
    third = replica_run(params, "mlp", 2)
    assert third.train.seed == 9 and third.train.track_sharpness_every == 0 and third.model == params.run("mlp").model


def test_measure_config_keeps_the_solver_and_drops_the_extras():
    cfg = measure_config(HessianConfig(top_k=7, tol=1e-4, trace_hvps=30, density_runs=3, groups="module"))
    assert (cfg.top_k, cfg.lambda_min, cfg.trace, cfg.density_runs, cfg.groups) == (1, True, ("hutchinson",), 0, "none")
    assert (cfg.tol, cfg.trace_hvps, cfg.noise, cfg.flatness, cfg.operators) == (1e-4, 30, False, (), ("hessian",))


def _payload(status="completed", test_accuracy=0.9):
    return {
        "status": status,
        "epoch": 3,
        "history": [
            {
                "scope": "epoch",
                "train_loss": 0.1,
                "train_accuracy": 0.99,
                "test_loss": 0.3,
                "test_accuracy": test_accuracy,
            },
            {"scope": "step", "train_loss": math.nan},
        ],
    }


def test_rows_and_summary_leave_diverged_seeds_out():
    rows = [
        seed_row("mlp", k, k, "train", _payload(test_accuracy=0.9 + k / 100), {"lambda_max": 1.0 + k, "hvps": 4})
        for k in range(3)
    ]
    rows.append(seed_row("mlp", 3, 3, "seeds", _payload("diverged"), None))
    assert rows[0]["generalization_gap"] == pytest.approx(0.2) and math.isnan(rows[3]["lambda_max"])
    summary = summarise(rows)
    assert (summary["seeds"], summary["completed"]) == (4, 3)
    assert summary["lambda_max"]["mean"] == 2.0 and summary["lambda_max"]["n"] == 3
    assert summary["test_accuracy"]["mean"] == pytest.approx(0.91)


def test_the_report_section_follows_the_numbers():
    metrics = {
        "a": {
            "seeds": summarise(
                [seed_row("a", k, k, "train", _payload(), {"lambda_max": v}) for k, v in enumerate([1.0, 1.1, 0.9])]
            )
        },
        "b": {
            "seeds": summarise(
                [seed_row("b", k, k, "train", _payload(), {"lambda_max": v}) for k, v in enumerate([2.0, 2.1, 1.9])]
            )
        },
    }
    metrics["comparisons"] = comparisons({r: metrics[r]["seeds"] for r in ("a", "b")})
    rows = seed_rows(metrics, ["a", "b"])
    assert rows[0]["seeds"] == "3/3" and rows[1]["lambda_max"] == f"2 ± {T_975_2 * 0.1 / math.sqrt(3):.2g}"
    verdicts = {(c["pair"], c["measure"]): c["verdict"] for c in comparison_rows(metrics)}
    assert verdicts[("b vs a", "lambda_max")] == "b larger (intervals separate)"
    assert "| b vs a | lambda_max | 2 | b larger (intervals separate) |" in seeds_markdown(
        rows, comparison_rows(metrics)
    )
    # one number moved: the verdict moves with it (nothing in the report is written in advance)
    metrics["b"]["seeds"] = summarise(
        [seed_row("b", k, k, "train", _payload(), {"lambda_max": v}) for k, v in enumerate([1.0, 1.3, 0.8])]
    )
    metrics["comparisons"] = comparisons({r: metrics[r]["seeds"] for r in ("a", "b")})
    verdicts = {(c["pair"], c["measure"]): c["verdict"] for c in comparison_rows(metrics)}
    assert verdicts[("b vs a", "lambda_max")].startswith("intervals overlap")
    assert seeds_markdown([], []) == ""
