"""Grid points per second of the landscape engine vs the in-place per-point loop of loss-landscape(s).

    .venv/bin/python benchmarks/grid.py [--points 21] [--rounds 2]

A ``points`` x ``points`` grid over [-1, 1]^2 spanned by two filter-normalised random directions, evaluated on the
probe set (512 digits samples) around the trained weights of each run: the engine
(:func:`pipeline.landscape.engine.evaluate_points`, chunk size and layout chosen by its measured rule) against
:func:`pipeline.landscape.engine.sequential_shift_loop` (shift the weights in place, evaluate, shift back), timed
round-robin in the same process. Both results are checked to agree first.
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
        rows.append(
            [
                run,
                n,
                chunk,
                "yes" if layout else "no",
                f"{n / timed['engine']:.0f}",
                f"{n / timed['loop']:.0f}",
                f"{timed['loop'] / timed['engine']:.2f}x",
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
                "max rel. difference",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
