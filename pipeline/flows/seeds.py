"""The ``seeds`` flow: one run's seed replicates, one task per seed (train it when it is not another stage's model,
then measure its final checkpoint), their table and their intervals (:mod:`pipeline.sweep.seeds`)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from prefect import get_run_logger

from pipeline.config import Params, resolve_device
from pipeline.curvature.analysis import BN_MODE
from pipeline.curvature.operators import ProbeSet
from pipeline.data import PreparedData, load_prepared
from pipeline.flows.chain import pipeline_flow
from pipeline.flows.common import Progress, table_artifact, unit_of_work
from pipeline.io import write_json
from pipeline.metrics import summarise
from pipeline.provenance import provenance
from pipeline.sweep.seeds import measure_config, measure_replica, replica_run, replica_source, seed_row
from pipeline.tables import SEEDS, write_table
from pipeline.training.checkpoints import (
    load_verified,
    model_from_checkpoint,
    parameters_finite,
    run_fingerprint,
    verified_checkpoints,
)
from pipeline.training.trainer import train


@unit_of_work
def measure_seed(
    params: Params, run_name: str, k: int, data: PreparedData, data_fingerprint: str, folders: dict[str, Path]
) -> dict:
    """Seed ``k`` of ``run_name``: its final checkpoint (trained here, resumably, unless it is the run's or the
    partner's), verified against its manifest and measured with :func:`pipeline.sweep.seeds.measure_config`."""
    logger = get_run_logger()
    run, source = replica_run(params, run_name, k), replica_source(params, k)
    folder = folders[source] if source != "seeds" else folders["seeds"] / f"seed_{k}"
    if source == "seeds":
        trainer = train(run, data, folder)
        logger.info(
            "seed %d (train.seed %d): trained to epoch %d, %s",
            k,
            run.train.seed,
            trainer.state.epoch,
            trainer.state.status,
        )
    entries = verified_checkpoints(folder, run_name, run_fingerprint(run, data_fingerprint), stage=source)
    payload = load_verified(folder, entries[-1], run_name, stage=source)
    model = model_from_checkpoint(payload, data, data_fingerprint=data_fingerprint)
    if payload["status"] != "completed" or not parameters_finite(model):
        logger.warning("seed %d: %s; no curvature measured", k, payload["status"])
        return seed_row(run_name, k, run.train.seed, source, payload, None)
    cfg = measure_config(params.hessian)
    device = torch.device(resolve_device(cfg.device, "hessian.device"))
    model = model.to(device=device, dtype=getattr(torch, cfg.dtype))
    probe = ProbeSet.from_tensors(*data.probe_tensors(), cfg.batch_size)
    started = time.perf_counter()
    headline = measure_replica(
        model, probe, cfg, run, payload, entries[-1]["file"], on_step=lambda m: logger.info("seed %d: %s", k, m)
    )
    row = seed_row(run_name, k, run.train.seed, source, payload, headline)
    row["seconds"] = time.perf_counter() - started
    logger.info(
        "seed %d (train.seed %d, %s): test acc %.4f, lambda_max %.4g, trace %.4g",
        k,
        run.train.seed,
        source,
        row["test_accuracy"],
        row["lambda_max"],
        row["trace_hutchinson"],
    )
    return row


@pipeline_flow(name="seeds", flow_run_name="seeds-{run_name}")
def seeds_flow(
    params: Params,
    run_name: str,
    data_dir: Path,
    checkpoint_dir: Path,
    partner_dir: Path,
    seeds_dir: Path,
    tables_dir: Path,
) -> dict:
    """``repro.seeds`` replicates of ``run_name``: ``<tables_dir>/seeds.parquet`` and ``seeds_metrics.json``."""
    logger = get_run_logger()
    data = load_prepared(data_dir)
    fingerprint = data.fingerprint()
    folders = {"train": Path(checkpoint_dir), "partner": Path(partner_dir), "seeds": Path(seeds_dir)}
    # The stage's output even when it trains no seed of its own (repro.seeds 1 or 2: the run and its partner only);
    # DVC fails a stage whose output does not exist.
    folders["seeds"].mkdir(parents=True, exist_ok=True)
    n = params.repro.seeds
    progress = Progress(n, 0, f"seeds {run_name}", "seed")
    rows = []
    try:
        for k in range(n):
            rows.append(
                measure_seed.with_options(task_run_name=f"seed-{k}")(params, run_name, k, data, fingerprint, folders)
            )
            progress.advance(1)
    finally:
        progress.close()
    write_table(
        rows,
        Path(tables_dir) / "seeds.parquet",
        SEEDS,
        metadata={
            "provenance": provenance(),
            "hessian": dataclasses.asdict(measure_config(params.hessian)),
            "bn_mode": BN_MODE,
            "data_fingerprint": fingerprint,
        },
    )
    summary = summarise(rows)
    write_json(Path(tables_dir) / "seeds_metrics.json", summary)
    for measure in ("test_accuracy", "lambda_max", "trace_hutchinson"):
        i = summary[measure]
        if i["half_width"] is not None:
            logger.info("%s over %d seeds: %.4g ± %.2g (95%%)", measure, i["n"], i["mean"], i["half_width"])
    table_artifact(
        rows, key=f"seeds-{run_name.lower().replace('_', '-')}", description=f"Seed replicates of {run_name}"
    )
    return summary
