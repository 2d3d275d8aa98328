"""DVC stage ``sweep`` (``sweeps/dvc.yaml``): train every point of the flatness sweep's grid, measure its final
checkpoint, and correlate the measures with the generalisation gap."""

import os

from pipeline.config import resolve_device
from pipeline.stage import stage_arguments, stage_entry


def main(argv=None):
    from pipeline.data import prepare_dataset
    from pipeline.sweep.grid import load_sweep_params

    args, params = stage_arguments(
        __doc__,
        argv,
        run=False,
        params="sweeps/params.yaml",
        load=load_sweep_params,
        points=("artifacts/sweep", "one folder per point: checkpoints and result.json (kept across runs)"),
        out=("reports/sweep", "the sweep's tables, figure and README"),
    )
    resolve_device(params.train.device)  # an absent accelerator fails here, before any work
    resolve_device(params.hessian.device, "hessian.device")
    data = prepare_dataset(params.data)  # in-process: a bad data section ends with one line, before Prefect starts
    check_grid(params, data)  # batch sizes against the train split, hessian keys against each model's dimension

    from pipeline.flows.runtime import configure_prefect

    on_dask = params.sweep.executor == "dask"
    api_url = configure_prefect(need_server=on_dask)  # Dask workers report their task runs to a real server
    if params.sweep.scheduler:  # every worker can import this code, has its kernels, sees the folder, reaches the API
        from pipeline.sweep.cluster import check_cluster

        workers = check_cluster(params.sweep.scheduler, args.points, api_url)
        print(f"sweep: {len(workers)} Dask worker(s) at {params.sweep.scheduler} checked", flush=True)
    elif on_dask:  # a LocalCluster: its workers share this machine's cores (see pipeline.sweep.cluster)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read by each worker process when it starts
    from pipeline.flows.cluster import task_runner
    from pipeline.flows.sweep import sweep_flow

    flow = sweep_flow.with_options(task_runner=task_runner(params.sweep)) if on_dask else sweep_flow
    flow(params, data, args.points, args.out)


def check_grid(params, data) -> None:
    """Fail before any point trains: every ``grid.batch_size`` must fit the train split, and the ``hessian`` keys
    (top_k, density_steps, ...) the parameter count of every ``grid.model`` (built on the ``meta`` device)."""
    import torch

    from pipeline.curvature.analysis import check_dimensions
    from pipeline.sweep.grid import check_grid_batch_sizes
    from pipeline.training.models import build_model

    check_grid_batch_sizes(params.grid, len(data.y_train), data.name)
    for name in params.grid.model:
        with torch.device("meta"):
            model = build_model(name, params.model, tuple(data.input_shape), data.num_classes)
        check_dimensions(model, params.hessian, f"grid.model {name}")


if __name__ == "__main__":
    stage_entry(main, params="sweeps/params.yaml")
