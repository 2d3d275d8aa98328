"""The ``metrics`` flow: every run's headline numbers in one ``reports/metrics.json``."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger

from pipeline.config import Params
from pipeline.flows.common import table_artifact, unit_of_work
from pipeline.io import write_json
from pipeline.seeds import comparisons


@unit_of_work
def collect_metrics(tables_dir: Path) -> dict:
    """``{run: {stage: metrics}}`` from every ``<tables_dir>/<run>/<stage>_metrics.json`` (train, hessian, ...)."""
    collected: dict[str, dict] = {}
    for path in sorted(Path(tables_dir).glob("*/*_metrics.json")):
        stage = path.name[: -len("_metrics.json")]
        collected.setdefault(path.parent.name, {})[stage] = json.loads(path.read_text())
    return {run: m for run, m in collected.items() if "train" in m}


@flow(name="metrics", flow_run_name="metrics")
def metrics_flow(params: Params, tables_dir: Path, out_path: Path) -> dict:
    """Gather the headline numbers of the configured runs into one ``metrics.json`` (for ``dvc metrics diff``)."""
    collected = collect_metrics(tables_dir)
    metrics = {run.name: collected[run.name] for run in params.runs if run.name in collected}
    missing = [run.name for run in params.runs if run.name not in collected]
    if missing:
        get_run_logger().warning("no metrics yet for runs: %s", ", ".join(missing))
    seeded = {name: m["seeds"] for name, m in metrics.items() if "seeds" in m}
    rows = [{"run": name, **m["train"], **{f"hessian.{k}": v for k, v in m.get("hessian", {}).items()
                                           if not isinstance(v, list)}} for name, m in metrics.items()]
    if len(seeded) >= 2:  # every pair of runs: ratio of means, and whether their intervals over seeds separate
        metrics["comparisons"] = comparisons(seeded)
    write_json(out_path, metrics)
    table_artifact(rows, key="metrics", description="Headline numbers of all runs")
    return metrics
