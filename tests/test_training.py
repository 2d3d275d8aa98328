import math
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_params

from pipeline.config import TrainConfig
from pipeline.tables import TRAIN_HISTORY, read_metadata, write_table
from pipeline.training.checkpoints import list_checkpoints, load_checkpoint
from pipeline.training.steps import learning_rate
from pipeline.training.trainer import Trainer, train


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _without_seconds(history) -> pd.DataFrame:
    return pd.DataFrame(history).drop(columns="seconds")


def test_digits_mlp_reaches_90_percent_in_five_epochs(digits_data, tmp_path):
    run = make_params(train={"epochs": 5}).run("mlp")
    trainer = train(run, digits_data, tmp_path / "ckpt")
    summary = trainer.summary()
    assert summary["status"] == "completed"
    assert summary["test_accuracy"] >= 0.90
    assert summary["epochs"] == 5 and summary["steps"] == 5 * math.ceil(1347 / 64)


def test_checkpoints_at_init_every_k_epochs_and_final(synthetic_data, tmp_path):
    run = make_params(train={"epochs": 7, "checkpoint_every": 3}).run("mlp")
    train(run, synthetic_data, tmp_path)
    rows = list_checkpoints(tmp_path)
    assert [(r["epoch"], r["tag"]) for r in rows] == [(0, "init"), (3, "periodic"), (6, "periodic"), (7, "final")]
    payload = torch.load(tmp_path / "epoch_0007.pt", weights_only=True)  # no pickled code needed
    assert payload["config"]["train"]["epochs"] == 7
    assert payload["status"] == "completed"
    assert {"git_revision", "torch", "code_fingerprint"} <= payload["provenance"].keys()
    assert (tmp_path / "manifest.json").is_file()


def test_resume_after_an_interruption_is_bitwise_identical(synthetic_data, tmp_path):
    run = make_params(
        runs={"r": {"model": "resnet20", "epochs": 4, "checkpoint_every": 1, "batch_size": 32, "log_every": 3}}
    ).run("r")
    reference = train(run, synthetic_data, tmp_path / "reference")

    class Interrupt(Exception):
        pass

    def stop_mid_epoch_3(step):
        if step == 2 * reference.steps_per_epoch + 2:
            raise Interrupt

    interrupted = Trainer(run, synthetic_data, tmp_path / "resumed")
    interrupted.start()
    with pytest.raises(Interrupt):
        while not interrupted.done:
            interrupted.train_epoch(on_step=stop_mid_epoch_3)
    resumed = Trainer(run, synthetic_data, tmp_path / "resumed")
    assert resumed.start().startswith("resumed from epoch_0002.pt")
    while not resumed.done:
        resumed.train_epoch()
    assert _state_equal(resumed.model.state_dict(), reference.model.state_dict())  # BatchNorm buffers too
    assert _state_equal(resumed.optimizer.state_dict()["state"][0], reference.optimizer.state_dict()["state"][0])
    pd.testing.assert_frame_equal(_without_seconds(resumed.state.history), _without_seconds(reference.state.history))


KILL_SCRIPT = """
import sys
from conftest import make_params
from pipeline.config import DataConfig
from pipeline.data import prepare_dataset
from pipeline.training.trainer import train
data = prepare_dataset(DataConfig(dataset="synthetic", synthetic_samples=240, probe_size=32))
run = make_params(runs={"r": {"model": "resnet20", "epochs": 8, "checkpoint_every": 1, "batch_size": 16}}).run("r")
train(run, data, sys.argv[1])
"""


