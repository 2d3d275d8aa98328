"""The ``metrics`` flow: every run's headline numbers in one ``reports/metrics.json`` (:mod:`pipeline.metrics`)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger

from pipeline.config import Params
from pipeline.flows.chain import pipeline_flow
from pipeline.flows.common import table_artifact, unit_of_work
from pipeline.io import write_json
from pipeline.metrics import collect, metrics_json


@unit_of_work
def collect_metrics(tables_dir: Path) -> dict:
    """``{run: {stage: metrics}}`` from every ``<tables_dir>/<run>/<stage>_metrics.json``."""
    return collect(tables_dir)


@pipeline_flow(name="metrics", flow_run_name="metrics")
def metrics_flow(params: Params, tables_dir: Path, out_path: Path) -> dict:
    """Gather the headline numbers of the configured runs into one ``metrics.json`` (for ``dvc metrics diff``)."""
    metrics, missing = metrics_json(collect_metrics(tables_dir), [run.name for run in params.runs])
    if missing:
        get_run_logger().warning("no metrics yet for runs: %s", ", ".join(missing))
    rows = [
        {
            "run": name,
            **m["train"],
            **{f"hessian.{k}": v for k, v in m.get("hessian", {}).items() if not isinstance(v, list)},
        }
        for name, m in metrics.items()
        if name != "comparisons"
    ]
    write_json(out_path, metrics)
    table_artifact(rows, key="metrics", description="Headline numbers of all runs")
    return metrics
