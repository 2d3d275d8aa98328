"""A model of the user's own (``models/example.py``, named by import path) on data of their own (an ``.npz`` in
``data/``) through every stage of ``dvc repro``; an edit of the model's file retrains it instead of resuming, and a
new data file prepares again."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_pipeline import SMALL_PARAMS, dvc, stages_run, tracked_copy, user_env

CUSTOM = {
    "model": "models.example:small_cnn",
    "model_kwargs": {"channels": 4, "hidden": 16},
    "epochs": 2,
}
STAGES = {f"{s}@mine" for s in ("train", "hessian", "partner", "seeds", "interpolate", "surface")}


@pytest.fixture(scope="module")
def custom_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("custom")
    (root / "data").mkdir()
    rng = np.random.default_rng(0)
    labels = np.arange(200) % 4
    images = (rng.integers(0, 64, size=(200, 1, 8, 8)) + 48 * labels[:, None, None, None]).astype(np.uint8)
    np.savez(
        root / "data" / "mine.npz", x_train=images[:160], y_train=labels[:160], x_test=images[160:], y_test=labels[160:]
    )
    data = {"dataset": "npz", "path": "data/mine.npz", "probe_size": 16}
    repro = {**SMALL_PARAMS["repro"], "seeds": 1}  # the run alone: the seeds stage trains nothing of its own
    tracked_copy(root, {**SMALL_PARAMS, "data": data, "runs": {"mine": CUSTOM}, "repro": repro})
    with user_env(root) as env:
        yield root, env


def test_a_custom_model_runs_every_stage_and_an_edit_of_its_file_retrains_it(custom_repo):
    repo, env = custom_repo
    built = dvc(repo, env, "repro").stdout
    assert stages_run(built) == {"prepare", *STAGES, "landscape_figures", "metrics", "report"}
    metrics = json.loads((repo / "reports/metrics.json").read_text())["mine"]
    assert metrics["train"]["status"] == "completed" and metrics["train"]["epochs"] == 2
    assert metrics["hessian"]["lambda_max"] > 0 and metrics["interpolate"]["barrier"] >= 0
    assert metrics["surface"]["points"] == 25 and metrics["seeds"]["lambda_max"]["n"] == 1
    assert (repo / "artifacts/seeds/mine").is_dir() and not any((repo / "artifacts/seeds/mine").iterdir())
    spectrum = pd.read_parquet(repo / "reports/tables/mine/hessian_spectrum.parquet")
    assert {"0", "2", "6", "8"} <= set(spectrum.group)  # per-layer blocks of the Sequential: its parameter layers
    assert "<td>mine</td>" in (repo / "reports/index.html").read_text()
    prepared = json.loads((repo / "artifacts/data/meta.json").read_text())
    assert (prepared["name"], prepared["num_classes"], prepared["input_shape"], prepared["n_train"]) == (
        "npz",
        4,
        [1, 8, 8],
        160,
    )

    with open(repo / "models" / "example.py", "a") as handle:
        handle.write("\n# an edit of the user's model\n")
    status = dvc(repo, env, "status").stdout
    assert all(f"{stage}:" in status for stage in STAGES) and "prepare:" not in status, status
    again = dvc(repo, env, "repro", "train@mine")
    assert stages_run(again.stdout) == {"train@mine"}
    assert (
        "started afresh (discarded 3 checkpoint(s) made with another config, data or code)"
        in again.stdout + again.stderr
    )
