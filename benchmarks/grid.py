"""Grid points per second of the landscape engine vs the in-place per-point loop of loss-landscape(s).

    .venv/bin/python benchmarks/grid.py [--points 21] [--rounds 2]

A ``points`` x ``points`` grid over [-1, 1]^2 spanned by two filter-normalised random directions, evaluated on the
probe set (512 digits samples) around the trained weights of each run: the engine
(:func:`pipeline.landscape.engine.evaluate_points`, chunk size and layout chosen by its measured rule) against
:func:`pipeline.landscape.engine.sequential_shift_loop` (shift the weights in place, evaluate, shift back), timed
round-robin in the same process. Both results are checked to agree first.

The ceiling: a 2048 x 2048 float32 matrix product, timed in the same process (GFLOP/s = 2 n^3 / seconds). Each
point's work is the model's forward on the probe set as torch's ``FlopCounterMode`` counts it (matrix products and
convolutions), so for the MLP the first layer the engine computes once per batch is counted as saved work; the
engine's rate is points/s x that count, and its fraction of the ceiling is printed beside the speed-up.
"""

from __future__ import annotations

from common import (  # first: pins the kernels before torch is imported
    interleaved,
    load_data,
    load_model,
    markdown_table,
)

import argparse

import torch

from pipeline.landscape.directions import random_direction
from pipeline.landscape.engine import choose_chunk, choose_layout, evaluate_points, sequential_shift_loop
from pipeline.landscape.tiles import grid_coords

RUNS = {"mlp": "mlp", "resnet20": "resnet20"}


def gemm_ceiling(rounds: int, n: int = 2048) -> float:
    """GFLOP/s of an n x n float32 matrix product on this machine and thread count (median of ``rounds``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / interleaved({"gemm": lambda: a @ b}, rounds=rounds)["gemm"] / 1e9


def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Floating-point operations of one forward pass over ``x`` (torch's count: matrix products, convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=21, help="grid points per axis")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds (median reported)")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    args = parser.parse_args(argv)
    data = load_data()
    x, y = data.probe_tensors()
    axis = torch.linspace(-1.0, 1.0, args.points, dtype=torch.float64)
    coords = grid_coords([axis, axis])
    ceiling = gemm_ceiling(max(args.rounds, 5))
    print(f"GEMM ceiling: {ceiling:.1f} GFLOP/s (2048^2 float32, {torch.get_num_threads()} threads)", flush=True)
    rows = []
    for run in args.runs:
        model, origin = load_model(run, RUNS[run], data)
        params = {k: p.detach() for k, p in model.named_parameters()}
        buffers = {k: b.detach() for k, b in model.named_buffers()}
        directions = [random_direction(params, seed=s) for s in (1, 2)]
        chunk = choose_chunk(model, params, buffers, x)
        layout = choose_layout(model, params, buffers, x)
        engine = lambda: evaluate_points(
            model,
            params,
            buffers,
            directions,
            coords,
            x,
            y,
            chunk=chunk,  # noqa: E731
            channels_last=layout,
        )
        baseline = lambda: sequential_shift_loop(model, directions, coords, x, y)  # noqa: E731
        got, want = engine()[0], baseline()[0]
        error = float(((got - want).abs() / want.abs()).max())
        if error > 1e-4:
            raise SystemExit(f"{run}: engine and loop disagree (max relative loss error {error:.1e})")
        timed = interleaved({"engine": engine, "loop": baseline}, rounds=args.rounds, warmup=0)
        n = len(coords)
        rate = n / timed["engine"] * forward_flops(model, x) / 1e9
        rows.append(
            [
                run,
                n,
                chunk,
                "yes" if layout else "no",
                f"{n / timed['engine']:.0f}",
                f"{n / timed['loop']:.0f}",
                f"{timed['loop'] / timed['engine']:.2f}x",
                f"{rate:.1f}",
                f"{rate / ceiling:.0%}",
                f"{error:.1e}",
            ]
        )
        print(f"{run}: weights from {origin}", flush=True)
    print()
    print(
        markdown_table(
            [
                "model",
                "points",
                "chunk",
                "channels-last",
                "engine points/s",
                "loop points/s",
                "speed-up",
                "engine GFLOP/s",
                "of GEMM ceiling",
                "max rel. difference",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
