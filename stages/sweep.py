"""DVC stage ``sweep`` (``sweeps/dvc.yaml``): train every point of the flatness sweep's grid, measure its final
checkpoint, and correlate the measures with the generalisation gap."""

import argparse
from pathlib import Path

from pipeline.stage import stage_entry
from pipeline.config import resolve_device


def main(argv=None):
    from pipeline.data import prepare_dataset
    from pipeline.sweep_run import load_sweep_params
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
    check_grid(params, data)  # batch sizes against the train split, hessian keys against each model's dimension

    from pipeline.flows.runtime import configure_prefect
    configure_prefect()
    from pipeline.flows.sweep import sweep_flow
    sweep_flow(params, data, args.points, args.out)


def check_grid(params, data) -> None:
    """Fail before any point trains: every ``grid.batch_size`` must fit the train split, and the ``hessian`` keys
    (top_k, density_steps, ...) the parameter count of every ``grid.model`` (built on the ``meta`` device)."""
    import torch

    from pipeline.curvature.analysis import check_dimensions
    from pipeline.models import build_model
    from pipeline.sweep_run import check_grid_batch_sizes

    check_grid_batch_sizes(params.grid, len(data.y_train), data.name)
    for name in params.grid.model:
        with torch.device("meta"):
            model = build_model(name, params.model, tuple(data.input_shape), data.num_classes)
        check_dimensions(model, params.hessian, f"grid.model {name}")


if __name__ == "__main__":
    stage_entry(main, params="sweeps/params.yaml")
