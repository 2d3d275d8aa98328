"""The pipeline's own code on a CUDA device, on a CIFAR-shaped problem (3x32x32, 10 classes): one table.

    .venv/bin/python benchmarks/gpu.py [--device cuda] [--samples 5000] [--probe 512] [--points 21]
    .venv/bin/python benchmarks/gpu.py --device cpu --samples 64 --probe 32 --points 3   # the CPU path (a test)

Data: CIFAR-10 from ``--root`` (torchvision's on-disk format) when it is there, else the synthetic dataset at
3x32x32 with 10 classes (``--samples`` images). On ``--device``:

- **training**: ResNet20 epochs through :class:`pipeline.training.trainer.Trainer` (the training loop of the
  ``train`` stage, SGD with heavy ball at batch ``--batch-size``); the second epoch's training-loop seconds
  (the first pays cuDNN's autotuning) and samples/s;
- **HVP / gradient**: :class:`pipeline.curvature.operators.HessianOperator` on the probe set, median of
  ``--rounds`` products against the gradient of the same loss (synchronised);
- **Lanczos agreement**: λmax of the same network and probe set by :func:`pipeline.curvature.eigen.lanczos`
  on the CPU and on the device; their relative difference must be below 1e-3;
- **grid points/s**: :func:`pipeline.landscape.engine.evaluate_points` (chunk chosen by its rule) against
  :func:`pipeline.landscape.engine.sequential_shift_loop` on a ``--points`` x ``--points`` plane;
- **peak memory**: ``torch.cuda.max_memory_allocated`` per part (the process's peak RSS on the CPU).

With ``--device cpu`` every part runs the same code on the CPU (both sides of the Lanczos comparison are then the
CPU), so the script is tested in CI, which has no GPU.
"""

from __future__ import annotations

from common import markdown_table  # first: pins the kernels before torch is imported

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from pipeline.curvature.eigen import lanczos
from pipeline.curvature.operators import HessianOperator, ProbeSet
from pipeline.data import prepare_dataset
from pipeline.landscape.directions import random_direction
from pipeline.landscape.engine import choose_chunk, evaluate_points, sequential_shift_loop
from pipeline.landscape.tiles import grid_coords
from pipeline.training.trainer import Trainer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, rounds: int) -> float:
    """Median seconds of ``fn()`` over ``rounds`` calls after one warm-up, synchronised on the device."""
    fn()
    times = []
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float:
    """Peak memory of the part just run: allocated on the GPU, or the process's peak RSS on the CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load(args) -> tuple:
    cifar = Path(args.root) / "cifar-10-batches-py"
    if cifar.is_dir():
        cfg = DataConfig(dataset="cifar10", root=args.root, train_samples=args.samples, probe_size=args.probe)
    else:
        cfg = DataConfig(
            dataset="synthetic",
            synthetic_samples=args.samples,
            synthetic_classes=10,
            synthetic_size=32,
            synthetic_channels=3,
            probe_size=args.probe,
        )
    data = prepare_dataset(cfg)
    return data, f"{data.name}: {len(data.y_train)} train, probe {len(data.probe_index)}"


def main(argv=None) -> list[list]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--root", default="data/raw", help="folder with cifar-10-batches-py (else synthetic)")
    parser.add_argument("--samples", type=int, default=5000, help="train images")
    parser.add_argument("--probe", type=int, default=512, help="probe-set images (HVP, Lanczos, grid)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--points", type=int, default=21, help="grid points per axis")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lanczos-hvps", type=int, default=200)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    data, described = load(args)
    print(f"{described}; device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'})")
    rows = []

    # training: the train stage's loop, two epochs, the second timed
    reset_peak(device)
    run = RunConfig(
        name="resnet20",
        model_name="resnet20",
        model=ModelConfig(),
        train=TrainConfig(epochs=2, batch_size=args.batch_size, checkpoint_every=2, device=str(device)),
    )
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(run, data, folder)
        trainer.start()
        trainer.train_epoch()
        before = trainer.state.seconds
        trainer.train_epoch()
        epoch = trainer.state.seconds - before
    rows.append(["train epoch (ResNet20)", f"{epoch:.3f} s", f"{len(data.y_train) / epoch:.0f} samples/s",
                 f"{peak_mib(device):.0f}"])  # fmt: skip

    # curvature: HVP / gradient on the probe set, and lambda_max on both devices
    model = trainer.model.eval()
    x, y = data.probe_tensors()
    probe = ProbeSet.from_tensors(x, y, 512)
    reset_peak(device)
    op = HessianOperator(model.to(device), probe.to(device))
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
    hvp, grad = timed(lambda: op.matvec(v), device, args.rounds), timed(op.gradient, device, args.rounds)
    rows.append(["HVP / gradient (probe set)", f"{hvp * 1e3:.1f} ms / {grad * 1e3:.1f} ms", f"{hvp / grad:.2f}",
                 f"{peak_mib(device):.0f}"])  # fmt: skip

    def lambda_max(on: torch.device) -> float:
        operator = HessianOperator(model.to(on), probe.to(on))
        top, _ = lanczos(operator.matvec, operator.dim, k_largest=1, tol=1e-4, max_matvecs=args.lanczos_hvps, device=on)
        return float(top.eigenvalues[0])

    reset_peak(device)
    on_device = lambda_max(device)
    on_cpu = lambda_max(torch.device("cpu"))
    agreement = abs(on_device - on_cpu) / abs(on_cpu)
    rows.append(["Lanczos λmax, CPU vs device", f"{on_cpu:.6g} vs {on_device:.6g}", f"{agreement:.1e} relative",
                 f"{peak_mib(device):.0f}"])  # fmt: skip

    # the landscape engine against the per-point loop
    model = model.to(device)
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    directions = [random_direction(params, seed=s) for s in (1, 2)]
    axis = torch.linspace(-1.0, 1.0, args.points, dtype=torch.float64)
    coords = grid_coords([axis, axis])
    xd, yd = x.to(device), y.to(device)
    reset_peak(device)
    chunk = choose_chunk(model, params, buffers, xd)
    engine = timed(lambda: evaluate_points(model, params, buffers, directions, coords, xd, yd, chunk=chunk), device, 1)
    engine_peak = peak_mib(device)
    loop = timed(lambda: sequential_shift_loop(model, directions, coords, xd, yd), device, 1)
    n = len(coords)
    rows.append([f"grid points/s, engine (chunk {chunk}) vs loop", f"{n / engine:.0f} vs {n / loop:.0f}",
                 f"{loop / engine:.2f}x", f"{engine_peak:.0f}"])  # fmt: skip

    print()
    print(markdown_table(["measure", "value", "ratio / rate", "peak MiB"], rows))
    if agreement > 1e-3:
        sys.exit(f"error: Lanczos lambda_max differs between CPU and {device} by {agreement:.1e} (> 1e-3)")
    return rows


if __name__ == "__main__":
    main()
