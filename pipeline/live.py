"""A training run's per-epoch metrics through DVCLive (:class:`EpochLog`).

DVCLive writes ``<folder>/metrics.json`` (the latest value of every metric, with ``step`` and ``epoch``) and one
``<folder>/plots/metrics/<name>.tsv`` per metric (a row per epoch). The train stage declares the first as its
``metrics`` and the second as its ``plots`` in ``dvc.yaml``, so ``dvc exp show`` shows the epoch and the metrics of
a running experiment (queued ones included: it reads their temporary copy) and ``dvc plots show`` draws the curves.
The step is the number of epochs completed (0: the initialisation), so a resumed run logs the same steps as an
uninterrupted one: its restored epochs are logged again first (DVC deletes the folder before the stage runs).

The Parquet tables stay the pipeline's record (``train_history.parquet``); this is their live view.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping

# DVCLive name (``/`` nests it in metrics.json and makes a folder of plots) -> column of an epoch row
EPOCH_METRICS: dict[str, str] = {
    "train/loss": "train_loss",
    "train/accuracy": "train_accuracy",
    "test/loss": "test_loss",
    "test/accuracy": "test_accuracy",
    "lr": "lr",
    "batch_loss": "batch_loss",
    "grad_norm": "grad_norm",
    "param_norm": "param_norm",
}


# Columns that are NaN at epoch 0 (the initialisation: no mini-batch yet): left out there, not logged as "nan"
NO_STEP_YET = ("batch_loss", "grad_norm")


def epoch_metrics(row: Mapping[str, object]) -> dict[str, float]:
    """The DVCLive metrics of one epoch row of ``train_history`` (:data:`EPOCH_METRICS`).

    A column the row lacks is left out, and so are the mini-batch means of epoch 0 (:data:`NO_STEP_YET`); any
    other non-finite value is kept (DVCLive writes it as ``"nan"``: that is how a diverged run shows).
    """
    found = {}
    for name, column in EPOCH_METRICS.items():
        value = row.get(column)
        if value is None or (column in NO_STEP_YET and math.isnan(float(value))):
            continue
        found[name] = float(value)
    return found


def epoch_rows(history: Iterable[Mapping[str, object]]) -> list[Mapping[str, object]]:
    """The epoch rows of a history (``scope == "epoch"``), by epoch."""
    return sorted((r for r in history if r.get("scope") == "epoch"), key=lambda r: int(r["epoch"]))


def _live(folder: Path):
    """DVCLive's ``Live`` writing ``folder``'s files only, without its DVC integration.

    That integration opens the DVC repository and asks git for the baseline revision, to save an experiment or
    write a ``dvc.yaml`` of its own, neither of which is wanted here: the stage's ``dvc.yaml`` entry declares the
    files, and ``dvc exp run`` saves the experiment. It also fails in a git repository without commits (dvclive
    3.49: ``scm.get_rev()`` raises ``SCMError: Empty git repo``, which its ``catch_and_warn(DvcException)`` lets
    through) and costs the stage a DVC repository open.
    """
    from dvclive import Live

    class FilesOnly(Live):
        def _init_dvc(self) -> None:
            pass

    return FilesOnly(str(folder), dvcyaml=False, save_dvc_exp=False, report=None)


class EpochLog:
    """DVCLive's ``Live`` on ``folder`` for one run (:func:`_live`): :meth:`log` an epoch row, :meth:`close` at the
    end."""

    def __init__(self, folder: str | Path, history: Iterable[Mapping[str, object]] = ()):
        self.folder = Path(folder)
        self.live = _live(self.folder)
        for row in epoch_rows(history):  # a resumed run: the epochs its checkpoints restored
            self.log(row)

    def log(self, row: Mapping[str, object]) -> None:
        """Log one epoch row at step = its epoch, and write ``metrics.json`` and the ``.tsv`` rows."""
        epoch = int(row["epoch"])
        self.live.step = epoch
        for name, value in epoch_metrics(row).items():
            self.live.log_metric(name, value)
        self.live.summary["epoch"] = epoch
        self.live.next_step()

    def close(self) -> None:
        """DVCLive's ``end``: the summary stays at the last logged step."""
        self.live.end()
