"""The ``sweep`` flow: one Prefect task per grid point (train, then measure the final checkpoint), then one task that
writes the tables, the ``dvc metrics`` file, the summary and the figure, and a markdown artifact with the Kendall
table. Points run one after the other in this process (see :mod:`pipeline.sweep.grid`)."""

from __future__ import annotations

from pathlib import Path

import torch
from prefect import get_run_logger
from prefect.futures import as_completed

from pipeline.config import HessianConfig
from pipeline.curvature.operators import ProbeSet
from pipeline.data import PreparedData
from pipeline.flows.chain import pipeline_flow
from pipeline.flows.common import Progress, markdown_artifact, table_artifact, unit_of_work
from pipeline.sweep.cluster import ClusterError
from pipeline.sweep.grid import (
    SWEEP_MEASURES,
    Point,
    SweepParams,
    experiments,
    grid_points,
    load_result,
    make_probe,
    point_fingerprint,
    run_point,
    write_outputs,
)
from pipeline.sweep.stats import markdown_table, sweep_rows


@unit_of_work
def measure_point(
    point: Point,
    data: PreparedData,
    probe: ProbeSet,
    folder: Path,
    cfg: HessianConfig,
    data_fingerprint: str,
    threads: int = 0,
) -> dict:
    """Train one point (resuming from its checkpoints) and measure its final checkpoint, or reuse its result.

    ``threads``: torch's intra-op threads for the point (``repro.threads``; 0 leaves them), set here because on a
    Dask worker this is the first code of the project that runs."""
    logger = get_run_logger()
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    result = run_point(point, data, probe, folder, cfg, data_fingerprint=data_fingerprint, log=logger.info)
    train, hessian = result["metrics"]["train"], result["metrics"].get("hessian") or {}
    logger.info(
        "%s: %s; gap %s, test accuracy %s",
        point.name,
        train["status"],
        train.get("generalization_gap"),
        train.get("test_accuracy"),
    )
    measures = {
        k: hessian[k] for k in sorted(hessian) if not isinstance(hessian[k], list) and k not in ("epoch", "checkpoint")
    }
    if measures:
        logger.info(
            "%s: %s",
            point.name,
            ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in measures.items()),
        )
    return result


def _result(future, point: Point, cfg) -> dict:
    """A submitted point's result; a point whose workers kept dying is one line (its finished siblings are kept)."""
    try:
        return future.result()
    except Exception as err:
        if type(err).__name__ != "KilledWorker":
            raise
        raise ClusterError(
            f"sweep: point {point.name} was lost with {err.args[-1] if err.args else 'its worker'} and the workers "
            f"after it (Dask's allowed-failures); the other points are kept: run the sweep again "
            f"({cfg.scheduler or 'LocalCluster'})"
        ) from None


@unit_of_work(task_run_name="aggregate")
def aggregate(points: list[Point], results: dict[str, dict], params: SweepParams, out_dir: Path) -> dict:
    """Rows of every point, Kendall's tau per measure, the batch-size effect; every output file."""
    frame = sweep_rows(experiments(points, results, params.train))
    return write_outputs(frame, out_dir)


@pipeline_flow(name="sweep", flow_run_name="sweep-{params.data.dataset}")
def sweep_flow(params: SweepParams, data: PreparedData, points_dir: Path, out_dir: Path) -> dict:
    """Train and measure every point of ``params.grid`` under ``points_dir/<point>/`` (finished points with the same
    fingerprint are reused), then write the sweep's outputs to ``out_dir``."""
    logger = get_run_logger()
    points = grid_points(params)
    data_fingerprint = data.fingerprint()
    probe = make_probe(data, params.hessian)
    points_dir = Path(points_dir).resolve() if params.sweep.executor == "dask" else Path(points_dir)  # workers' cwd
    measured = {
        p.name
        for p in points
        if load_result(points_dir / p.name, point_fingerprint(p, params.hessian, data_fingerprint))
    }
    done = len(measured)
    logger.info(
        "sweep: %d points (%s x lr %s x batch size %s x seed %s), %d already measured; %s: %d train, %d test, probe %d",
        len(points),
        "/".join(params.grid.model),
        list(params.grid.lr),
        list(params.grid.batch_size),
        list(params.grid.seed),
        done,
        data.name,
        len(data.y_train),
        len(data.y_test),
        len(data.probe_index),
    )
    progress = Progress(len(points), 0, "sweep", "point")
    threads = params.repro.threads
    results: dict[str, dict] = {}

    def task(point: Point):
        return measure_point.with_options(task_run_name=point.name)

    def arguments(point: Point) -> tuple:
        return (point, data, probe, points_dir / point.name, params.hessian, data_fingerprint, threads)

    try:
        if params.sweep.executor != "dask":
            for point in points:
                results[point.name] = task(point)(*arguments(point))
                progress.advance(1, {"last": point.name})
        else:
            for point in (p for p in points if p.name in measured):  # read here; the others go to the cluster
                results[point.name] = task(point)(*arguments(point))
                progress.advance(1, {"last": point.name})
            futures = {task(point).submit(*arguments(point)): point for point in points if point.name not in measured}
            for future in as_completed(list(futures)):
                point = futures[future]
                results[point.name] = _result(future, point, params.sweep)
                progress.advance(1, {"last": point.name})
    finally:
        progress.close()
    results = {p.name: results[p.name] for p in points}  # grid order, whatever order the cluster finished in

    outputs = aggregate(points, results, params, Path(out_dir))
    kendall, summary = outputs["kendall"], outputs["metrics"]
    diverged = [name for name, r in results.items() if r["metrics"]["train"]["status"] == "diverged"]
    if diverged:
        logger.warning(
            "%d point(s) diverged (recorded, left out of the correlations): %s", len(diverged), ", ".join(diverged)
        )
    markdown_artifact(
        markdown=f"# Flatness sweep\n\n{summary['n_completed']} of {summary['n_points']} points completed. Kendall's "
        f"τ-b against the generalisation gap:\n\n{markdown_table(kendall)}\n\nFull summary: "
        f"`{Path(out_dir) / 'README.md'}`",
        key="sweep-kendall",
        description="Do flatter minima generalise better? Kendall's tau per measure",
    )
    table_artifact(
        [{k: v for k, v in row.items()} for row in kendall.to_dict("records")],
        key="sweep-kendall-table",
        description="Kendall's tau of each measure against the gap",
    )
    for row in kendall.to_dict("records"):
        if row["measure"] in SWEEP_MEASURES:
            logger.info(
                "%s: tau %.3f, p %.3g, n %d: %s", row["measure"], row["tau"], row["p_value"], row["n"], row["verdict"]
            )
    logger.info("sweep: wrote %s", ", ".join(str(p) for p in outputs["files"]))
    return summary
