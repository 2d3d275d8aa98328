"""DVC stage ``hessian@<run>``: curvature of one run's checkpoints (eigenvalues, trace, density, GGN, per group)."""

import argparse
from pathlib import Path

from pipeline.checkpoints import require_checkpoints
from pipeline.cli import stage_entry
from pipeline.config import load_params, resolve_device
from pipeline.data import require_prepared


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="validated before any work")
    parser.add_argument("--run", required=True, help="a key of `runs` in params.yaml")
    parser.add_argument("--data", type=Path, default=Path("artifacts/data"))
    parser.add_argument("--checkpoints", type=Path, help="default: artifacts/checkpoints/<run>")
    parser.add_argument("--tables", type=Path, help="default: reports/tables/<run>")
    parser.add_argument("--vectors", type=Path, help="top eigenvectors; default: artifacts/hessian/<run>")
    parser.add_argument("--figures", type=Path, help="default: reports/figures/<run>")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    params.run(args.run)  # an unknown run fails here, before any work
    resolve_device(params.hessian.device, "hessian.device")
    require_prepared(args.data)
    checkpoints = args.checkpoints or Path("artifacts/checkpoints") / args.run
    require_checkpoints(checkpoints, args.run)

    from pipeline.flows.runtime import configure_prefect
    configure_prefect()
    from pipeline.flows.hessian import hessian_flow
    hessian_flow(params, args.run, args.data, checkpoints, args.tables or Path("reports/tables") / args.run,
                 args.vectors or Path("artifacts/hessian") / args.run, args.figures or Path("reports/figures") / args.run)


if __name__ == "__main__":
    stage_entry(main)
