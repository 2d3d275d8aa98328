"""Efficiency of every analysis: (primitive count × unit cost) ÷ wall time, all measured in one process.

    .venv/bin/python benchmarks/efficiency.py [--models mlp resnet20 resnet20_noshort] [--rounds 5]

For each default model (its final checkpoint when the pipeline has trained it, else a seeded fresh network) on the
stages' probe set and ``params.yaml``'s ``hessian`` settings, it first measures the unit cost of each primitive
(median of ``--rounds``, interleaved): a forward pass over the probe set, a gradient of the probe loss, a
Hessian-vector product through the retained graph, a per-sample gradient (one ``vmap`` pass over a probe batch,
divided by its samples), and one point of a scan (the plain per-point forward). It then runs what the stages run: the
curvature report at a ``details`` checkpoint (``pipeline.curvature.analysis.analyse``), one tracked step of
training (λmax, gᵀHg, the quadratic step model) and one scan tile of 256 points of the 2-D grid. Each analysis
records its own primitive counts (the ``forwards``, ``gradients``, ``hvps``, ``samples`` columns of
``hessian_spectrum``; ``cost_*`` of ``sharpness_history``), so

    efficiency = (forwards × forward + gradients × gradient + hvps × product + samples × per-sample) / seconds

1 means the analysis costs exactly its primitives; below 1 is overhead (solver arithmetic, rebuilt graphs,
allocations); above 1 means it found a cheaper way than the unit (a scan tile's batched points, a warm start's
shared work). Analyses under 0.1 s are listed but not judged.
"""

from __future__ import annotations

from common import REPO, interleaved, load_data, load_model, markdown_table  # first: pins the kernels

import argparse
import copy
import math
import time

import torch

from pipeline.config import load_params
from pipeline.curvature.analysis import analyse
from pipeline.curvature.dynamics import _per_sample_fn
from pipeline.curvature.operators import HessianOperator, ProbeSet
from pipeline.landscape.directions import random_direction
from pipeline.landscape.engine import evaluate_points
from pipeline.landscape.plan import symmetric_axis
from pipeline.landscape.tiles import grid_coords
from pipeline.training.tracking import SharpnessTracker

MODELS = {"mlp": "mlp", "resnet20": "resnet20", "resnet20_noshort": "resnet20_noshort"}


def unit_costs(model: torch.nn.Module, probe: ProbeSet, rounds: int) -> dict[str, float]:
    """Median seconds of one forward, gradient, product (warm graph) and per-sample gradient, and one scan point."""
    op = HessianOperator(model, probe)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    op.matvec(v)  # the retained graph, built once
    per_sample = _per_sample_fn(op)
    x, y = probe.batches[0]
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    zero = [{n: torch.zeros_like(p) for n, p in params.items()}]
    xs, ys = torch.cat([b[0] for b in probe.batches]), torch.cat([b[1] for b in probe.batches])

    def gradient():
        op._gradient = None  # the operator caches its gradient: time a fresh one
        op.gradient()

    median = interleaved(
        {
            "forward": op.loss_value,
            "gradient": gradient,
            "hvp": lambda: op.matvec(v),
            "per_sample": lambda: per_sample(op.point, x, y),
            "point": lambda: evaluate_points(
                model, params, buffers, zero, torch.zeros(1, 1), xs, ys, chunk=1, channels_last=False
            ),
        },
        rounds,
    )
    median["per_sample"] /= len(x)
    return median


def priced(row, unit: dict[str, float], prefix: str = "") -> float:
    return (
        row[prefix + "forwards"] * unit["forward"]
        + row[prefix + "gradients"] * unit["gradient"]
        + row[prefix + "hvps"] * unit["hvp"]
        + (row.get(prefix + "samples", 0) or 0) * unit["per_sample"]
    )


