"""Edge of stability (Cohen et al. 2021) on the CPU in about a minute, and the cost of tracking sharpness.

Trains the ``eos`` run of ``presets/edge_of_stability.yaml`` (full-batch gradient descent, MSE, constant η = 0.1 on
500 digits, probe set = the whole training subset) with ``train.track_sharpness_every`` on, writes the tracked table
and its figure, and checks Cohen et al.'s observation: after progressive sharpening, λmax hovers at 2/η. The check
passes when the mean of λmax over the last quarter of the tracked steps is within ``--tolerance`` (15 %) of 2/η;
the exit status is 1 otherwise.

With ``--overhead`` it also trains the same run with tracking off, alternating the two ``--rounds`` times, and
prints the ratio of the wall-clock times (tracked / untracked, median over rounds): the cost of tracking as a
multiple of training alone.

    .venv/bin/python benchmarks/edge_of_stability.py [--overhead] [--out reports/eos]
"""

from __future__ import annotations

from common import REPO  # noqa: F401  (puts the repository on sys.path, tunes malloc)

import argparse
import dataclasses
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch  # noqa: E402

from pipeline.config import load_params  # noqa: E402
from pipeline.data import prepare_dataset  # noqa: E402
from pipeline.io import write_json  # noqa: E402
from pipeline.report.figures import plot_tracked_sharpness  # noqa: E402
from pipeline.tables import SHARPNESS_HISTORY, write_table  # noqa: E402
from pipeline.training.trainer import train  # noqa: E402


def last_quarter_ratio(rows: list[dict]) -> float:
    """Mean over the last quarter of the tracked steps of λmax / (2/η)."""
    quarter = rows[len(rows) - max(len(rows) // 4, 1) :]
    return statistics.fmean(r["lambda_max"] / r["two_over_lr"] for r in quarter)


def run(
    preset: Path,
    run_name: str,
    out: Path,
    *,
    tolerance: float = 0.15,
    overhead: bool = False,
    rounds: int = 1,
    epochs: int | None = None,
) -> dict:
    params = load_params(preset)
    run_cfg = params.run(run_name)
    if epochs is not None:
        run_cfg = dataclasses.replace(run_cfg, train=dataclasses.replace(run_cfg.train, epochs=epochs))
    if not run_cfg.train.track_sharpness_every:
        raise SystemExit(f"{preset}: runs.{run_name}: train.track_sharpness_every is 0; nothing to check")
    data = prepare_dataset(params.data)
    timings: dict[str, list[float]] = {"tracked": [], "untracked": []}
    untracked = dataclasses.replace(run_cfg, train=dataclasses.replace(run_cfg.train, track_sharpness_every=0))
    trainer = None
    for _ in range(rounds if overhead else 1):
        for kind, cfg in (("tracked", run_cfg), ("untracked", untracked)) if overhead else (("tracked", run_cfg),):
            with tempfile.TemporaryDirectory() as folder:
                start = time.perf_counter()
                result = train(cfg, data, folder)
                timings[kind].append(time.perf_counter() - start)
            if kind == "tracked":
                trainer = result
    rows = trainer.state.sharpness
    ratio = last_quarter_ratio(rows)
    out.mkdir(parents=True, exist_ok=True)
    write_table(
        rows,
        out / "sharpness_history.parquet",
        SHARPNESS_HISTORY,
        metadata={"run": run_cfg.to_dict(), "preset": str(preset)},
    )
    import pandas as pd

    frame = pd.DataFrame(rows)
    lr = run_cfg.train.lr
    plot_tracked_sharpness(
        {run_name: frame},
        out / "eos.png",
        title=rf"edge of stability: full-batch GD, MSE, $\eta$ = {lr:g} ($2/\eta$ = {2 / lr:g})",
    )
    summary = trainer.summary()
    result = {
        "preset": str(preset),
        "run": run_name,
        "steps": trainer.state.step,
        "tracked_steps": len(rows),
        "two_over_lr": 2.0 / lr,
        "initial_lambda_max": rows[0]["lambda_max"],
        "max_lambda_max": max(r["lambda_max"] for r in rows if math.isfinite(r["lambda_max"])),
        "last_quarter_lambda_max_over_two_over_lr": ratio,
        "tolerance": tolerance,
        "at_edge_of_stability": abs(ratio - 1.0) <= tolerance,
        "train_loss": summary["train_loss"],
        "status": summary["status"],
        "mean_hvps_per_tracked_step": statistics.fmean(r["hvps"] for r in rows),
        "cold_start_hvps": rows[0]["hvps"],
    }
    if overhead:
        tracked, alone = statistics.median(timings["tracked"]), statistics.median(timings["untracked"])
        result.update(seconds_tracked=tracked, seconds_untracked=alone, tracking_overhead_ratio=tracked / alone)
    write_json(out / "eos.json", result)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", type=Path, default=REPO / "presets" / "edge_of_stability.yaml")
    parser.add_argument("--run", default="eos")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "eos")
    parser.add_argument("--tolerance", type=float, default=0.15, help="allowed |mean(λmax)/(2/η) − 1|")
    parser.add_argument("--overhead", action="store_true", help="also time training without tracking")
    parser.add_argument("--rounds", type=int, default=1, help="alternating tracked/untracked rounds (--overhead)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a fair single-core timing)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args.preset, args.run, args.out, tolerance=args.tolerance, overhead=args.overhead, rounds=args.rounds)
    print(
        f"{result['run']}: {result['steps']} full-batch steps, {result['tracked_steps']} tracked; "
        f"lambda_max {result['initial_lambda_max']:.3g} -> max {result['max_lambda_max']:.3g}; 2/lr = "
        f"{result['two_over_lr']:.3g}; last quarter mean lambda_max / (2/lr) = "
        f"{result['last_quarter_lambda_max_over_two_over_lr']:.3f} (tolerance {args.tolerance:g})"
    )
    print(
        f"warm-started Lanczos: {result['mean_hvps_per_tracked_step']:.1f} products per tracked step on average "
        f"(cold start at step 0: {result['cold_start_hvps']})"
    )
    if args.overhead:
        print(
            f"tracking overhead: {result['seconds_tracked']:.1f} s tracked vs {result['seconds_untracked']:.1f} s "
            f"alone = {result['tracking_overhead_ratio']:.2f}x training alone"
        )
    print(f"wrote {args.out / 'eos.png'}, {args.out / 'eos.json'}, {args.out / 'sharpness_history.parquet'}")
    return 0 if result["at_edge_of_stability"] else 1


if __name__ == "__main__":
    sys.exit(main())
