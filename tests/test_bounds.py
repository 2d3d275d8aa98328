"""Bounds and no silent changes (issue 13, item 6): every size-like key has an upper bound (or a memory estimate)
checked before any work, and values the data or the model cannot honour (a batch larger than the train split, more
eigenvalues than parameters, a run name the shell splits) are one-line errors naming the key, never clipped."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from ruamel.yaml import YAML

from pipeline.config import (
    SECTIONS,
    ConfigError,
    DataConfig,
    HessianConfig,
    ModelConfig,
    check_batch_size,
    check_run_batch_size,
    parse_params,
    read_prepared_meta,
)
from pipeline.curvature.analysis import analyse, check_dimensions, eigen_solve
from pipeline.curvature.operators import HessianOperator, ProbeSet
from pipeline.data import DataError, prepare_dataset, save_prepared
from pipeline.sweep.grid import SweepGrid, check_grid_batch_sizes, grid_points, parse_sweep_params, run_point
from pipeline.training.models import build_model

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SYNTHETIC = {"dataset": "synthetic", "synthetic_samples": 80, "probe_size": 16}  # 60 train, 20 test


def one_line(err: Exception, key: str, *needles: str) -> str:
    text = str(err)
    assert "\n" not in text, text
    if isinstance(err, ConfigError):
        assert err.key == key and text.startswith(f"{key}: "), text
    else:
        assert text.startswith(key), text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    return text


def config_error(raw: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_params({"runs": {"a": {"model": "mlp"}}, **raw})
    return info.value


# --------------------------------------------------------------------------------------------------------------
# Upper bounds in the config
# --------------------------------------------------------------------------------------------------------------


def _int_fields():
    """Every integer key of every section (and of the sweep grid), with its bound."""
    from pipeline.config import ReproConfig  # noqa: F401 - part of SECTIONS; imported to fail loudly if renamed

    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            args = typing.get_args(tp)
            item = args[0] if typing.get_origin(tp) is tuple else tp
            if item is int or (int in args and f.name not in ("checkpoints", "details")):  # int | str: batch_size
                yield pytest.param(section, cls, f, id=f"{section}.{f.name}")


@pytest.mark.parametrize("section, cls, f", list(_int_fields()))
def test_every_integer_key_has_an_upper_bound_that_is_enforced(section, cls, f):
    limit = f.metadata.get("le")
    assert limit is not None, f"{section}.{f.name} has no upper bound"
    value = limit + 1
    defaults = f.default if isinstance(f.default, tuple) else (f.default,)
    raw_value = [value] if isinstance(f.default, tuple) else value
    extra = {"schedule": "step"} if f.name == "milestones" else {}
    err = config_error({section: {f.name: raw_value, **extra}})
    key = f"{section}.{f.name}" + ("[0]" if isinstance(f.default, tuple) else "")
    one_line(err, key, f"must be <= {limit}", f"got {value}")
    assert all(not isinstance(d, int) or d <= limit for d in defaults)  # the defaults stay inside their bounds


def test_sweep_grid_batch_size_has_an_upper_bound():
    limit = next(f for f in dataclasses.fields(SweepGrid) if f.name == "batch_size").metadata["le"]
    with pytest.raises(ConfigError) as info:
        parse_sweep_params({"grid": {"batch_size": [32, limit + 1]}})
    one_line(info.value, "grid.batch_size[1]", f"must be <= {limit}", f"got {limit + 1}")


def test_surface_points_bound_names_the_key_and_the_memory_estimate():
    err = config_error({"landscape": {"surface_points": 100001}})
    text = one_line(err, "landscape.surface_points", "must be <= 2001", "got 100001", "1e+10 points", "TiB")
    assert text.endswith("at 256 bytes per point)")
    assert (
        parse_params({"runs": {"a": {"model": "mlp"}}, "landscape": {"surface_points": 2001}}).landscape.surface_points
        == 2001
    )


def test_absurd_epochs_are_refused_before_training():
    one_line(
        config_error({"train": {"epochs": 99999999999999999999999}}),
        "train.epochs",
        "must be <= 100000",
        "got 99999999999999999999999",
    )
    with pytest.raises(ConfigError) as info:
        parse_params({"runs": {"a": {"model": "mlp", "epochs": 10**6}}})
    one_line(info.value, "runs.a.epochs", "must be <= 100000")


def test_mlp_size_is_checked_by_a_parameter_estimate():
    one_line(
        config_error({"model": {"mlp_width": 65536}}),
        "model.mlp_width",
        "4.3e+09 parameters",
        "16 GiB",
        "allowed up to",
    )
    with pytest.raises(ConfigError) as info:
        parse_params({"runs": {"a": {"model": "mlp", "mlp_width": 30000, "mlp_depth": 3}}})
    one_line(info.value, "runs.a.mlp_width", "3 hidden layers of 30000 units")
    assert parse_params({"runs": {"a": {"model": "mlp"}}, "model": {"mlp_width": 65536, "mlp_depth": 1}})


def test_synthetic_data_size_is_checked_by_a_memory_estimate():
    err = config_error({"data": {"dataset": "synthetic", "synthetic_size": 1024, "synthetic_channels": 3}})
    one_line(err, "data.synthetic_samples", "3 x 1024 x 1024 float32", "7.03 GiB", "allowed up to 4 GiB")
    # only the synthetic dataset reads the synthetic_* keys
    assert parse_params({"runs": {"a": {"model": "mlp"}}, "data": {"synthetic_size": 1024, "synthetic_channels": 3}})


def test_a_milestone_that_never_applies_is_an_error():
    one_line(
        config_error({"train": {"schedule": "step", "epochs": 10, "milestones": [5, 10]}}),
        "train.milestones",
        "must be < epochs (10)",
        "[5, 10]",
    )
    assert parse_params(
        {"runs": {"a": {"model": "mlp"}}, "train": {"schedule": "step", "epochs": 10, "milestones": [9]}}
    )


# --------------------------------------------------------------------------------------------------------------
# Batch size against the train split
# --------------------------------------------------------------------------------------------------------------


def test_batch_size_above_the_split_is_an_error_naming_the_key():
    params = parse_params(
        {"train": {"batch_size": 64}, "runs": {"a": {"model": "mlp"}, "b": {"model": "mlp", "batch_size": 500}}}
    )
    check_run_batch_size(params, "a", 64, "synthetic")  # equal to the split: one full batch, as asked
    with pytest.raises(ConfigError) as info:
        check_run_batch_size(params, "a", 60, "synthetic")
    one_line(info.value, "train.batch_size", "must be <= 60, the train split of synthetic", "'full'", "got 64")
    with pytest.raises(ConfigError) as info:
        check_run_batch_size(params, "b", 450, "digits")
    one_line(info.value, "runs.b.batch_size", "must be <= 450", "got 500")
    check_batch_size("train.batch_size", "full", 10)  # full-batch GD is asked for by name, never by accident


def test_read_prepared_meta_fails_in_one_line(tmp_path):
    with pytest.raises(DataError) as info:
        read_prepared_meta(tmp_path)
    one_line(info.value, str(tmp_path / "meta.json"), "file not found")
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataError) as info:
        read_prepared_meta(tmp_path)
    one_line(info.value, str(tmp_path / "meta.json"), "unreadable")


def test_sweep_grid_batch_size_above_the_split_fails_before_training(synthetic_data, tmp_path):
    params = parse_sweep_params(
        {
            "data": {"dataset": "synthetic", "synthetic_samples": 240, "probe_size": 32},
            "train": {"epochs": 1},
            "hessian": {"checkpoints": "final", "details": "final", "top_k": 1},
            "grid": {"batch_size": [32, 1000]},
        }
    )
    n_train = len(synthetic_data.y_train)
    with pytest.raises(ConfigError) as info:
        check_grid_batch_sizes(params.grid, n_train, "synthetic")
    one_line(info.value, "grid.batch_size[1]", f"must be <= {n_train}", "got 1000")
    big = [p for p in grid_points(params) if p.batch_size == 1000][0]
    with pytest.raises(ConfigError) as info:
        run_point(big, synthetic_data, None, tmp_path / big.name, params.hessian, data_fingerprint="x")
    one_line(info.value, "grid.batch_size", "got 1000")
    assert not (tmp_path / big.name).exists()  # nothing trained, nothing written


# --------------------------------------------------------------------------------------------------------------
# Hessian keys against the parameter count
# --------------------------------------------------------------------------------------------------------------


def _tiny():
    """mlp_depth 0 on 1x2x2 inputs with 2 classes: 10 parameters, float64."""
    torch.manual_seed(0)
    model = build_model("mlp", ModelConfig(mlp_depth=0), (1, 2, 2), 2).double().eval()
    g = torch.Generator().manual_seed(1)
    probe = ProbeSet.from_tensors(
        torch.randn(9, 1, 2, 2, generator=g, dtype=torch.float64), torch.randint(0, 2, (9,), generator=g), 9
    )
    return model, probe


def test_top_k_above_the_dimension_is_an_error_not_a_clip():
    model, probe = _tiny()
    small = dict(density_runs=0, groups="none")
    assert check_dimensions(model, HessianConfig(top_k=9, **small)) == 10  # 9 + lambda_min = 10: fits
    with pytest.raises(ConfigError) as info:
        check_dimensions(model, HessianConfig(top_k=10, **small), "run a (mlp)")
    one_line(
        info.value, "hessian.top_k", "must be <= 9 (the 10 parameters of run a (mlp) less one for lambda_min)", "got 10"
    )
    with pytest.raises(ConfigError) as info:
        check_dimensions(model, HessianConfig(top_k=11, lambda_min=False, **small))
    one_line(info.value, "hessian.top_k", "must be <= 10", "got 11")
    with pytest.raises(ConfigError) as info:  # the solver itself refuses instead of clipping
        eigen_solve(HessianOperator(model, probe), HessianConfig(top_k=11, lambda_min=False, **small), 11, False, 0)
    one_line(info.value, "hessian.top_k", "must be <= 10", "got 11")
    with pytest.raises(ConfigError) as info:  # analyse checks before its first product
        analyse(model, probe, HessianConfig(top_k=12, max_hvps=100, **small), details=False)
    one_line(info.value, "hessian.top_k")


def test_density_steps_and_group_top_k_above_their_dimensions_are_errors():
    model, _ = _tiny()
    with pytest.raises(ConfigError) as info:
        check_dimensions(model, HessianConfig(top_k=1, groups="none"))  # default density_steps 64 > 10
    one_line(info.value, "hessian.density_steps", "must be <= 10", "got 64")
    assert check_dimensions(model, HessianConfig(top_k=1, groups="none", density_runs=0)) == 10  # no density: unread
    resnet_cfg = ModelConfig()
    with torch.device("meta"):
        resnet = build_model("resnet20", resnet_cfg, (3, 32, 32), 10)
    with pytest.raises(ConfigError) as info:
        check_dimensions(resnet, HessianConfig(groups="module", group_top_k=40), "run r (resnet20)")
    one_line(info.value, "hessian.group_top_k", "must be <= 32", "group 'bn1'", "got 40")
    with pytest.raises(ConfigError) as info:
        check_dimensions(resnet, HessianConfig(density_steps=10_000), "run r (resnet20)")
    one_line(info.value, "hessian.density_steps", "GiB", "allowed up to 16 GiB")


# --------------------------------------------------------------------------------------------------------------
# The stage entry points: exit 2, one `error:` line, no traceback, before any work
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage_dir(tmp_path_factory):
    """Prepared synthetic data (60 train samples) and a writer of small params files."""
    root = tmp_path_factory.mktemp("stages")
    save_prepared(prepare_dataset(DataConfig(**SYNTHETIC)), root / "data")
    return root


def _write(path: Path, raw: dict) -> Path:
    YAML(typ="safe", pure=True).dump(raw, path)
    return path


def _params(**sections) -> dict:
    raw = {
        "data": dict(SYNTHETIC),
        "train": {"epochs": 1, "device": "cpu"},
        "hessian": {"device": "cpu", "groups": "none", "density_runs": 0},
        "runs": {"mlp": {"model": "mlp"}},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values} if name != "runs" else values
    return raw


def _stage(stage_dir: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # nothing may reach Prefect
    return subprocess.run(
        [PYTHON, str(REPO / "stages" / script), *args],
        cwd=stage_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line_exit_2(result: subprocess.CompletedProcess, prefix: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {prefix}"), result.stderr
    return lines[0]


@pytest.mark.parametrize("script, out", [("train.py", "checkpoints"), ("partner.py", "partners")])
def test_train_and_partner_stages_refuse_a_batch_above_the_split(stage_dir, tmp_path, script, out):
    params = _write(tmp_path / "p.yaml", _params(train={"epochs": 1, "device": "cpu", "batch_size": 64}))
    args = [
        "--params",
        str(params),
        "--run",
        "mlp",
        "--data",
        str(stage_dir / "data"),
        "--checkpoints",
        str(tmp_path / out),
        "--tables",
        str(tmp_path / "tables"),
    ]
    line = assert_one_line_exit_2(_stage(stage_dir, script, *args), "train.batch_size: ")
    assert "must be <= 60, the train split of synthetic" in line and "got 64" in line
    override = _write(tmp_path / "q.yaml", _params(runs={"mlp": {"model": "mlp", "batch_size": 61}}))
    args[1] = str(override)
    assert_one_line_exit_2(_stage(stage_dir, script, *args), "runs.mlp.batch_size: must be <= 60")
    assert not (tmp_path / out).exists() and not (tmp_path / "tables").exists()  # nothing trained or written


def test_hessian_stage_refuses_top_k_above_the_parameter_count(stage_dir, tmp_path):
    # mlp_depth 0 on 1x8x8 synthetic inputs with 3 classes: 64 * 3 + 3 = 195 parameters
    params = _write(
        tmp_path / "p.yaml",
        _params(
            model={"mlp_depth": 0},
            hessian={"device": "cpu", "groups": "none", "density_runs": 0, "top_k": 200, "max_hvps": 500},
        ),
    )
    result = _stage(
        stage_dir,
        "hessian.py",
        "--params",
        str(params),
        "--run",
        "mlp",
        "--data",
        str(stage_dir / "data"),
        "--checkpoints",
        str(tmp_path / "none"),
        "--tables",
        str(tmp_path / "t"),
    )
    line = assert_one_line_exit_2(result, "hessian.top_k: ")
    assert "must be <= 194 (the 195 parameters of run mlp (mlp) less one for lambda_min), got 200" in line


def test_a_run_name_split_by_the_shell_fails_with_the_projects_own_line(stage_dir, tmp_path):
    """DVC pastes ``${key}`` unquoted into the command, so ``my run`` arrives as ``--run my run``: the stage must
    still end with the name check of ``load_params``, not argparse's usage text."""
    params = _write(tmp_path / "p.yaml", _params(runs={"my run": {"model": "mlp"}}))
    expected = "runs.my run: run names start with a letter and use letters, digits, '_' and '-'"
    for script in ("train.py", "partner.py", "hessian.py", "interpolate.py", "surface.py"):
        result = _stage(
            stage_dir,
            script,
            "--params",
            str(params),
            "--run",
            "my",
            "run",
            "--data",
            str(stage_dir / "data"),
            "--checkpoints",
            str(tmp_path / "ck/my"),
            "run",
            "--tables",
            str(tmp_path / "t/my"),
            "run",
        )
        assert assert_one_line_exit_2(result, "") == f"error: {expected}", script
    check = subprocess.run(
        [str(Path(PYTHON).parent / "landscape"), "check", "--params", str(params)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 2 and check.stderr == f"error: {expected}\n"
    assert not (tmp_path / "ck").exists() and not (tmp_path / "t").exists()


def test_sweep_stage_refuses_a_grid_batch_above_the_split(tmp_path):
    raw = {
        "data": dict(SYNTHETIC),
        "train": {"epochs": 1, "device": "cpu"},
        "hessian": {
            "checkpoints": "final",
            "details": "final",
            "top_k": 1,
            "lambda_min": False,
            "density_runs": 0,
            "groups": "none",
            "device": "cpu",
        },
        "grid": {"model": ["mlp"], "batch_size": [32, 64]},
    }
    params = _write(tmp_path / "s.yaml", raw)
    result = _stage(
        tmp_path,
        "sweep.py",
        "--params",
        str(params),
        "--points",
        str(tmp_path / "points"),
        "--out",
        str(tmp_path / "out"),
    )
    line = assert_one_line_exit_2(result, "grid.batch_size[1]: ")
    assert "must be <= 60, the train split of synthetic" in line
    assert not (tmp_path / "points").exists() and not (tmp_path / "out").exists()
