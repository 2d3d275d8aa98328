"""Models from an import path (``model: "package.module:callable"``): building, the one-line errors of ``landscape
check``, and the checkpoint fingerprint that follows the model's own sources."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from conftest import REPO
from ruamel.yaml import YAML

from pipeline.config import ModelConfig, parse_params
from pipeline.errors import ModelError
from pipeline.training.checkpoints import run_fingerprint
from pipeline.training.custom import build_custom, check_model, model_sources
from pipeline.training.models import build_model, count_parameters

LANDSCAPE = Path(sys.executable).parent / "landscape"


def test_the_example_model_of_the_repository_builds_and_checks(monkeypatch):
    monkeypatch.chdir(REPO)
    model = build_model("models.example:small_cnn", ModelConfig(model_kwargs=(("channels", 4),)), (1, 8, 8), 10)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    # 1->4 and 4->8 convolutions, 8->32 and 32->10 linear layers
    assert count_parameters(model) == (9 * 4 + 4) + (4 * 9 * 8 + 8) + (8 * 32 + 32) + (32 * 10 + 10)
    assert check_model("models.example:small_cnn", (1, 8, 8), 10, {"channels": 4}) == (
        f"models.example:small_cnn: Sequential, {count_parameters(model):,} parameters, output (B, 10)"
    )
    assert model_sources("models.example:small_cnn") == sorted((REPO / "models").rglob("*.py"))


BAD = {
    "missing-module": ("", "{mod}_absent:f", "cannot import {mod}_absent (ModuleNotFoundError: No module named"),
    "raises-on-import": ("raise RuntimeError('boom')", "{mod}:f", "cannot import {mod} (RuntimeError: boom)"),
    "missing-attribute": ("f = 1", "{mod}:g", "{mod} has no attribute 'g'"),
    "not-callable": ("f = 3", "{mod}:f", "f is a int, not a callable"),
    "not-a-module": ("def f(shape, classes):\n    return {}", "{mod}:f", "returned a dict, not a torch.nn.Module"),
    "bad-signature": ("def f():\n    return None", "{mod}:f", "calling it with (1, 8, 8), 10 classes"),
    "no-parameters": (
        "from torch import nn\ndef f(shape, classes):\n    return nn.ReLU()",
        "{mod}:f",
        "the module has no trainable parameters",
    ),
    "wrong-output": (
        "from torch import nn\ndef f(shape, classes):\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 5))",
        "{mod}:f",
        "a batch of shape (2, 1, 8, 8) gave output (2, 5); expected (2, 10) logits",
    ),
    "forward-fails": (
        "from torch import nn\ndef f(shape, classes):\n    return nn.Linear(3, classes)",
        "{mod}:f",
        "a forward on zeros of shape (2, 1, 8, 8) failed (RuntimeError:",
    ),
}


def _module(tmp_path: Path, source: str) -> str:
    name = f"user_model_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(source + "\n")
    return name


@pytest.mark.parametrize("case", list(BAD))
def test_an_unusable_model_is_one_line_naming_the_path(case, tmp_path, monkeypatch):
    source, path, needle = BAD[case]
    mod = _module(tmp_path, source)
    monkeypatch.syspath_prepend(str(tmp_path))
    path, needle = path.format(mod=mod), needle.format(mod=mod)
    with pytest.raises(ModelError) as info:
        check_model(path, (1, 8, 8), 10)
    message = str(info.value)
    assert message.startswith(f"model {path!r}: ") and needle in message and "\n" not in message, message


def _params_file(folder: Path, model: str, **run) -> Path:
    raw = {"data": {"dataset": "digits"}, "runs": {"mine": {"model": model, **run}}}
    parse_params(raw)  # valid as params: only the model itself is wrong
    path = folder / "params.yaml"
    YAML(typ="safe", pure=True).dump(raw, path)
    return path


def test_landscape_check_builds_each_model_and_refuses_a_bad_one_with_exit_2(tmp_path):
    good = _module(
        tmp_path,
        "from torch import nn\ndef net(shape, classes, width=4):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, classes))",
    )
    ok = subprocess.run(
        [str(LANDSCAPE), "check", "--params", str(_params_file(tmp_path, f"{good}:net", model_kwargs={"width": 6}))],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert f"  mine: {good}:net: Sequential, {64 * 6 + 6 + 6 * 10 + 10:,} parameters, output (B, 10)" in ok.stdout
    bad = _module(tmp_path, "from torch import nn\ndef net(shape, classes):\n    return nn.Linear(64, classes)")
    failed = subprocess.run(
        [str(LANDSCAPE), "check", "--params", str(_params_file(tmp_path, f"{bad}:net"))],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert (
        failed.stderr.startswith(f"error: runs.mine: model '{bad}:net': a forward on zeros")
        and failed.stderr.count("\n") == 1
    )


def test_editing_the_model_source_changes_the_checkpoint_fingerprint(tmp_path, monkeypatch):
    package = f"user_pkg_{uuid.uuid4().hex[:8]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "helpers.py").write_text("WIDTH = 4\n")
    (tmp_path / package / "net.py").write_text(
        textwrap.dedent(
            f"""
            from torch import nn
            from {package}.helpers import WIDTH
            def build(shape, classes):
                return nn.Sequential(nn.Flatten(), nn.Linear(64, WIDTH), nn.Linear(WIDTH, classes))
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    run = parse_params({"runs": {"mine": {"model": f"{package}.net:build"}}}).run("mine")
    assert [p.name for p in model_sources(run.model_name)] == ["__init__.py", "helpers.py", "net.py"]
    before = run_fingerprint(run, "data")
    assert run_fingerprint(run, "data") == before
    (tmp_path / package / "helpers.py").write_text("WIDTH = 5\n")  # a file the factory imports, not the factory's
    assert run_fingerprint(run, "data") != before
    assert isinstance(build_custom(run.model_name, (1, 8, 8), 10), torch.nn.Sequential)
