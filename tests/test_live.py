"""DVCLive's view of a training run (:mod:`pipeline.live`): exactly the epoch rows' values, a step per epoch, and a
resumed run's files the same as an uninterrupted run's."""

import csv
import json
import math

from pipeline.live import EPOCH_METRICS, EpochLog, epoch_metrics, epoch_rows


def _row(epoch: int, **extra) -> dict:
    values = {
        "scope": "epoch",
        "epoch": epoch,
        "train_loss": 2.0 / (epoch + 1),
        "train_accuracy": 0.1 * epoch,
        "test_loss": 2.5 / (epoch + 1),
        "test_accuracy": 0.09 * epoch,
        "lr": 0.05,
        "batch_loss": 2.2 / epoch if epoch else math.nan,  # (epoch 0 is the initialisation: no mini-batch yet)
        "grad_norm": 1.0 + epoch if epoch else math.nan,
        "param_norm": 10.0 + epoch,
    }
    return {**values, **extra}


def _tsv(path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle, delimiter="\t"))


def test_epoch_metrics_are_the_row_values_leaving_out_what_epoch_0_cannot_have():
    assert epoch_metrics(_row(3)) == {name: _row(3)[column] for name, column in EPOCH_METRICS.items()}
    first = epoch_metrics(_row(0))
    assert "batch_loss" not in first and "grad_norm" not in first and first["train/loss"] == 2.0
    diverged = epoch_metrics(_row(4, train_loss=math.inf, test_loss=math.nan))  # kept: that is how divergence shows
    assert diverged["train/loss"] == math.inf and math.isnan(diverged["test/loss"])
    assert epoch_metrics({"epoch": 1, "lr": 0.1}) == {"lr": 0.1}  # a column the row lacks is left out
    rows = [_row(2), {"scope": "step", "epoch": 1}, _row(0), _row(1)]
    assert [r["epoch"] for r in epoch_rows(rows)] == [0, 1, 2]


def test_the_files_hold_every_epoch_at_its_step_and_the_summary_the_last(tmp_path):
    log = EpochLog(tmp_path / "live")
    for epoch in range(4):
        log.log(_row(epoch))
    log.close()
    summary = json.loads((tmp_path / "live/metrics.json").read_text())
    assert summary["step"] == summary["epoch"] == 3
    assert summary["train"]["loss"] == 0.5 and summary["test"]["accuracy"] == 0.27 and summary["grad_norm"] == 4.0
    assert _tsv(tmp_path / "live/plots/metrics/train/loss.tsv") == [
        ["step", "loss"],
        *[[str(e), repr(2.0 / (e + 1))] for e in range(4)],
    ]
    assert [r[0] for r in _tsv(tmp_path / "live/plots/metrics/batch_loss.tsv")] == ["step", "1", "2", "3"]
    names = {p.relative_to(tmp_path / "live/plots/metrics").as_posix() for p in tmp_path.glob("live/plots/**/*.tsv")}
    assert names == {f"{name}.tsv" for name in EPOCH_METRICS}
    assert not (tmp_path / "live/dvc.yaml").exists()  # the stage's dvc.yaml entry declares the files


def test_a_resumed_run_writes_what_an_uninterrupted_one_does(tmp_path):
    rows = [_row(e) for e in range(6)]
    whole = EpochLog(tmp_path / "whole")
    for row in rows:
        whole.log(row)
    whole.close()
    resumed = EpochLog(tmp_path / "resumed", rows[:4])  # its checkpoint restored epochs 0-3 (DVC emptied the folder)
    for row in rows[4:]:
        resumed.log(row)
    resumed.close()
    for path in sorted((tmp_path / "whole").rglob("*.*")):
        twin = tmp_path / "resumed" / path.relative_to(tmp_path / "whole")
        assert twin.read_text() == path.read_text(), path


def test_it_logs_in_a_dvc_repository_whose_git_has_no_commit_yet(tmp_path, monkeypatch):
    """A fresh `git init` + `dvc init`, as a new project (and the tests' copies) start: DVCLive's own DVC
    integration asked git for a revision there and failed (dvclive 3.49: SCMError 'Empty git repo')."""
    import subprocess
    import sys
    from pathlib import Path

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # as under dvc repro
    log = EpochLog("live")
    log.log(_row(0))
    log.close()
    assert json.loads((tmp_path / "live/metrics.json").read_text())["step"] == 0
    assert not (tmp_path / "live/dvc.yaml").exists() and not (tmp_path / "dvc.yaml").exists()
