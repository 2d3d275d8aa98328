"""The pieces that moved out of the flows into the library, tested without Prefect: the finite-JSON rule, the metric
names and their fallbacks, ``metrics.json`` assembly, the one tile loop, the scan summaries, and the shared stage
arguments."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.io import finite, finite_tree
from pipeline.landscape.directions import random_direction
from pipeline.landscape.engine import evaluate_points
from pipeline.landscape.measures import path_summary, surface_summary
from pipeline.landscape.plan import LineScan
from pipeline.landscape.tiles import Job, MemoryStore, TileStore, evaluate_tile, in_order, run_tiles, scan
from pipeline.metrics import BY_NAME, MEASURES, collect, lookup, metrics_json, source
from pipeline.stage import STAGE_PATHS, stage_arguments
from pipeline.training.models import build_model

# --------------------------------------------------------------------------------------------------------------
# finite JSON


def test_finite_keeps_finite_reals_and_drops_the_rest():
    assert finite(3) == 3.0 and isinstance(finite(3), float) and finite(np.float32(0.5)) == 0.5
    assert [finite(v) for v in (None, True, "x", math.nan, math.inf, -math.inf)] == [None] * 6
    assert math.isnan(finite(None, math.nan)) and finite("2.5") == 2.5


def test_finite_tree_is_strict_json():
    tree = {"a": [1.0, math.nan, {"b": math.inf}], "c": (np.int64(2), np.float64(-math.inf)), "d": True, "e": "s"}
    out = finite_tree(tree)
    assert out == {"a": [1.0, None, {"b": None}], "c": [2, None], "d": True, "e": "s"}
    assert type(out["c"][0]) is int
    json.dumps(out, allow_nan=False)  # raises on any NaN left


# --------------------------------------------------------------------------------------------------------------
# metric names and their fallbacks


def test_a_measure_reads_its_first_present_source():
    trace = BY_NAME["trace"]
    assert trace.sources[0] == ("hessian", "trace_hutchpp")
    both = {"hessian": {"trace_hutchpp": 2.0, "trace_hutchinson": 3.0}}
    assert source(both, trace) == ("hessian", "trace_hutchpp") and lookup(both, "trace") == 2.0
    only = {"hessian": {"trace_hutchpp": None, "trace_hutchinson": 3.0}}
    assert source(only, "trace") == ("hessian", "trace_hutchinson") and lookup(only, "trace") == 3.0
    assert lookup({"hessian": {}}, "trace") is None and lookup({}, "barrier") is None
    assert lookup({"interpolate": {"barrier": 0.5}}, "barrier") == 0.5  # old tables: no barrier_train
    assert len({m.name for m in MEASURES}) == len(MEASURES)


def test_report_and_sweep_read_the_same_table_of_names():
    from pipeline.report.summary import summary_rows
    from pipeline.sweep.stats import sweep_rows

    stages = {
        "train": {"status": "completed", "train_accuracy": 1.0, "test_accuracy": 0.9, "generalization_gap": 0.2},
        "hessian": {"lambda_max": 4.0, "trace_hutchinson": 30.0, "trace_hutchinson_stderr": 1.5, "noise_scale": 7.0},
        "interpolate": {"barrier_train": 0.25, "barrier": 0.3},
    }
    row = summary_rows({"mlp": stages}, ["mlp"])[0]
    assert (row["lambda_max"], row["trace"], row["trace_stderr"], row["barrier"]) == (4.0, 30.0, 1.5, 0.25)
    frame = sweep_rows([("e1", {"runs": {"mlp": {"model": "mlp"}}}, {"mlp": stages})])
    assert frame.loc[0, "trace"] == 30.0 and frame.loc[0, "barrier"] == 0.25
    assert math.isnan(frame.loc[0, "basin_fraction"])  # no surface metrics: NaN in the frame, None in the report


def test_metrics_json_gathers_the_configured_runs_and_compares_seeded_ones(tmp_path):
    def seeds(values):
        from pipeline.metrics import summarise

        rows = [
            {
                "status": "completed",
                "seed": i,
                "lambda_max": v,
                "trace_hutchinson": v,
                "test_accuracy": 0.9,
                "generalization_gap": 0.1,
                "test_loss": 0.3,
                "train_loss": 0.2,
                "lambda_min": -0.1,
            }
            for i, v in enumerate(values)
        ]
        return summarise(rows)

    for run, stage, payload in [
        ("a", "train", {"x": 1}),
        ("a", "seeds", seeds([1.0, 1.1, 0.9])),
        ("b", "train", {"x": 2}),
        ("b", "seeds", seeds([5.0, 5.2, 4.9])),
        ("orphan", "hessian", {"lambda_max": 1}),
    ]:
        (tmp_path / run).mkdir(exist_ok=True)
        (tmp_path / run / f"{stage}_metrics.json").write_text(json.dumps(payload))
    collected = collect(tmp_path)
    assert set(collected) == {"a", "b"}  # a run without train metrics is left out
    metrics, missing = metrics_json(collected, ["b", "a", "c"])
    assert list(metrics) == ["b", "a", "comparisons"] and missing == ["c"]
    verdict = metrics["comparisons"]["a vs b"]["lambda_max"]
    assert verdict["separate"] is True and verdict["ratio"] == pytest.approx(1.0 / (15.1 / 3))
    alone, _ = metrics_json({"a": collected["a"]}, ["a"])
    assert "comparisons" not in alone


# --------------------------------------------------------------------------------------------------------------
# the one tile loop


def _job(name, store, n=23, seed=0):
    torch.manual_seed(seed)
    model = build_model("mlp", ModelConfig(mlp_width=8), (1, 4, 4), 3).eval()
    params = {k: p.detach() for k, p in model.named_parameters()}
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(12, 1, 4, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
    coords = torch.linspace(-1, 1, n, dtype=torch.float64)[:, None]
    return Job(name, model, params, {}, [random_direction(params, seed=seed)], None, coords, x, y, store)


def _evaluate(job, tile):
    return evaluate_tile(job.model, job.params, job.buffers, job.directions, job.coords, job.x, job.y, tile, chunk=4)


def test_run_tiles_equals_one_evaluation_in_any_completion_order(tmp_path):
    jobs = [_job("a", TileStore(tmp_path / "a", "key-a")), _job("b", MemoryStore(), n=9, seed=1)]

    def shuffled(evaluate, pending):  # an executor that finishes tiles in another order (like Dask)
        pending = list(pending)
        random.Random(0).shuffle(pending)
        return in_order(evaluate, pending)

    started, seen = [], []
    out = run_tiles(
        jobs,
        5,
        _evaluate,
        execute=shuffled,
        on_start=lambda *a: started.append(a),
        on_tile=lambda tile, done, total: seen.append((done, total)),
    )
    assert started == [(0, 7)] and [d for d, _ in seen] == list(range(1, 8)) and {t for _, t in seen} == {7}
    for job in jobs:
        whole, whole_acc = evaluate_points(
            job.model, job.params, job.buffers, job.directions, job.coords, job.x, job.y, chunk=4
        )
        torch.testing.assert_close(out[job.name][0], whole, rtol=0, atol=0)
        torch.testing.assert_close(out[job.name][1], whole_acc, rtol=0, atol=0)


def test_run_tiles_resumes_from_the_store_and_refuses_two_jobs_of_one_name(tmp_path):
    first = _job("a", TileStore(tmp_path, "k"))
    calls = []

    def stop_after_two(job, tile):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(tile.index)
        return _evaluate(job, tile)

    with pytest.raises(KeyboardInterrupt):
        run_tiles([first], 5, stop_after_two)
    again, found = [], []
    resumed = run_tiles(
        [_job("a", TileStore(tmp_path, "k"))],
        5,
        lambda j, t: (again.append(t.index), _evaluate(j, t))[1],
        on_start=lambda done, total: found.append((done, total)),
    )
    assert found == [(2, 5)] and again == [2, 3, 4]
    fresh = run_tiles([_job("a", MemoryStore())], 5, _evaluate)
    torch.testing.assert_close(resumed["a"][0], fresh["a"][0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="names must differ"):
        run_tiles([_job("a", MemoryStore()), _job("a", MemoryStore())], 5, _evaluate)


def test_scan_is_the_same_loop():
    job = _job("a", MemoryStore())
    loss, acc = scan(job.model, job.params, {}, job.directions, job.coords, job.x, job.y, None, tile_size=5, chunk=4)
    looped = run_tiles([job], 5, _evaluate)["a"]
    torch.testing.assert_close(loss, looped[0], rtol=0, atol=0)
    torch.testing.assert_close(acc, looped[1], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------
# scan summaries


def _line(path, coefficient):
    c = torch.tensor(coefficient, dtype=torch.float64)
    return LineScan(path, {}, None, c, c, c)


def test_path_summary_of_the_partner_path_and_of_init_to_final():
    loss = torch.tensor([0.1, 0.9, 0.3], dtype=torch.float64)
    acc = torch.tensor([1.0, 0.4, 0.9], dtype=torch.float64)
    partner = path_summary(_line("partner", [0.0, 0.5, 1.0]), loss, acc)
    assert partner["trained_loss"] == pytest.approx(0.1) and partner["barrier"] == pytest.approx(0.9 - 0.2)
    assert partner["min_accuracy"] == pytest.approx(0.4) and partner["max_loss"] == pytest.approx(0.9)
    falling = torch.tensor([2.0, 1.0, 0.1], dtype=torch.float64)
    init = path_summary(_line("init_final", [-1.0, -0.5, 0.0]), falling, acc)
    assert init["trained_loss"] == pytest.approx(0.1) and init["monotonic"] is True and init["max_rise"] == 0.0
    bumpy = path_summary(_line("init_final", [-1.0, -0.5, 0.0]), torch.tensor([2.0, 2.5, 0.1]).double(), acc)
    assert bumpy["monotonic"] is False and bumpy["max_rise"] == pytest.approx(0.5)
    diverged = path_summary(_line("partner", [0.0, 0.5, 1.0]), torch.tensor([0.1, math.inf, 0.3]).double(), acc)
    assert diverged["max_loss"] is None and diverged["barrier"] is None


def test_surface_summary_on_a_known_bowl():
    axis = torch.linspace(-1, 1, 5, dtype=torch.float64)
    coords = torch.cartesian_prod(axis, axis)
    loss = (coords**2).sum(1) + 0.05
    loss[-1] = math.nan
    acc = torch.ones(len(coords), dtype=torch.float64)
    curvature = pd.DataFrame({"alpha": [0.0, 1.0], "beta": [0.0, 1.0], "ratio": [0.2, 0.4]})
    m = surface_summary(
        loss,
        acc,
        coords,
        plane="random",
        info={"plane": "random", "norm": "filter"},
        timing={"points": 25, "seconds": 5.0},
        chunk=8,
        curvature=curvature,
    )
    assert m["loss_center"] == pytest.approx(0.05) and m["loss_min_at"] == [0.0, 0.0]
    assert m["loss_max"] == pytest.approx(2.05) and m["nonfinite_points"] == 1  # the finite corners
    within = int(((loss - 0.05) <= 0.1).sum())  # the origin and nothing else at this spacing (0.25 away)
    assert m["basin_fraction"] == pytest.approx(within / 25) and m["points_per_second"] == 5.0
    assert m["norm"] == "filter" and "plane" in m and m["curvature_ratio_center"] == 0.2
    assert m["curvature_ratio_mean"] == pytest.approx(0.3)
    assert "curvature_ratio_mean" not in surface_summary(
        loss, acc, coords, plane="random", info={}, timing={"points": 0, "seconds": 0.0}, chunk=8
    )


# --------------------------------------------------------------------------------------------------------------
# the shared stage arguments


def test_stage_arguments_fill_the_layout_from_the_run(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("runs:\n  mlp:\n    model: mlp\n")
    args, loaded = stage_arguments(
        "doc",
        ["--params", str(params), "--run", "mlp", "--tables", "t"],
        "data",
        "checkpoints",
        "tables",
        work="artifacts/landscape/{run}/tiles",
    )
    assert args.data == Path(STAGE_PATHS["data"][0]) and args.checkpoints == Path("artifacts/checkpoints/mlp")
    assert args.tables == Path("t") and args.work == Path("artifacts/landscape/mlp/tiles")
    assert [r.name for r in loaded.runs] == ["mlp"]


def test_stage_arguments_read_the_params_before_refusing_extra_words(tmp_path, capsys):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="absent.yaml: file not found"):
        stage_arguments("doc", ["--params", str(tmp_path / "absent.yaml"), "--run", "a", "b"], "data")
    params = tmp_path / "params.yaml"
    params.write_text("runs:\n  mlp:\n    model: mlp\n")
    with pytest.raises(SystemExit) as stop:
        stage_arguments("doc", ["--params", str(params), "--run", "mlp", "stray"], "data")
    assert stop.value.code == 2 and "unrecognized arguments: stray" in capsys.readouterr().err
    with pytest.raises(KeyError, match="not in STAGE_PATHS"):
        stage_arguments("doc", ["--params", str(params), "--run", "mlp"], "nowhere")


def test_landscape_run_passes_dvc_options_through(monkeypatch):
    from pipeline import cli

    seen = []
    monkeypatch.setattr(cli, "repro_with_prefect", lambda port, dvc_args: seen.append(list(dvc_args)) or 0)
    for argv, expected in (
        (["run", "-f"], ["-f"]),
        (["run", "-f", "train@mlp"], ["-f", "train@mlp"]),
        (["sweep", "--force"], ["sweeps/dvc.yaml", "--force"]),
    ):
        with pytest.raises(SystemExit) as done:
            cli.main(argv)
        assert done.value.code == 0 and seen.pop() == expected, argv
    with pytest.raises(SystemExit) as refused:
        cli.main(["check", "-f"])
    assert refused.value.code == 2
