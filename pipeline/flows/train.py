"""The training flows: ``train`` and ``partner`` (one flow run per run).

Each flow's tasks are its units of work, one task per checkpoint interval, so the UI shows a task run per
checkpoint with its logs; a progress artifact and a terminal bar follow the epochs. (``prepare`` and ``metrics``
have modules of their own, so that editing training code reruns neither.)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import get_run_logger

from pipeline.config import Params, RunConfig
from pipeline.curvature.operators import BN_MODE
from pipeline.data import load_prepared
from pipeline.flows.chain import pipeline_flow
from pipeline.flows.common import Progress, table_artifact, unit_of_work
from pipeline.io import write_json
from pipeline.live import EpochLog
from pipeline.provenance import provenance
from pipeline.tables import SHARPNESS_HISTORY, TRAIN_HISTORY, write_table
from pipeline.training.trainer import Trainer


@unit_of_work
def train_until_checkpoint(trainer: Trainer, progress: Progress, live: EpochLog | None = None) -> dict:
    """Train epochs up to and including the next checkpoint (or the end); returns the last epoch row. Each epoch
    row also goes to DVCLive (``live``) as it is made."""
    logger = get_run_logger()
    while True:
        row = trainer.train_epoch()
        if live is not None:
            live.log(row)
        progress.advance(1, {"loss": f"{row['batch_loss']:.3f}", "test_acc": f"{row['test_accuracy']:.3f}"})
        logger.info(
            "epoch %d/%d: train loss %.4f acc %.4f | test loss %.4f acc %.4f | lr %.4g",
            row["epoch"],
            trainer.cfg.epochs,
            row["train_loss"],
            row["train_accuracy"],
            row["test_loss"],
            row["test_accuracy"],
            row["lr"],
        )
        if trainer.done or row["epoch"] % trainer.cfg.checkpoint_every == 0:
            return row


@unit_of_work
def write_train_outputs(
    trainer: Trainer, history_path: Path, metrics_path: Path, sharpness_path: Path | None = None
) -> dict:
    """Write the history tables (with provenance) and the run's headline metrics."""
    metadata = {"provenance": provenance(), "run": trainer.run.to_dict(), "data_fingerprint": trainer.data_fingerprint}
    write_table(trainer.state.history, history_path, TRAIN_HISTORY, metadata=metadata)
    if sharpness_path is not None:
        write_table(
            trainer.state.sharpness,
            sharpness_path,
            SHARPNESS_HISTORY,
            metadata={**metadata, "probe_size": len(trainer.data.probe_index), "bn_mode": BN_MODE},
        )
    summary = trainer.summary()
    write_json(metrics_path, summary)
    return summary


def _train(
    run: RunConfig,
    data_dir: Path,
    checkpoint_dir: Path,
    history_path: Path,
    metrics_path: Path,
    label: str,
    sharpness_path: Path | None = None,
    live_dir: Path | None = None,
) -> dict:
    logger = get_run_logger()
    trainer = Trainer(run, load_prepared(data_dir), checkpoint_dir)
    logger.info("%s: %s on %s, seed %d, %s", label, run.model_name, trainer.device, run.train.seed, trainer.start())
    live = EpochLog(live_dir, trainer.state.history) if live_dir is not None else None  # restored epochs first
    progress = Progress(run.train.epochs, trainer.state.epoch, f"{label}", "epoch")
    try:
        while not trainer.done:
            train_until_checkpoint.with_options(task_run_name=f"epochs-to-checkpoint-{trainer.state.epoch + 1}")(
                trainer, progress, live
            )
    finally:
        progress.close()
    if live is not None:
        live.close()
    summary = write_train_outputs(trainer, history_path, metrics_path, sharpness_path)
    if trainer.state.sharpness:
        logger.info(
            "%s: sharpness tracked at %d steps (%.1f s of %.1f s); last lambda_max %.4g, 2/lr %.4g",
            label,
            len(trainer.state.sharpness),
            summary["tracking_seconds"],
            summary["seconds"],
            trainer.state.sharpness[-1]["lambda_max"],
            trainer.state.sharpness[-1]["two_over_lr"],
        )
    if summary["status"] == "diverged":
        logger.warning(
            "%s diverged at step %s (non-finite loss); recorded, later stages report it",
            label,
            summary["diverged_step"],
        )
    table_artifact(
        [{"run": run.name, **summary}],
        key=label.lower().replace("_", "-").replace(" ", "-"),
        description=f"Headline numbers of {label}",
    )
    return summary


@pipeline_flow(name="train", flow_run_name="train-{run_name}")
def train_flow(
    params: Params,
    run_name: str,
    data_dir: Path,
    checkpoint_dir: Path,
    history_path: Path,
    metrics_path: Path,
    sharpness_path: Path | None = None,
    live_dir: Path | None = None,
) -> dict:
    """Train one run, resuming from ``checkpoint_dir`` when its checkpoints match the config, data and code; with
    ``live_dir``, every epoch also goes to DVCLive there (:class:`pipeline.live.EpochLog`)."""
    return _train(
        params.run(run_name),
        data_dir,
        checkpoint_dir,
        history_path,
        metrics_path,
        f"train {run_name}",
        sharpness_path,
        live_dir,
    )


def partner_run(params: Params, run_name: str) -> RunConfig:
    """Run ``run_name`` with its train seed shifted by ``landscape.partner_seed_offset``: the second model of the
    linear mode-connectivity path (same architecture, data and schedule; another initialisation and batch order).
    Sharpness tracking is off for the partner: it never changes the weights, and only the run itself is reported."""
    run = params.run(run_name)
    seed = run.train.seed + params.landscape.partner_seed_offset
    return dataclasses.replace(run, train=dataclasses.replace(run.train, seed=seed, track_sharpness_every=0))


@pipeline_flow(name="partner", flow_run_name="partner-{run_name}")
def partner_flow(
    params: Params, run_name: str, data_dir: Path, checkpoint_dir: Path, history_path: Path, metrics_path: Path
) -> dict:
    """Train the mode-connectivity partner of run ``run_name`` (see :func:`partner_run`), resuming like ``train``."""
    return _train(
        partner_run(params, run_name), data_dir, checkpoint_dir, history_path, metrics_path, f"partner {run_name}"
    )
