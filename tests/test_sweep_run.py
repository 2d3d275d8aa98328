"""The flatness sweep runner: params validation, grid points, run_point (train + measure, result.json, reuse by
fingerprint, divergence), the rows that pipeline.sweep reads, and the output files."""

import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
import textwrap

import matplotlib.image as mpimg
import pandas as pd
import pytest
from conftest import REPO

import pipeline.sweep.grid as sweep_run
from pipeline.config import ConfigError, DataConfig, HessianConfig, ModelConfig, TrainConfig
from pipeline.curvature.analysis import analyse
from pipeline.metrics import MEASURES
from pipeline.stage import stage_entry
from pipeline.sweep.grid import (
    BATCH_SIZE_MEASURES,
    OUTPUT_FILES,
    RESULT,
    SWEEP_MEASURES,
    SweepGrid,
    SweepParams,
    experiments,
    grid_points,
    headline,
    load_sweep_params,
    make_probe,
    parse_sweep_params,
    run_point,
    write_outputs,
)
from pipeline.sweep.stats import KENDALL_COLUMNS, ROW_COLUMNS, sweep_rows

TINY_HESSIAN = HessianConfig(
    checkpoints="final",
    details="final",
    top_k=1,
    lambda_min=False,
    max_hvps=40,
    trace=("hutchpp",),
    trace_hvps=8,
    density_runs=0,
    groups="none",
    noise=True,
    flatness=("epsilon", "pac_bayes", "adaptive"),
    flatness_steps=2,
    pac_bayes_draws=2,
    adaptive_m=16,
    adaptive_draws=2,
    reparam_alpha=0.0,
    batch_size=32,
    device="cpu",
)
# the keys of the hessian headline that MEASURES reads (pipeline/sweep.py), all of which the sweep must produce
HESSIAN_KEYS = {key for m in MEASURES for stage, key in m.sources if stage == "hessian"} - {"trace_hutchinson"}


def tiny_params(grid=None, epochs=2, **train) -> SweepParams:
    return SweepParams(
        data=DataConfig(dataset="synthetic", synthetic_samples=240, probe_size=32),
        model=ModelConfig(mlp_depth=1, mlp_width=16),
        train=TrainConfig(epochs=epochs, checkpoint_every=epochs, device="cpu", **train),
        hessian=TINY_HESSIAN,
        grid=SweepGrid(**(grid or {"model": ("mlp",), "lr": (0.05,), "batch_size": (32,), "seed": (0,)})),
    )


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- params ---------------------------------------------------------------------------------------------------------


def test_the_shipped_preset_is_valid_and_has_the_24_point_grid():
    params = load_sweep_params(REPO / "sweeps/params.yaml")
    assert params.grid == SweepGrid(
        model=("mlp", "resnet20", "resnet20_noshort"), lr=(0.02, 0.1), batch_size=(32, 256), seed=(0, 1)
    )
    assert params.data.dataset == "digits" and params.train.checkpoint_every == params.train.epochs
    cfg = params.hessian
    assert (cfg.checkpoints, cfg.details, cfg.top_k, cfg.lambda_min, cfg.density_runs, cfg.groups) == (
        "final",
        "final",
        1,
        False,
        0,
        "none",
    )
    assert cfg.trace == ("hutchpp",) and cfg.flatness == ("epsilon", "pac_bayes", "adaptive") and cfg.noise
    assert cfg.reparam_alpha == 0  # the rescaled network is measured by the hessian stage, not at every point
    assert len(grid_points(params)) == 24


