"""The ``hessian`` stage flow: one Prefect task per checkpoint, then tables, eigenvectors, figures and metrics."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import torch
from prefect import get_run_logger

from pipeline.config import HessianConfig, Params, resolve_device
from pipeline.curvature.analysis import BN_MODE, analyse, eigen_settings
from pipeline.curvature.figures import plot_density, plot_sharpness, plot_spectrum
from pipeline.curvature.operators import ProbeSet
from pipeline.data import PreparedData, load_prepared
from pipeline.flows.chain import pipeline_flow
from pipeline.flows.common import Progress, table_artifact, unit_of_work
from pipeline.io import save_torch, write_json
from pipeline.metrics import hessian_headline
from pipeline.provenance import provenance
from pipeline.tables import ARTIFACT_FORMAT, EIGENVECTORS, HESSIAN_DENSITY, HESSIAN_SPECTRUM, write_table
from pipeline.training.checkpoints import (
    expected_fingerprint,
    load_verified,
    model_from_checkpoint,
    next_learning_rate,
    parameters_finite,
    require_checkpoints,
    select_checkpoints,
)


@unit_of_work
def analyse_checkpoint(
    checkpoint_dir: Path,
    entry: dict,
    run_name: str,
    data: PreparedData,
    data_fingerprint: str,
    cfg: HessianConfig,
    details: bool,
) -> dict:
    """Curvature at one checkpoint (``entry`` of :func:`~pipeline.training.checkpoints.verified_checkpoints`, its bytes
    checked again as they are read): rows for both tables and, for the caller, the top eigenvectors."""
    logger = get_run_logger()
    path = Path(checkpoint_dir) / entry["file"]
    payload = load_verified(checkpoint_dir, entry, run_name)
    meta = {
        "run": payload["config"]["name"],
        "checkpoint": path.name,
        "epoch": payload["epoch"],
        "step": payload["step"],
        "lr": next_learning_rate(payload, len(data.y_train)),
    }
    model = model_from_checkpoint(payload, data, data_fingerprint=data_fingerprint)
    if not parameters_finite(model):
        logger.warning("%s: non-finite weights (run %s); no curvature computed", path.name, payload["status"])
        return {"meta": meta, "rows": [], "density": [], "skipped": True, "train": payload["config"]["train"]}
    device = torch.device(resolve_device(cfg.device, "hessian.device"))
    model = model.to(device=device, dtype=getattr(torch, cfg.dtype))
    x, y = data.probe_tensors()
    probe = ProbeSet.from_tensors(x, y, cfg.batch_size)
    report = analyse(
        model,
        probe,
        cfg,
        details=details,
        on_step=lambda m: logger.info("epoch %d %s", meta["epoch"], m),
        loss=payload["config"]["train"].get("loss", "cross_entropy"),
    )
    rows = [{**meta, **row, "bn_mode": BN_MODE} for row in report.rows]
    density = [
        {"run": meta["run"], "checkpoint": meta["checkpoint"], "epoch": meta["epoch"], **row} for row in report.density
    ]
    logger.info("%s: %d curvature products in total", path.name, report.hvps)
    return {
        "meta": meta,
        "rows": rows,
        "density": density,
        "skipped": False,
        "train": payload["config"]["train"],
        "eigenvalues": report.eigenvalues,
        "eigenvectors": report.eigenvectors,
    }


@pipeline_flow(name="hessian", flow_run_name="hessian-{run_name}")
def hessian_flow(
    params: Params,
    run_name: str,
    data_dir: Path,
    checkpoint_dir: Path,
    tables_dir: Path,
    vectors_dir: Path,
    figures_dir: Path,
) -> dict:
    """Curvature of run ``run_name`` at the checkpoints chosen by ``params.hessian``."""
    logger = get_run_logger()
    cfg = params.hessian
    data = load_prepared(data_dir)
    data_fingerprint = data.fingerprint()  # hashes every tensor: once per flow, not per checkpoint
    entries = require_checkpoints(
        checkpoint_dir, run_name, expected_fingerprint=expected_fingerprint(params, run_name, data_fingerprint)
    )
    eigen_at = select_checkpoints(entries, cfg.checkpoints)
    detail_files = {e["file"] for e in select_checkpoints(entries, cfg.details)}
    chosen = sorted(
        {e["file"]: e for e in [*eigen_at, *select_checkpoints(entries, cfg.details)]}.values(),
        key=lambda e: e["epoch"],
    )
    logger.info(
        "%s: %d of %d checkpoints (details at %s); probe %d samples; %s on %s, %s, BatchNorm %s",
        run_name,
        len(chosen),
        len(entries),
        ", ".join(sorted(detail_files)),
        len(data.probe_index),
        cfg.method,
        resolve_device(cfg.device, "hessian.device"),
        cfg.hvp,
        BN_MODE,
    )
    progress = Progress(len(chosen), 0, f"hessian {run_name}", "checkpoint")
    results = []
    try:
        for entry in chosen:
            results.append(
                analyse_checkpoint.with_options(task_run_name=f"curvature-epoch-{entry['epoch']:04d}")(
                    Path(checkpoint_dir), entry, run_name, data, data_fingerprint, cfg, entry["file"] in detail_files
                )
            )
            progress.advance(1)
    finally:
        progress.close()

    spectrum = pd.DataFrame([row for r in results for row in r["rows"]], columns=HESSIAN_SPECTRUM.names)
    density = pd.DataFrame([row for r in results for row in r["density"]], columns=HESSIAN_DENSITY.names)
    metadata = {
        "provenance": provenance(),
        "hessian": dataclasses.asdict(cfg),
        "bn_mode": BN_MODE,
        "probe_size": len(data.probe_index),
        "data_fingerprint": data_fingerprint,
    }
    tables_dir, figures_dir = Path(tables_dir), Path(figures_dir)
    write_table(spectrum, tables_dir / "hessian_spectrum.parquet", HESSIAN_SPECTRUM, metadata)
    write_table(density, tables_dir / "hessian_density.parquet", HESSIAN_DENSITY, metadata)

    final = next((r for r in reversed(results) if not r["skipped"] and r.get("eigenvectors") is not None), None)
    if final is not None:
        save_torch(
            Path(vectors_dir) / EIGENVECTORS,
            {
                "format": ARTIFACT_FORMAT,
                "run": run_name,
                "checkpoint": final["meta"]["checkpoint"],
                "epoch": final["meta"]["epoch"],
                "operator": "hessian",
                "bn_mode": BN_MODE,
                "eigenvalues": final["eigenvalues"],
                "vectors": final["eigenvectors"],
                "hessian": eigen_settings(cfg),
            },
        )
    train_cfg = results[-1]["train"]  # the newest checkpoint is always analysed (every selection includes it)
    summary = hessian_headline(spectrum, float(train_cfg["lr"]))
    write_json(tables_dir / "hessian_metrics.json", summary)

    momentum = float(train_cfg["momentum"]) if train_cfg["optimizer"] == "sgd" else 0.0
    plot_sharpness(spectrum, figures_dir / "hessian_sharpness.png", run=run_name, momentum=momentum)
    plot_spectrum(spectrum, figures_dir / "hessian_spectrum.png", run=run_name)
    plot_density(density, figures_dir / "hessian_density.png", run=run_name)
    logger.info(
        "%s: lambda_max %s, lambda_min %s, trace (Hutch++) %s ± %s",
        run_name,
        summary.get("lambda_max"),
        summary.get("lambda_min"),
        summary.get("trace_hutchpp"),
        summary.get("trace_hutchpp_stderr"),
    )
    table_artifact(
        [{"run": run_name, **{k: v for k, v in summary.items() if k != "eigenvalues"}}],
        key=f"hessian-{run_name}".lower().replace("_", "-"),
        description=f"Curvature of run {run_name} at its last analysed checkpoint",
    )
    return summary
