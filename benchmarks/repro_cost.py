"""What bitwise reproducibility costs: training epoch, Hessian-vector product and grid points/s, pinned vs native.

    .venv/bin/python benchmarks/repro_cost.py [--rounds 3]

``pinned`` is the default ``repro`` section (kernels at AVX2, 2 threads); ``native`` is ``repro.pin: false,
threads: 0`` (the CPU's own kernels, all cores). Each measurement is a fresh process, as the libraries read these
settings once at import; the two settings alternate round by round and the median is reported, so the machine's
speed and load cancel out in the ratio. Measured on digits: one epoch of SGD (21 steps of 64), one product on the
512-sample probe set, and a 9x9 grid of the batched engine, for the MLP and ResNet20.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"native": {"pin": False, "threads": 0}, "pinned": {"pin": True, "threads": 2}}

CHILD = r"""
import json, sys, time
from pipeline import repro
repro.apply_section(json.loads(sys.argv[1]))
import torch
from pipeline.stage import tune_malloc
tune_malloc()
from pipeline.config import DataConfig, ModelConfig
from pipeline.curvature.operators import HessianOperator, ProbeSet
from pipeline.data import prepare_dataset
from pipeline.landscape.directions import random_direction
from pipeline.landscape.engine import evaluate_points
from pipeline.training.models import build_model

data = prepare_dataset(DataConfig())
x, y = data.train_tensors()
px, py = data.probe_tensors()
out = {"kernel_level": repro.kernel_record()["kernel_level"], "threads": torch.get_num_threads()}
for name in ("mlp", "resnet20"):
    torch.manual_seed(0)
    model = build_model(name, ModelConfig(), data.input_shape, data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    def epoch():
        for _ in range(21):
            i = torch.randint(0, len(x), (64,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
            opt.zero_grad(); loss.backward(); opt.step()
    epoch(); t = time.perf_counter(); epoch(); epoch(); out[f"{name}_epoch_s"] = (time.perf_counter() - t) / 2
    model.eval()
    op = HessianOperator(model, ProbeSet.from_tensors(px, py, 512))
    v = torch.randn(op.dim, dtype=torch.float64)
    op.matvec(v); t = time.perf_counter()
    for _ in range(10):
        op.matvec(v)
    out[f"{name}_hvp_s"] = (time.perf_counter() - t) / 10
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    dirs = [random_direction(params, seed=s) for s in (0, 1)]
    axis = torch.linspace(-1, 1, 9, dtype=torch.float64)
    coords = torch.cartesian_prod(axis, axis)
    evaluate_points(model, params, buffers, dirs, coords[:9], px, py, chunk=9)
    t = time.perf_counter()
    evaluate_points(model, params, buffers, dirs, coords, px, py, chunk=9)
    out[f"{name}_grid_points_per_s"] = len(coords) / (time.perf_counter() - t)
print(json.dumps(out))
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, setting in SETTINGS.items():
            done = subprocess.run(
                [sys.executable, "-c", CHILD, json.dumps(setting)], cwd=REPO, check=True, capture_output=True, text=True
            )
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    median = {
        name: {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "kernel_level"}
        for name, rows in results.items()
    }
    levels = {name: rows[0]["kernel_level"] for name, rows in results.items()}
    print(
        f"native: {levels['native']} kernels, {median['native']['threads']:.0f} threads; "
        f"pinned: {levels['pinned']}, {median['pinned']['threads']:.0f} threads; median of {args.rounds} rounds"
    )
    print("| measure | native | pinned | pinned / native (time) |")
    print("|---|---:|---:|---:|")
    for key in [k for k in median["native"] if k != "threads"]:
        a, b = median["native"][key], median["pinned"][key]
        throughput = key.endswith("_per_s")
        ratio = a / b if throughput else b / a  # as a time ratio either way: > 1 means pinned is slower
        unit = "points/s" if throughput else "ms"
        scale = 1.0 if unit == "points/s" else 1000.0
        print(f"| {key} ({unit}) | {a * scale:.1f} | {b * scale:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