GOOD = {
    "grid": {"model": ["mlp"], "lr": [0.1], "batch_size": [32], "seed": [0]},
    "hessian": {"checkpoints": "final", "details": "final"},
}


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"grid": {"lr": [0.1, -0.1]}}, "grid.lr[1]: must be > 0.0, got -0.1"),
        (
            {"grid": {"model": ["mlp", "vgg"]}},
            "grid.model[1]: unknown model 'vgg'; allowed: mlp, resnet, resnet<depth> or resnet<depth>_noshort",
        ),
        ({"grid": {"batch_size": [32, 0]}}, "grid.batch_size[1]: must be >= 1, got 0"),
        ({"grid": {"seed": [0, 0]}}, "grid.seed: values must not repeat, got [0, 0]"),
        ({"grid": {"lr": []}}, "grid.lr: must list at least one value"),
        ({"grid": {"lr": 0.1}}, "grid.lr: expected a list of numbers, got 0.1"),
        ({"grid": {"epochs": [1]}}, "grid.epochs: unknown key; allowed: model, lr, batch_size, seed"),
        ({"train": {"lr": "fast"}}, "train.lr: expected a number, got 'fast' (str)"),
        ({"hessian": {"checkpoints": "all"}}, "hessian.checkpoints: the sweep measures the final checkpoint only"),
        (
            {"hessian": {"details": 2, "checkpoints": "final"}},
            "hessian.details: the sweep measures the final checkpoint",
        ),
        ({"landscape": {}}, "landscape: unknown section; allowed: data, model, train, hessian, grid"),
        ({"grid": None}, "grid: missing"),
    ],
)
def test_invalid_params_fail_with_one_line_naming_the_key(change, expected):
    raw = {**GOOD, **{k: (None if v is None else {**GOOD.get(k, {}), **v}) for k, v in change.items()}}
    if change.get("grid", 0) is None:
        del raw["grid"]
    with pytest.raises(ConfigError) as err:
        parse_sweep_params(raw)
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_the_stage_rejects_bad_params_with_exit_2_before_any_work(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text(
        textwrap.dedent("""\
        grid: {model: [mlp], lr: [0.1, -0.1], batch_size: [32], seed: [0]}
        hessian: {checkpoints: final}
        """)
    )
    spec = importlib.util.spec_from_file_location("sweep_stage", REPO / "stages/sweep.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    with pytest.raises(SystemExit) as exit_info:
        stage_entry(
            stage.main, ["--params", str(bad), "--points", str(tmp_path / "points"), "--out", str(tmp_path / "out")]
        )
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: grid.lr[1]: must be > 0.0, got -0.1\n"
    assert not (tmp_path / "points").exists() and not (tmp_path / "out").exists()


def test_the_library_does_not_import_prefect():
    code = "import sys, pipeline.sweep.grid; print('prefect' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- points ---------------------------------------------------------------------------------------------------------


def test_grid_points_are_every_combination_with_stable_names_and_overridden_train_settings():
    params = tiny_params(
        {"model": ("mlp", "resnet20"), "lr": (0.1, 1.0, 2e-5), "batch_size": (32, 256), "seed": (0, 1)},
        epochs=3,
        weight_decay=0.01,
    )
    points = grid_points(params)
    assert len(points) == 2 * 3 * 2 * 2 and len({p.name for p in points}) == len(points)
    assert [p.name for p in points[:4]] == [
        "mlp-lr0.1-bs32-s0",
        "mlp-lr0.1-bs32-s1",
        "mlp-lr0.1-bs256-s0",
        "mlp-lr0.1-bs256-s1",
    ]
    names = {p.name for p in points}
    assert {"mlp-lr1-bs32-s0", "resnet20-lr2e-05-bs256-s1"} <= names
    point = next(p for p in points if p.name == "resnet20-lr2e-05-bs256-s1")
    assert (point.model, point.lr, point.batch_size, point.seed) == ("resnet20", 2e-5, 256, 1)
    run = point.run
    assert run.name == point.name and run.model_name == "resnet20" and run.model == params.model
    assert (run.train.lr, run.train.batch_size, run.train.seed) == (2e-5, 256, 1)
    assert run.train.epochs == 3 and run.train.weight_decay == 0.01  # the rest comes from the base train section
    assert grid_points(params) == points  # stable


# --- run_point ------------------------------------------------------------------------------------------------------


@pytest.fixture
def counted_train(monkeypatch):
    """Count the calls of pipeline.training.trainer.train made by run_point."""
    calls = []
    real = sweep_run.train

    def counting(run, data, checkpoint_dir, on_epoch=None):
        calls.append(run.name)
        return real(run, data, checkpoint_dir, on_epoch=on_epoch)

    monkeypatch.setattr(sweep_run, "train", counting)
    return calls


def test_run_point_trains_measures_and_writes_a_result_with_finite_measures(tmp_path, synthetic_data, counted_train):
    params = tiny_params()
    point = grid_points(params)[0]
    probe = make_probe(synthetic_data, params.hessian)
    lines = []
    result = run_point(point, synthetic_data, probe, tmp_path / point.name, params.hessian, log=lines.append)
    assert counted_train == [point.name] and result["reused"] is False
    train, hessian = result["metrics"]["train"], result["metrics"]["hessian"]
    assert train["status"] == "completed" and train["epochs"] == 2 and math.isfinite(train["generalization_gap"])
    assert HESSIAN_KEYS <= set(hessian)
    assert all(isinstance(hessian[k], float) and math.isfinite(hessian[k]) for k in HESSIAN_KEYS)
    assert hessian["lambda_max"] > 0 and hessian["pac_bayes_sigma_isotropic"] > 0
    assert hessian["lambda_max_lr_over_2"] == pytest.approx(hessian["lambda_max"] * 0.05 / 2)
    assert hessian["epoch"] == 2 and hessian["checkpoint"] == "epoch_0002.pt"
    stored = json.loads((tmp_path / point.name / RESULT).read_text())
    assert stored["metrics"] == result["metrics"] and stored["fingerprint"] == result["fingerprint"]
    assert stored["point"] == {"model": "mlp", "lr": 0.05, "batch_size": 32, "seed": 0}
    assert sorted(p.name for p in (tmp_path / point.name / "checkpoints").glob("epoch_*.pt")) == [
        "epoch_0000.pt",
        "epoch_0002.pt",
    ]  # checkpoint_every = epochs: init and final only
    assert any("epoch 2/2" in line for line in lines) and any("PAC-Bayes" in line for line in lines)
    # not listed in the files: only the result's own keys
    assert set(stored) == {"format", "name", "point", "fingerprint", "metrics", "wall_seconds", "provenance"}


def test_a_rerun_reuses_finished_points_and_recomputes_when_the_config_changes(tmp_path, synthetic_data, counted_train):
    params = tiny_params()
    point = grid_points(params)[0]
    probe = make_probe(synthetic_data, params.hessian)
    folder = tmp_path / point.name
    first = run_point(point, synthetic_data, probe, folder, params.hessian)
    result_file, final = folder / RESULT, folder / "checkpoints" / "epoch_0002.pt"
    stamps = (result_file.stat().st_mtime_ns, final.stat().st_mtime_ns)

    again = run_point(point, synthetic_data, probe, folder, params.hessian)
    assert again["reused"] is True and again["metrics"] == first["metrics"]
    assert counted_train == [point.name]  # not trained again
    assert (result_file.stat().st_mtime_ns, final.stat().st_mtime_ns) == stamps

    # another measure setting: measured again from the kept final checkpoint (training resumes as finished)
    other = dataclasses.replace(params.hessian, flatness_steps=3)
    remeasured = run_point(point, synthetic_data, probe, folder, other)
    assert remeasured["reused"] is False and remeasured["fingerprint"] != first["fingerprint"]
    assert final.stat().st_mtime_ns == stamps[1]  # the final checkpoint was not rewritten: no retraining
    assert remeasured["metrics"]["train"] == first["metrics"]["train"]
    assert json.loads(result_file.read_text())["fingerprint"] == remeasured["fingerprint"]

    # another training setting under the same name: trained afresh (the old checkpoints do not match)
    longer = grid_points(tiny_params(epochs=3))[0]
    assert longer.name == point.name
    retrained = run_point(longer, synthetic_data, probe, folder, params.hessian)
    assert retrained["reused"] is False and retrained["metrics"]["train"]["epochs"] == 3
    assert counted_train == [point.name] * 3

    # a torn result file is not trusted
    result_file.write_text("{")
    assert run_point(longer, synthetic_data, probe, folder, params.hessian)["reused"] is False


def test_a_diverged_point_is_recorded_without_measures(tmp_path, synthetic_data):
    params = tiny_params(
        {"model": ("mlp",), "lr": (1e12,), "batch_size": (32,), "seed": (0,)}, momentum=0.0, schedule="constant"
    )
    point = grid_points(params)[0]
    result = run_point(
        point, synthetic_data, make_probe(synthetic_data, params.hessian), tmp_path / point.name, params.hessian
    )
    train = result["metrics"]["train"]
    assert train["status"] == "diverged" and train["diverged_step"] is not None
    assert "hessian" not in result["metrics"]
    json.loads((tmp_path / point.name / RESULT).read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN
    row = sweep_rows(experiments([point], {point.name: result})).iloc[0]
    assert row.status == "diverged" and math.isnan(row.lambda_max)


def test_headline_gives_the_hessian_stage_numbers_of_the_report(synthetic_data):
    """A point's measures are the hessian stage's headline of the same rows (pipeline.metrics), value by value."""
    import torch

    from pipeline.training.models import build_model

    torch.manual_seed(0)
    model = build_model(
        "mlp", ModelConfig(mlp_depth=1, mlp_width=8), synthetic_data.input_shape, synthetic_data.num_classes
    ).eval()
    cfg = dataclasses.replace(
        TINY_HESSIAN, top_k=2, lambda_min=True, trace=("hutchinson", "hutchpp"), operators=("hessian", "ggn")
    )
    report = analyse(model, make_probe(synthetic_data, cfg), cfg, details=True)
    out = headline(report.rows, 0.3, epoch=4, checkpoint="epoch_0004.pt")

    def value(quantity, operator="hessian", method=None, index=0):
        rows = [
            r
            for r in report.rows
            if r["operator"] == operator
            and r["group"] == "all"
            and r["quantity"] == quantity
            and r["index"] == index
            and method in (None, r["method"])
        ]
        return rows[0]["value"]

    assert (out["epoch"], out["checkpoint"]) == (4, "epoch_0004.pt")
    assert out["lambda_max"] == value("eigenvalue") and out["eigenvalues"] == [
        value("eigenvalue", index=i) for i in range(2)
    ]
    assert out["lambda_max_lr_over_2"] == pytest.approx(value("eigenvalue") * 0.15)
    assert out["lambda_min"] == value("lambda_min") and out["ggn_lambda_max"] == value("eigenvalue", "ggn")
    assert out["trace_hutchpp"] == value("trace", method="hutchpp")
    assert out["pac_bayes_sigma_isotropic"] == value("pac_bayes_sigma", method="isotropic")
    assert out["hvps"] == value("products") == report.hvps
    assert {"lambda_min", "trace_hutchinson", "ggn_lambda_max", *HESSIAN_KEYS} <= set(out)
    assert headline([], 0.3, epoch=0, checkpoint="epoch_0000.pt") == {"status": "no finite checkpoint"}


# --- aggregation ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_points(tmp_path_factory, synthetic_data):
    """Four measured points (2 lr x 2 batch sizes) and their results."""
    import torch

    previous = torch.get_num_threads()  # a module fixture runs before `one_thread`: it restores what it changes
    torch.set_num_threads(1)
    try:
        params = tiny_params({"model": ("mlp",), "lr": (0.02, 0.1), "batch_size": (16, 64), "seed": (0,)})
        points = grid_points(params)
        probe = make_probe(synthetic_data, params.hessian)
        root = tmp_path_factory.mktemp("points")
        results = {p.name: run_point(p, synthetic_data, probe, root / p.name, params.hessian) for p in points}
    finally:
        torch.set_num_threads(previous)
    return params, points, results


def test_experiments_give_one_completed_row_per_point_with_its_grid_values(four_points):
    params, points, results = four_points
    frame = sweep_rows(experiments(points, results, params.train))
    assert tuple(frame.columns) == ROW_COLUMNS and len(frame) == 4
    assert list(frame.run) == [p.name for p in points] and list(frame.experiment) == list(frame.run)
    assert (frame.status == "completed").all() and (frame.model == "mlp").all()
    assert sorted(zip(frame.lr, frame.batch_size, frame.seed)) == [
        (0.02, 16, 0),
        (0.02, 64, 0),
        (0.1, 16, 0),
        (0.1, 64, 0),
    ]
    for measure in SWEEP_MEASURES:
        assert frame[measure].notna().all(), measure
    assert (
        frame.generalization_gap == [results[p.name]["metrics"]["train"]["generalization_gap"] for p in points]
    ).all()
    # a point without a result stays in the frame, not trained
    partial = sweep_rows(experiments(points, {points[0].name: results[points[0].name]}, params.train))
    assert list(partial.status) == ["completed", "not trained", "not trained", "not trained"]


def test_write_outputs_writes_every_file_with_the_kendall_rows_of_the_measures(four_points, tmp_path):
    params, points, results = four_points
    frame = sweep_rows(experiments(points, results, params.train))
    out = write_outputs(frame, tmp_path / "sweep")
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == sorted(OUTPUT_FILES)  # no temporary files left

    points_table = pd.read_parquet(tmp_path / "sweep/points.parquet")
    pd.testing.assert_frame_equal(points_table, frame)
    kendall = pd.read_parquet(tmp_path / "sweep/kendall.parquet")
    assert tuple(kendall.columns) == KENDALL_COLUMNS and list(kendall.measure) == list(SWEEP_MEASURES)
    assert (kendall.n == 4).all() and kendall.tau.between(-1, 1).all()
    batch = pd.read_parquet(tmp_path / "sweep/batch_size.parquet")
    assert sorted(set(batch.measure)) == sorted(BATCH_SIZE_MEASURES)
    assert len(batch) == 2 * len(BATCH_SIZE_MEASURES) and set(batch.lr) == {0.02, 0.1} and (batch.n == 2).all()

    metrics = json.loads((tmp_path / "sweep/sweep_metrics.json").read_text(), parse_constant=pytest.fail)
    assert metrics["n_points"] == 4 and metrics["n_completed"] == 4 and metrics["n_diverged"] == 0
    assert set(metrics["measures"]) == set(SWEEP_MEASURES)
    lam = metrics["measures"]["lambda_max"]
    row = kendall.set_index("measure").loc["lambda_max"]
    assert lam["tau"] == pytest.approx(row.tau) and lam["n"] == 4 and lam["agrees"] == (row.tau > 0)
    assert out["metrics"] == metrics

    readme = (tmp_path / "sweep/README.md").read_text()
    assert "4 of 4 grid points completed" in readme and "](sweep.png)" in readme
    sections = dict(part.split("\n", 1) for part in readme.split("\n## ")[1:])
    kendall_md = sections["Kendall's τ against the generalisation gap"]
    assert [line.split(" | ")[0].strip("| ") for line in kendall_md.strip().splitlines()[2:]] == list(SWEEP_MEASURES)
    assert sections["Batch size and sharpness (Keskar et al.)"].count("| mlp |") == len(batch)
    assert all(p.name in sections["Points"] for p in points)
    image = mpimg.imread(tmp_path / "sweep/sweep.png")
    assert image.shape[0] > 300 and image.shape[1] > 300
