"""DVC stage ``hessian@<run>``: curvature of one run's checkpoints (eigenvalues, trace, density, GGN, per group)."""

import argparse
from pathlib import Path

from pipeline.stage import stage_entry
from pipeline.config import load_params, resolve_device


def main(argv=None):
    from pipeline.checkpoints import require_checkpoints
    from pipeline.data import require_prepared
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="validated before any work")
    parser.add_argument("--run", required=True, help="a key of `runs` in params.yaml")
    parser.add_argument("--data", type=Path, default=Path("artifacts/data"))
    parser.add_argument("--checkpoints", type=Path, help="default: artifacts/checkpoints/<run>")
    parser.add_argument("--tables", type=Path, help="default: reports/tables/<run>")
    parser.add_argument("--vectors", type=Path, help="top eigenvectors; default: artifacts/hessian/<run>")
    parser.add_argument("--figures", type=Path, help="default: reports/figures/<run>")
    args, extra = parser.parse_known_args(argv)
    params = load_params(args.params)  # first: a bad run name split by the shell ends here, with the project's line
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    params.run(args.run)  # an unknown run fails here, before any work
    resolve_device(params.hessian.device, "hessian.device")
    require_prepared(args.data)
    checkpoints = args.checkpoints or Path("artifacts/checkpoints") / args.run
    check_hessian_dimensions(params, args.run, args.data)  # top_k etc. against the parameter count, before Prefect
    require_checkpoints(checkpoints, args.run)

    from pipeline.flows.runtime import configure_prefect
    configure_prefect()
    from pipeline.flows.hessian import hessian_flow
    hessian_flow(params, args.run, args.data, checkpoints, args.tables or Path("reports/tables") / args.run,
                 args.vectors or Path("artifacts/hessian") / args.run, args.figures or Path("reports/figures") / args.run)


def check_hessian_dimensions(params, run_name: str, data_dir: Path) -> int:
    """Build the run's model on the ``meta`` device (shapes only, from ``meta.json``) and check the ``hessian``
    keys that must fit its parameter count; returns the count."""
    import torch

    from pipeline.config import read_prepared_meta
    from pipeline.curvature.analysis import check_dimensions
    from pipeline.models import build_model

    run = params.run(run_name)
    meta = read_prepared_meta(data_dir)
    with torch.device("meta"):
        model = build_model(run.model_name, run.model, tuple(meta["input_shape"]), int(meta["num_classes"]))
    return check_dimensions(model, params.hessian, f"run {run_name} ({run.model_name})")


if __name__ == "__main__":
    stage_entry(main)