def test_resume_after_sigkill_matches_an_uninterrupted_process(tmp_path):
    script = tmp_path / "train_script.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}
    subprocess.run([sys.executable, script, tmp_path / "reference"], check=True, env=env)

    victim = subprocess.Popen([sys.executable, script, tmp_path / "killed"], env=env)
    deadline = time.monotonic() + 120
    while not (tmp_path / "killed" / "epoch_0002.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL  # really interrupted, not finished
    assert not (tmp_path / "killed" / "epoch_0008.pt").exists()
    subprocess.run([sys.executable, script, tmp_path / "killed"], check=True, env=env)

    final_ref = load_checkpoint(tmp_path / "reference" / "epoch_0008.pt")
    final_resumed = load_checkpoint(tmp_path / "killed" / "epoch_0008.pt")
    assert _state_equal(final_resumed["model"], final_ref["model"])
    assert final_resumed["status"] == "completed"


def test_checkpoints_of_another_config_are_discarded(synthetic_data, tmp_path):
    train(make_params(train={"epochs": 2}).run("mlp"), synthetic_data, tmp_path)
    other = Trainer(make_params(train={"epochs": 2, "lr": 0.01}).run("mlp"), synthetic_data, tmp_path)
    assert "discarded" in other.start()
    assert [r["epoch"] for r in list_checkpoints(tmp_path)] == [0]
    assert other.state.epoch == 0


def test_a_completed_run_is_not_trained_again(synthetic_data, tmp_path):
    run = make_params(train={"epochs": 2}).run("mlp")
    first = train(run, synthetic_data, tmp_path)
    again = Trainer(run, synthetic_data, tmp_path)
    assert "status completed" in again.start() and again.done
    assert _state_equal(again.model.state_dict(), first.model.state_dict())


def test_non_finite_loss_is_recorded_as_diverged(synthetic_data, tmp_path):
    run = make_params(train={"epochs": 5, "lr": 1e6, "momentum": 0.0, "schedule": "constant", "weight_decay": 0.0}).run(
        "mlp"
    )
    trainer = train(run, synthetic_data, tmp_path)
    summary = trainer.summary()
    assert summary["status"] == "diverged"
    assert isinstance(summary["diverged_step"], int) and summary["diverged_step"] < 5 * trainer.steps_per_epoch
    assert list_checkpoints(tmp_path)[-1]["tag"] == "final"
    assert list_checkpoints(tmp_path)[-1]["status"] == "diverged"


def test_learning_rate_schedules_follow_their_closed_forms():
    cosine = TrainConfig(lr=0.2, epochs=4, schedule="cosine")
    assert learning_rate(cosine, 0, 10) == pytest.approx(0.2)
    assert learning_rate(cosine, 20, 10) == pytest.approx(0.1)  # half way: cos(pi/2) = 0
    assert learning_rate(cosine, 30, 10) == pytest.approx(0.1 * (1 + math.cos(0.75 * math.pi)))
    step = TrainConfig(lr=0.1, schedule="step", milestones=(2, 3), gamma=0.5)
    assert [learning_rate(step, s, 10) for s in (0, 19, 20, 29, 30)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    assert learning_rate(TrainConfig(lr=0.3, schedule="constant"), 999, 10) == 0.3


def test_adam_and_nesterov_runs_train(synthetic_data, tmp_path):
    for i, overrides in enumerate([{"optimizer": "adam", "lr": 1e-3}, {"nesterov": True}]):
        trainer = train(make_params(train={"epochs": 2, **overrides}).run("mlp"), synthetic_data, tmp_path / str(i))
        history = [r for r in trainer.state.history if r["scope"] == "epoch"]
        assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_history_table_has_the_declared_schema_and_provenance(synthetic_data, tmp_path):
    trainer = train(make_params(train={"epochs": 2, "log_every": 2}).run("mlp"), synthetic_data, tmp_path / "c")
    path = tmp_path / "train_history.parquet"
    write_table(trainer.state.history, path, TRAIN_HISTORY, metadata={"run": trainer.run.to_dict()})
    table = pq.read_table(path)
    assert table.schema.remove_metadata() == TRAIN_HISTORY
    frame = table.to_pandas()
    epochs = frame[frame.scope == "epoch"]
    assert list(epochs.epoch) == [0, 1, 2]
    assert (frame.scope == "step").sum() == trainer.state.step // 2
    assert epochs.test_accuracy.between(0, 1).all()
    assert read_metadata(path)["run"]["train"]["log_every"] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_requesting_an_absent_accelerator_is_a_config_error():
    from pipeline.config import ConfigError, resolve_device

    assert resolve_device("auto") == "cpu"
    with pytest.raises(ConfigError, match=r"^train.device: 'cuda' requested but no CUDA device is available"):
        resolve_device("cuda")


def test_checkpoints_of_other_training_code_are_discarded(synthetic_data, tmp_path, monkeypatch):
    run = make_params(train={"epochs": 1}).run("mlp")
    train(run, synthetic_data, tmp_path)
    monkeypatch.setattr("pipeline.training.checkpoints.code_fingerprint", lambda: "edited training code")
    assert "discarded" in Trainer(run, synthetic_data, tmp_path).start()
