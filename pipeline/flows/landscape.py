"""The scan stage flows, ``interpolate`` (1-D lines and paths) and ``surface`` (2-D plane): one Prefect task per tile
of grid points, finished tiles kept on disk, on this process or on a Dask cluster (prefect-dask)."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from prefect import get_run_logger
from prefect.futures import as_completed

from pipeline.config import LandscapeConfig, Params, resolve_device
from pipeline.curvature.operators import ProbeSet
from pipeline.data import DataError, PreparedData, load_prepared
from pipeline.flows.chain import pipeline_flow
from pipeline.flows.cluster import local_cluster_threads
from pipeline.flows.common import Progress, table_artifact, unit_of_work
from pipeline.io import plot_placeholder, save_torch, write_json
from pipeline.landscape import tiles
from pipeline.landscape.connectivity import (
    STATISTICS_LABEL,
    Alignment,
    align_partner,
    connectivity_summary,
    has_batchnorm,
    statistics_path,
)
from pipeline.landscape.directions import direction_id
from pipeline.landscape.engine import choose_chunk, choose_layout
from pipeline.landscape.figures import plot_interpolation, plot_surface
from pipeline.landscape.measures import path_summary, surface_summary
from pipeline.landscape.permutation import permutation_spec
from pipeline.landscape.plan import curvature_at, curvature_coords, line_scans, plane_directions, state, surface_coords
from pipeline.landscape.tiles import Job, Tile, TileStore, scan_fingerprint
from pipeline.provenance import provenance
from pipeline.tables import (
    ALIGNED_PARTNER,
    ARTIFACT_FORMAT,
    EIGENVECTORS,
    INTERPOLATE_DIRECTIONS,
    INTERPOLATION_1D,
    SURFACE_2D,
    SURFACE_CURVATURE,
    SURFACE_DIRECTIONS,
    write_table,
)
from pipeline.training.checkpoints import (
    expected_fingerprint,
    load_verified,
    model_from_checkpoint,
    parameters_finite,
    require_checkpoints,
)

# --------------------------------------------------------------------------------------------------------------
# Executors
# --------------------------------------------------------------------------------------------------------------


def _loss(payload: dict) -> str:
    """The training loss of a checkpoint's run (checkpoints made before `train.loss` existed used cross-entropy)."""
    return payload["config"]["train"].get("loss", "cross_entropy")