def curvature_rows(model, probe, cfg, unit) -> list[list]:
    report = analyse(model, probe, cfg, details=True, on_step=lambda message: None)
    rows, seen = [], set()
    for r in report.rows:
        key = (r["operator"], r["group"], r["quantity"].removesuffix("_keskar"), r["method"])
        if key in seen or r["quantity"] in ("dim", "products") or r["seconds"] == 0:
            continue
        seen.add(key)
        what = f"{r['quantity']} {r['method']}".strip() + ("" if r["group"] == "all" else f" [{r['group']}]")
        rows.append([what, r["forwards"], r["gradients"], r["hvps"], r["samples"], priced(r, unit), r["seconds"]])
    groups = [row for row in rows if "[" in row[0]]  # the per-group spectra: one line for all of them
    if groups:
        rows = [row for row in rows if "[" not in row[0]]
        rows.append(["eigenvalue lanczos [every group]", *[sum(g[i] for g in groups) for i in range(1, 7)]])
    return rows


def tracked_step_row(model, probe, cfg, unit) -> list:
    tracker = SharpnessTracker(probe, loss="cross_entropy", tol=cfg.train.track_tol, max_hvps=cfg.train.track_max_hvps)
    moving = copy.deepcopy(model)
    before = tracker.before_step(moving)
    grads = torch.autograd.grad(
        torch.nn.functional.cross_entropy(moving(probe.batches[0][0][:64]), probe.batches[0][1][:64]),
        list(moving.parameters()),
    )
    with torch.no_grad():
        for p, g in zip(moving.parameters(), grads):
            p -= cfg.train.lr * g
    row = tracker.after_step(moving, before)
    cost = {k: row[f"cost_{k}"] for k in ("forwards", "gradients", "hvps")}
    return ["tracked step (lambda_max, g'Hg, step model)", *cost.values(), 0, priced(cost, unit), row["seconds"]]


def scan_tile_row(model, probe, cfg, unit, points: int = 256) -> list:
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    dirs = [random_direction(params, seed=s, norm=cfg.landscape.norm, ignore=cfg.landscape.ignore) for s in (0, 1)]
    axis = symmetric_axis(cfg.landscape.surface_points, cfg.landscape.surface_range)
    coords = grid_coords([axis, axis])[:points]
    xs, ys = torch.cat([b[0] for b in probe.batches]), torch.cat([b[1] for b in probe.batches])
    evaluate_points(model, params, buffers, dirs, coords[:2], xs, ys)  # the chunk and layout measurements, untimed
    start = time.perf_counter()
    evaluate_points(model, params, buffers, dirs, coords, xs, ys, batch_size=cfg.landscape.batch_size)
    seconds = time.perf_counter() - start
    return [f"scan tile ({points} points, priced per point)", points, 0, 0, 0, points * unit["point"], seconds]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each unit cost (median)")
    args = parser.parse_args(argv)
    params = load_params(REPO / "params.yaml")
    cfg = params.hessian
    data = load_data()
    x, y = data.probe_tensors()
    probe = ProbeSet.from_tensors(x, y, cfg.batch_size)
    print(f"threads {torch.get_num_threads()}, probe {len(x)} samples, hessian batch {cfg.batch_size}\n")
    for run in args.models:
        model, origin = load_model(run, MODELS[run], data)
        unit = unit_costs(model, probe, args.rounds)
        print(f"## {run} ({origin})\n")
        print(
            "unit costs: "
            + ", ".join(f"{k} {1e3 * v:.3g} ms" for k, v in unit.items() if k != "per_sample")
            + f", per-sample gradient {1e6 * unit['per_sample']:.3g} µs\n"
        )
        rows = curvature_rows(model, probe, cfg, unit)
        rows.append(tracked_step_row(model, probe, params, unit))
        rows.append(scan_tile_row(model, probe, params, unit))
        table = []
        for what, forwards, gradients, hvps, samples, cost, seconds in rows:
            efficiency = cost / seconds if seconds > 0 else math.nan
            judged = "" if seconds < 0.1 else ("ok" if efficiency >= 0.8 else "LOW")
            table.append(
                [what, f"{forwards:.3g}", f"{gradients:.3g}", hvps, samples, f"{cost:.2f}", f"{seconds:.2f}",
                 f"{efficiency:.2f}", judged]
            )  # fmt: skip
        header = ["analysis", "forwards", "gradients", "products", "per-sample", "priced s", "wall s", "efficiency", ""]
        print(markdown_table(header, table) + "\n")


if __name__ == "__main__":
    main()
