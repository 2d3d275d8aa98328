"""DVC stage ``sweep`` (``sweeps/dvc.yaml``): train every point of the flatness sweep's grid, measure its final
checkpoint, and correlate the measures with the generalisation gap."""

import argparse
from pathlib import Path

from pipeline.cli import stage_entry
from pipeline.config import resolve_device
from pipeline.data import prepare_dataset
from pipeline.sweep_run import load_sweep_params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="sweeps/params.yaml", help="validated before any work")
    parser.add_argument("--points", type=Path, default=Path("artifacts/sweep"),
                        help="one folder per point: checkpoints and result.json (kept across runs)")
    parser.add_argument("--out", type=Path, default=Path("reports/sweep"))
    args = parser.parse_args(argv)
    params = load_sweep_params(args.params)
    resolve_device(params.train.device)  # an absent accelerator fails here, before any work
    resolve_device(params.hessian.device, "hessian.device")
    data = prepare_dataset(params.data)  # in-process: a bad data section ends with one line, before Prefect starts

    from pipeline.flows.runtime import configure_prefect
    configure_prefect()
    from pipeline.flows.sweep import sweep_flow
    sweep_flow(params, data, args.points, args.out)


if __name__ == "__main__":
    stage_entry(main)