@unit_of_work
def evaluate_tile(
    model,
    params,
    buffers,
    directions,
    buffer_directions,
    coords,
    x,
    y,
    tile: Tile,
    chunk: int,
    batch_size: int,
    channels_last: bool,
    threads: int | None,
    loss: str = "cross_entropy",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and accuracy at the rows of one tile (the unit of work of a scan: :func:`tiles.evaluate_tile`)."""
    if threads is not None:
        torch.set_num_threads(threads)
    return tiles.evaluate_tile(
        model,
        params,
        buffers,
        directions,
        coords,
        x,
        y,
        tile,
        batch_size=batch_size,
        chunk=chunk,
        buffer_directions=buffer_directions,
        loss=loss,
        channels_last=channels_last,
    )


def _on_dask(evaluate, pending):
    """:func:`tiles.run_tiles`'s executor on a Dask cluster: every tile submitted at once, taken as it finishes."""
    futures = {evaluate(job, tile, submit=True): (job, tile) for job, tile in pending}
    for future in as_completed(list(futures)):
        job, tile = futures[future]
        yield (job, tile, *future.result())


def run_jobs(jobs: Sequence[Job], cfg: LandscapeConfig, *, chunk: int, channels_last: bool, description: str) -> dict:
    """Evaluate every missing tile of ``jobs`` (one task each, through :func:`tiles.run_tiles`: finished tiles are
    saved as they arrive, so an interrupted scan resumes) and return ``{job name: (loss, accuracy)}``."""
    logger = get_run_logger()
    threads = local_cluster_threads(cfg)
    progress: list[Progress] = []
    points = 0

    def evaluate(job: Job, tile: Tile, submit: bool = False):
        task = evaluate_tile.with_options(task_run_name=f"{job.name}-tile-{tile.index:04d}")
        arguments = (
            job.model,
            job.params,
            job.buffers,
            job.directions,
            job.buffer_directions,
            job.coords,
            job.x,
            job.y,
            tile,
            chunk,
            cfg.batch_size,
            channels_last,
            threads,
            job.loss,
        )
        return task.submit(*arguments) if submit else task(*arguments)

    def on_start(found: int, total: int) -> None:
        if found:
            logger.info("%s: %d of %d tiles found on disk (resuming)", description, found, total)
        progress.append(Progress(total, found, description, "tile"))

    def on_tile(tile: Tile, done: int, total: int) -> None:
        nonlocal points
        points += len(tile)
        progress[0].advance(1)

    start = time.perf_counter()
    try:
        results = tiles.run_tiles(
            jobs,
            cfg.tile_size,
            evaluate,
            execute=_on_dask if cfg.executor == "dask" else tiles.in_order,
            on_start=on_start,
            on_tile=on_tile,
        )
    finally:
        if progress:
            progress[0].close()
    seconds = time.perf_counter() - start
    if points:
        logger.info(
            "%s: %d points in %.1f s (%.1f points/s, chunk %d%s, %s)",
            description,
            points,
            seconds,
            points / seconds,
            chunk,
            ", channels-last" if channels_last else "",
            f"dask {cfg.scheduler or f'LocalCluster x{cfg.workers}'}" if cfg.executor == "dask" else "local",
        )
    results["_timing"] = {"points": points, "seconds": seconds}
    return results


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------


def _final_model(
    checkpoint_dir: Path, params: Params, run_name: str, data: PreparedData, fingerprint: str, *, stage: str = "train"
):
    """The verified checkpoints of ``stage@run_name``, the newest's payload and its model (one-line DataError when
    a checkpoint is torn, foreign or not in the manifest)."""
    entries = require_checkpoints(
        checkpoint_dir,
        run_name,
        stage=stage,
        expected_fingerprint=expected_fingerprint(params, run_name, fingerprint, stage=stage),
    )
    payload = load_verified(checkpoint_dir, entries[-1], run_name, stage=stage)
    return entries, payload, model_from_checkpoint(payload, data, data_fingerprint=fingerprint)


@dataclasses.dataclass
class Inputs:
    """What both scan flows start from: the prepared data and the run's final checkpoint."""

    data: PreparedData
    fingerprint: str
    device: torch.device
    entries: list
    payload: dict
    final: torch.nn.Module

    @property
    def diverged(self) -> bool:
        return not parameters_finite(self.final)


def _inputs(params: Params, run_name: str, data_dir: Path, checkpoint_dir: Path) -> Inputs:
    data = load_prepared(data_dir)
    fingerprint = data.fingerprint()
    device = torch.device(resolve_device(params.landscape.device, "landscape.device"))
    entries, payload, final = _final_model(checkpoint_dir, params, run_name, data, fingerprint)
    return Inputs(data, fingerprint, device, entries, payload, final)


def _record_diverged(
    inputs: Inputs,
    run_name: str,
    tables: dict,
    metrics_path: Path,
    figures: list[Path],
    work_dir: Path,
    directions_path: Path,
) -> dict:
    """A run whose final weights are not finite has no landscape: empty tables, a status in the metrics, and
    figures that say so (every declared output exists, and ``dvc repro`` goes on with the other runs)."""
    message = f"diverged (status {inputs.payload['status']}): no finite final weights, no landscape"
    get_run_logger().warning("%s: %s", run_name, message)
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    save_torch(directions_path, {"format": ARTIFACT_FORMAT, "run": run_name, "status": "diverged", "directions": {}})
    for path, schema in tables.items():
        write_table(pd.DataFrame(columns=schema.names), path, schema, {"provenance": provenance()})
    for path in figures:
        plot_placeholder(path, run=run_name, message=message)
    metrics = {"status": "diverged"}
    write_json(metrics_path, metrics)
    return metrics


def _eigenvectors(vectors_dir: Path, run_name: str, final_payload: dict) -> dict:
    path = Path(vectors_dir) / EIGENVECTORS
    if not path.is_file():
        raise DataError(f"{path}: missing; run `dvc repro hessian@{run_name}` first")
    try:
        payload = torch.load(path, weights_only=True)
    except Exception:  # any reader error of a torn or foreign file: one line naming it, not a zip traceback
        raise DataError(f"{path}: unreadable (torn write?); rerun `dvc repro hessian@{run_name}`") from None
    if not isinstance(payload, dict) or "vectors" not in payload:
        raise DataError(f"{path}: not an eigenvector file; rerun `dvc repro hessian@{run_name}`")
    if payload.get("epoch") != final_payload["epoch"]:
        raise DataError(
            f"{path}: eigenvectors of epoch {payload.get('epoch')}, but the final checkpoint is epoch "
            f"{final_payload['epoch']}; run `dvc repro hessian@{run_name}`"
        )
    return payload


def _engine_choice(model, params, buffers, x, cfg: LandscapeConfig, work_dir: Path, key: str) -> tuple[int, bool]:
    """Chunk and convolution layout, measured once here so that every tile (on any worker) uses the same ones.

    The choice is kept in ``work_dir/engine.json`` beside the tiles, under ``key`` (the model, data and settings): a
    resumed scan reuses it, so its new tiles are computed exactly as the old ones were and the table comes out
    bitwise equal to an uninterrupted run's, whatever a new measurement would say.
    """
    path = Path(work_dir) / "engine.json"
    try:
        stored = json.loads(path.read_text())
        if stored.get("key") == key and cfg.chunk in (0, stored["chunk"]):
            return int(stored["chunk"]), bool(stored["channels_last"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    channels_last = choose_layout(model, params, buffers, x, batch_size=cfg.batch_size)
    chunk = cfg.chunk or choose_chunk(model, params, buffers, x, batch_size=cfg.batch_size)
    write_json(path, {"key": key, "chunk": chunk, "channels_last": channels_last})
    return chunk, channels_last


def _warn(logger):
    """A tile store's warning callback: one line in the flow's log (a torn tile, recomputed)."""
    return lambda message: logger.warning("%s", message)


# --------------------------------------------------------------------------------------------------------------
# interpolate
# --------------------------------------------------------------------------------------------------------------


def _number(value) -> str:
    """A barrier for the log: 4 significant digits, or "not finite" (a diverged partner)."""
    return "not finite" if value is None else f"{value:.4g}"


def _line_rows(run_name: str, scan, path: str, per_split: dict, statistics: str) -> list[dict]:
    """The table rows of one 1-D scan (``path`` may name a statistics variant of ``scan``)."""
    return [
        {
            "run": run_name,
            "path": path,
            "direction": scan.direction_id,
            "alpha": float(a),
            "distance": float(d),
            "split": split,
            "loss": float(v),
            "accuracy": float(c),
            "statistics": statistics,
        }
        for split, (loss, accuracy) in per_split.items()
        for a, d, v, c in zip(scan.alpha, scan.distance, loss, accuracy)
    ]


@unit_of_work(task_run_name="align-{run_name}")
def align_models(final, partner, cfg: LandscapeConfig, inputs, run_name: str) -> tuple[Alignment, float]:
    """The partner permuted to the run's unit order (``cfg.align``), and the seconds it took."""
    start = time.perf_counter()
    alignment = align_partner(
        final,
        partner,
        cfg.align,
        inputs,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        max_passes=cfg.align_passes,
        what=f"run {run_name}",
    )
    return alignment, time.perf_counter() - start


@unit_of_work(task_run_name="path-{mode}-{run_name}")
def statistics_variant(
    final, other, ts, mode: str, stats_inputs, tensors: dict, sites, cfg: LandscapeConfig, loss: str, run_name: str
) -> tuple[dict, float]:
    """The path from the run to ``other`` with the statistics of ``mode`` (reset | repair) at every point, on each
    split, and the seconds it took."""
    start = time.perf_counter()
    progress = Progress(len(ts), 0, f"{mode} path {run_name}", "point")
    try:
        result = statistics_path(
            final,
            other,
            ts,
            mode,
            stats_inputs,
            tensors,
            sites=sites,
            batch_size=cfg.batch_size,
            stats_batch_size=cfg.stats_batch_size,
            loss=loss,
            on_point=lambda i: progress.advance(),
        )
    finally:
        progress.close()
    return result, time.perf_counter() - start


def _alignment_payload(run_name: str, cfg: LandscapeConfig, alignment: Alignment | None, seconds: float, **extra):
    payload = {
        "format": ARTIFACT_FORMAT,
        "run": run_name,
        "method": cfg.align,
        "provenance": provenance(),
        **extra,
    }
    if alignment is not None:
        payload.update(
            alignment.match.payload(),
            groups=dict(alignment.spec.groups),
            output_change=alignment.output_change,
            seconds=seconds,
            state_dict={n: t.detach().cpu() for n, t in alignment.model.state_dict().items()},
        )
    return payload


@pipeline_flow(name="interpolate", flow_run_name="interpolate-{run_name}")
def interpolate_flow(
    params: Params,
    run_name: str,
    data_dir: Path,
    checkpoint_dir: Path,
    partner_dir: Path,
    vectors_dir: Path,
    tables_dir: Path,
    work_dir: Path,
    figures_dir: Path,
) -> dict:
    """1-D scans of run ``run_name`` around its final checkpoint: init -> final, a filter-normalised random
    direction, the top Hessian eigenvector, and the path to the run retrained from another seed (with its loss
    barrier), each on the splits of ``params.landscape.splits``."""
    logger = get_run_logger()
    cfg = params.landscape
    inputs = _inputs(params, run_name, data_dir, checkpoint_dir)
    if inputs.diverged:
        save_torch(
            Path(work_dir).parent / ALIGNED_PARTNER, _alignment_payload(run_name, cfg, None, 0.0, status="diverged")
        )
        return _record_diverged(
            inputs,
            run_name,
            {Path(tables_dir) / "interpolation_1d.parquet": INTERPOLATION_1D},
            Path(tables_dir) / "interpolate_metrics.json",
            [Path(figures_dir) / "interpolation_1d.png"],
            Path(work_dir),
            Path(work_dir).parent / INTERPOLATE_DIRECTIONS,
        )
    data, fingerprint, device = inputs.data, inputs.fingerprint, inputs.device
    entries, final_payload, final = inputs.entries, inputs.payload, inputs.final
    init = model_from_checkpoint(
        load_verified(checkpoint_dir, entries[0], run_name), data, data_fingerprint=fingerprint
    )
    _, partner_payload, partner = _final_model(partner_dir, params, run_name, data, fingerprint, stage="partner")
    eigen = _eigenvectors(vectors_dir, run_name, final_payload)
    final, init, partner = (m.to(device) for m in (final, init, partner))
    eigen = {**eigen, "vectors": {n: v.to(device) for n, v in eigen["vectors"].items()}}
    splits = {"train": data.train_tensors, "test": data.test_tensors}
    tensors = {name: tuple(t.to(device) for t in splits[name]()) for name in cfg.splits}
    alignment, align_seconds, partner_finite = None, 0.0, parameters_finite(partner)
    if cfg.align != "none" and partner_finite:
        alignment, align_seconds = align_models(final, partner, cfg, data.probe_tensors()[0].to(device), run_name)
        match = alignment.match
        logger.info(
            "%s: partner aligned by %s matching in %.2f s: %s; objective %.6g -> %.6g (%d pass(es))",
            run_name,
            cfg.align,
            align_seconds,
            alignment.spec.describe(),
            match.objective[0],
            match.objective[-1],
            match.passes,
        )
    elif cfg.align != "none":
        logger.warning("%s: the partner's weights are not finite; no alignment and no statistics variants", run_name)
    save_torch(
        Path(work_dir).parent / ALIGNED_PARTNER,
        _alignment_payload(
            run_name,
            cfg,
            alignment,
            align_seconds,
            status="aligned" if alignment else ("not aligned" if partner_finite else "partner diverged"),
            partner_checkpoint=str(partner_payload.get("epoch")),
        ),
    )
    scans = line_scans(
        final, cfg, init=init, eigenvectors=eigen, partner=partner, aligned=alignment.model if alignment else None
    )
    params_final, buffers_final = state(final)
    engine_key = scan_fingerprint(
        final=final_payload["fingerprint"],
        data=fingerprint,
        device=str(device),
        batch_size=cfg.batch_size,
        split=cfg.splits[0],
    )
    chunk, channels_last = _engine_choice(
        final, params_final, buffers_final, tensors[cfg.splits[0]][0], cfg, Path(work_dir), engine_key
    )
    logger.info(
        "%s: %d scans x %d splits; chunk %d, %s; partner trained with seed %d (test accuracy %.4f)",
        run_name,
        len(scans),
        len(cfg.splits),
        chunk,
        "channels-last" if channels_last else "default layout",
        partner_payload["config"]["train"]["seed"],
        next((r["test_accuracy"] for r in reversed(partner_payload["history"]) if r.get("scope") == "epoch"), math.nan),
    )
    weights_digest = scan_fingerprint(**params_final, **buffers_final)  # the weights themselves, not their config
    jobs = []
    for scan in scans:
        for split, (x, y) in tensors.items():
            key = scan_fingerprint(
                run=run_name,
                path=scan.path,
                direction=scan.direction_id,
                coords=scan.coords,
                split=split,
                data=fingerprint,
                final=final_payload["fingerprint"],
                weights=weights_digest,
                final_epoch=final_payload["epoch"],
                tile_size=cfg.tile_size,
                batch_size=cfg.batch_size,
                buffers=scan.buffer_direction is not None,
                other=scan_fingerprint(**scan.buffer_direction or {}) if scan.buffer_direction else None,
            )
            jobs.append(
                Job(
                    f"{scan.path}-{split}",
                    final,
                    params_final,
                    buffers_final,
                    [scan.direction],
                    [scan.buffer_direction] if scan.buffer_direction else None,
                    scan.coords,
                    x,
                    y,
                    TileStore(Path(work_dir) / f"{scan.path}_{split}", key, warn=_warn(logger)),
                    _loss(final_payload),
                )
            )
    results = run_jobs(jobs, cfg, chunk=chunk, channels_last=channels_last, description=f"interpolate {run_name}")

    has_buffers = any(b.is_floating_point() for b in buffers_final.values())
    moved = "interpolated" if has_buffers else "none"
    labels = {
        "init_final": moved,
        "random": "stored" if has_buffers else "none",
        "eigen": "stored" if has_buffers else "none",
    }
    rows, summary = [], {"splits": list(cfg.splits)}
    paths: dict[str, tuple] = {}  # the partner paths: name -> (scan, {split: (loss, accuracy)}, statistics)
    for scan in scans:
        for split in cfg.splits:
            loss, accuracy = results[f"{scan.path}-{split}"]
            summary.setdefault(scan.path, {})[split] = path_summary(scan, loss, accuracy)
        summary[scan.path]["length"] = scan.info.get("length")
        per_split = {split: results[f"{scan.path}-{split}"] for split in cfg.splits}
        if scan.path.startswith("partner"):
            paths[scan.path] = (scan, per_split, moved)
        rows += _line_rows(run_name, scan, scan.path, per_split, labels.get(scan.path, moved))
    base = "partner_aligned" if alignment else "partner"
    other = alignment.model if alignment else partner
    stats_inputs = tensors["train"][0] if "train" in tensors else data.train_tensors()[0].to(device)
    sites: list[str] = []
    if "repair" in cfg.path_bn and partner_finite:
        spec = alignment.spec if alignment else permutation_spec(final, data.input_shape, what=f"run {run_name}")
        sites = list(spec.repair_sites)
    timings = {}
    for mode in cfg.path_bn if partner_finite else ():
        if mode == "reset" and not has_batchnorm(final):
            logger.info("%s: no BatchNorm running statistics, so reset is the %s path itself; left out", run_name, base)
            continue
        scan = paths[base][0]
        variant, timings[mode] = statistics_variant(
            final, other, scan.alpha, mode, stats_inputs, tensors, sites, cfg, _loss(final_payload), run_name
        )
        name = f"{base}_{mode}"
        paths[name] = (scan, variant, STATISTICS_LABEL[mode])
        rows += _line_rows(run_name, scan, name, variant, STATISTICS_LABEL[mode])
        logger.info("%s: %s path in %.2f s (%d points)", run_name, name, timings[mode], len(scan.alpha))
    connectivity = {
        name: {
            "statistics": label,
            **{split: connectivity_summary(scan.alpha, *per_split[split]) for split in cfg.splits},
        }
        for name, (scan, per_split, label) in paths.items()
    }
    table = pd.DataFrame(rows, columns=INTERPOLATION_1D.names)
    metadata = {
        "provenance": provenance(),
        "landscape": dataclasses.asdict(cfg),
        "data_fingerprint": fingerprint,
        "checkpoint": entries[-1]["file"],
        "chunk": chunk,
        "channels_last": channels_last,
        "directions": {s.path: {"id": s.direction_id, **s.info} for s in scans},
    }
    write_table(table, Path(tables_dir) / "interpolation_1d.parquet", INTERPOLATION_1D, metadata)
    save_torch(
        Path(work_dir).parent / INTERPOLATE_DIRECTIONS,
        {
            "format": ARTIFACT_FORMAT,
            "run": run_name,
            "checkpoint": entries[-1]["file"],
            "directions": {
                s.path: {
                    "id": s.direction_id,
                    "tensors": {n: t.cpu() for n, t in s.direction.items()},
                    "buffers": ({n: t.cpu() for n, t in s.buffer_direction.items()} if s.buffer_direction else None),
                    **s.info,
                }
                for s in scans
            },
            "landscape": dataclasses.asdict(cfg),
            "provenance": provenance(),
        },
    )
    first = cfg.splits[0]
    metrics = {
        "barrier": summary["partner"][first]["barrier"],
        **{f"barrier_{s}": summary["partner"][s]["barrier"] for s in cfg.splits},
        **{
            f"barrier{name[len('partner') :]}": c[first]["loss_barrier"]
            for name, c in connectivity.items()
            if name != "partner"
        },
        **{
            f"accuracy_barrier{name[len('partner') :]}": c[first]["accuracy_barrier"]
            for name, c in connectivity.items()
        },
        "init_final_monotonic": summary["init_final"][first]["monotonic"],
        "split": first,
        "align": {
            "method": cfg.align,
            "status": "aligned" if alignment else ("not aligned" if partner_finite else "partner diverged"),
            **(
                {
                    "permutations": len(alignment.spec.groups),
                    "units": sum(alignment.spec.groups.values()),
                    "passes": alignment.match.passes,
                    "objective_start": alignment.match.objective[0],
                    "objective_end": alignment.match.objective[-1],
                    "seconds": align_seconds,
                }
                if alignment
                else {}
            ),
        },
        "statistics_seconds": timings,
        "connectivity": connectivity,
        "paths": summary,
    }
    write_json(Path(tables_dir) / "interpolate_metrics.json", metrics)
    plot_interpolation(
        table,
        Path(figures_dir) / "interpolation_1d.png",
        run=run_name,
        barriers={name: c[first]["loss_barrier"] for name, c in connectivity.items()},
    )
    logger.info(
        "%s: loss barrier to the second-seed model %s (%s loss; %s); init -> final %s",
        run_name,
        _number(metrics["barrier"]),
        first,
        ", ".join(
            f"{name} {_number(c[first]['loss_barrier'])}" for name, c in connectivity.items() if name != "partner"
        )
        or "no other variant",
        "monotone"
        if metrics["init_final_monotonic"]
        else f"not monotone (rise {summary['init_final'][first]['max_rise']:.4g})",
    )
    table_artifact(
        [
            {"run": run_name, "path": name, "split": split, **v}
            for name, c in connectivity.items()
            for split, v in c.items()
            if isinstance(v, dict)
        ],
        key=f"interpolate-{run_name}".lower().replace("_", "-"),
        description=f"1-D paths of run {run_name} to its second-seed model: barriers of each variant",
    )
    return metrics


# --------------------------------------------------------------------------------------------------------------
# surface
# --------------------------------------------------------------------------------------------------------------


@unit_of_work
def curvature_point(
    model, directions, coords: list[float], probe: ProbeSet, tol: float, seed: int, loss: str = "cross_entropy"
) -> dict:
    """λmax, λmin and their ratio at one point of the curvature map."""
    return curvature_at(model, directions, coords, probe, tol=tol, seed=seed, loss=loss)


@pipeline_flow(name="surface", flow_run_name="surface-{run_name}")
def surface_flow(
    params: Params,
    run_name: str,
    data_dir: Path,
    checkpoint_dir: Path,
    vectors_dir: Path,
    tables_dir: Path,
    work_dir: Path,
    figures_dir: Path,
) -> dict:
    """The loss surface of run ``run_name`` on a grid of the plane ``params.landscape.plane`` through its final
    checkpoint, on the probe set, BatchNorm in eval mode; optionally the curvature map on a coarse sub-grid."""
    logger = get_run_logger()
    cfg = params.landscape
    inputs = _inputs(params, run_name, data_dir, checkpoint_dir)
    tables_dir, figures_dir = Path(tables_dir), Path(figures_dir)
    if inputs.diverged:
        return _record_diverged(
            inputs,
            run_name,
            {
                tables_dir / "surface_2d.parquet": SURFACE_2D,
                tables_dir / "surface_curvature.parquet": SURFACE_CURVATURE,
            },
            tables_dir / "surface_metrics.json",
            [figures_dir / f"surface_{k}.png" for k in ("contour", "filled", "3d")],
            Path(work_dir),
            Path(work_dir).parent / SURFACE_DIRECTIONS,
        )
    data, fingerprint, device = inputs.data, inputs.fingerprint, inputs.device
    entries, final_payload = inputs.entries, inputs.payload
    final = inputs.final.to(device)
    trajectory, eigen = [], None
    if cfg.plane == "pca":
        trajectory = [
            model_from_checkpoint(load_verified(checkpoint_dir, e, run_name), data, data_fingerprint=fingerprint).to(
                device
            )
            for e in entries[:-1]
        ]
    elif cfg.plane == "eigen":
        eigen = _eigenvectors(vectors_dir, run_name, final_payload)
        eigen = {**eigen, "vectors": {n: v.to(device) for n, v in eigen["vectors"].items()}}
    directions, info = plane_directions(final, cfg, trajectory=trajectory, eigenvectors=eigen)
    ids = [direction_id(d) for d in directions]
    axis, coords = surface_coords(cfg)
    x, y = (t.to(device) for t in data.probe_tensors())
    params_final, buffers_final = state(final)
    engine_key = scan_fingerprint(
        final=final_payload["fingerprint"],
        data=fingerprint,
        device=str(device),
        batch_size=cfg.batch_size,
        split="probe",
    )
    chunk, channels_last = _engine_choice(final, params_final, buffers_final, x, cfg, Path(work_dir), engine_key)
    logger.info(
        "%s: %s plane, %d x %d grid over [-%g, %g]^2 on the probe set (%d samples); chunk %d, %s",
        run_name,
        cfg.plane,
        len(axis),
        len(axis),
        cfg.surface_range,
        cfg.surface_range,
        len(x),
        chunk,
        "channels-last" if channels_last else "default layout",
    )
    key = scan_fingerprint(
        run=run_name,
        plane=cfg.plane,
        directions=ids,
        coords=coords,
        data=fingerprint,
        weights=scan_fingerprint(**params_final, **buffers_final),
        final=final_payload["fingerprint"],
        final_epoch=final_payload["epoch"],
        tile_size=cfg.tile_size,
        batch_size=cfg.batch_size,
    )
    job = Job(
        "surface",
        final,
        params_final,
        buffers_final,
        directions,
        None,
        coords,
        x,
        y,
        TileStore(Path(work_dir), key, warn=_warn(logger)),
        _loss(final_payload),
    )
    results = run_jobs([job], cfg, chunk=chunk, channels_last=channels_last, description=f"surface {run_name}")
    loss, accuracy = results["surface"]
    timing = results["_timing"]

    table = pd.DataFrame(
        {
            "run": run_name,
            "plane": cfg.plane,
            "direction_x": ids[0],
            "direction_y": ids[1],
            "alpha": coords[:, 0].numpy(),
            "beta": coords[:, 1].numpy(),
            "split": "probe",
            "loss": loss.numpy(),
            "accuracy": accuracy.numpy(),
        },
        columns=SURFACE_2D.names,
    )
    curvature_rows = []
    if cfg.curvature_map:
        probe = ProbeSet.from_tensors(x, y, cfg.batch_size)
        sub = curvature_coords(cfg)
        for i, c in enumerate(sub.tolist()):
            point = curvature_point.with_options(task_run_name=f"curvature-{i:03d}")(
                final, directions, c, probe, cfg.curvature_tol, cfg.seed, _loss(final_payload)
            )
            curvature_rows.append({"run": run_name, "plane": cfg.plane, "alpha": c[0], "beta": c[1], **point})
            logger.info(
                "curvature at (%.3f, %.3f): lambda_max %.4g, lambda_min %.4g, |ratio| %.3g (%d products)",
                c[0],
                c[1],
                point["lambda_max"],
                point["lambda_min"],
                point["ratio"],
                point["hvps"],
            )
    curvature = pd.DataFrame(curvature_rows, columns=SURFACE_CURVATURE.names)
    metadata = {
        "provenance": provenance(),
        "landscape": dataclasses.asdict(cfg),
        "data_fingerprint": fingerprint,
        "checkpoint": entries[-1]["file"],
        "chunk": chunk,
        "channels_last": channels_last,
        "plane": info,
    }
    write_table(table, tables_dir / "surface_2d.parquet", SURFACE_2D, metadata)
    write_table(curvature, tables_dir / "surface_curvature.parquet", SURFACE_CURVATURE, metadata)
    save_torch(
        Path(work_dir).parent / SURFACE_DIRECTIONS,
        {
            "format": ARTIFACT_FORMAT,
            "run": run_name,
            "checkpoint": entries[-1]["file"],
            "ids": ids,
            "directions": [{n: t.cpu() for n, t in d.items()} for d in directions],
            "info": info,
            "landscape": dataclasses.asdict(cfg),
            "provenance": provenance(),
        },
    )

    metrics = surface_summary(
        loss,
        accuracy,
        coords,
        plane=cfg.plane,
        info=info,
        timing=timing,
        chunk=chunk,
        curvature=curvature if curvature_rows else None,
    )
    write_json(tables_dir / "surface_metrics.json", metrics)
    plot_surface(table, Path(figures_dir), run=run_name)
    logger.info(
        "%s: loss %.4f at the trained model, minimum %.4f at (%.3f, %.3f) of the grid",
        run_name,
        metrics["loss_center"],
        metrics["loss_min"],
        *metrics["loss_min_at"],
    )
    table_artifact(
        [{"run": run_name, **{k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}}],
        key=f"surface-{run_name}".lower().replace("_", "-"),
        description=f"2-D loss surface of run {run_name}",
    )
    return metrics
