"""DVC stage ``hessian@<run>``: curvature of one run's checkpoints (eigenvalues, trace, density, GGN, per group)."""

from pathlib import Path

from pipeline.config import resolve_device
from pipeline.stage import stage_arguments, stage_entry


def main(argv=None):
    args, params = stage_arguments(__doc__, argv, "data", "checkpoints", "tables", "vectors", "figures")
    # torch-using modules after the params: a bad command line or params file ends in a fraction of a second
    from pipeline.data import require_prepared
    from pipeline.training.checkpoints import require_checkpoints

    params.run(args.run)  # an unknown run fails here, before any work
    resolve_device(params.hessian.device, "hessian.device")
    require_prepared(args.data)
    checkpoints = args.checkpoints
    check_hessian_dimensions(params, args.run, args.data)  # top_k etc. against the parameter count, before Prefect
    require_checkpoints(checkpoints, args.run)

    from pipeline.flows.runtime import configure_prefect

    configure_prefect()
    from pipeline.flows.hessian import hessian_flow

    hessian_flow(params, args.run, args.data, checkpoints, args.tables, args.vectors, args.figures)


def check_hessian_dimensions(params, run_name: str, data_dir: Path) -> int:
    """Build the run's model on the ``meta`` device (shapes only, from ``meta.json``) and check the ``hessian``
    keys that must fit its parameter count; returns the count."""
    import torch

    from pipeline.config import read_prepared_meta
    from pipeline.curvature.analysis import check_dimensions
    from pipeline.training.models import build_model

    run = params.run(run_name)
    meta = read_prepared_meta(data_dir)
    with torch.device("meta"):
        model = build_model(run.model_name, run.model, tuple(meta["input_shape"]), int(meta["num_classes"]))
    return check_dimensions(model, params.hessian, f"run {run_name} ({run.model_name})")


if __name__ == "__main__":
    stage_entry(main)
