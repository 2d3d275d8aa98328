"""DVC stage ``surface@<run>``: the 2-D loss surface around the final checkpoint (random, PCA or eigenvector plane),
on the probe set, tile by tile; optionally the |lambda_min / lambda_max| map on a coarse sub-grid."""

from pipeline.config import resolve_device
from pipeline.stage import stage_arguments, stage_entry


def main(argv=None):
    args, params = stage_arguments(
        __doc__,
        argv,
        "data",
        "checkpoints",
        "vectors",
        "tables",
        "figures",
        work=("artifacts/landscape/{run}/surface_tiles", "finished tiles (resume)"),
    )
    # torch-using modules after the params: a bad command line or params file ends in a fraction of a second
    from pipeline.data import require_prepared
    from pipeline.training.checkpoints import require_checkpoints

    params.run(args.run)
    resolve_device(params.landscape.device, "landscape.device")
    require_prepared(args.data)
    checkpoints = args.checkpoints
    require_checkpoints(checkpoints, args.run)

    from pipeline.flows.runtime import configure_prefect

    configure_prefect(need_server=params.landscape.executor == "dask")
    from pipeline.flows.cluster import task_runner
    from pipeline.flows.landscape import surface_flow

    flow = surface_flow.with_options(task_runner=task_runner(params.landscape) or surface_flow.task_runner)
    flow(params, args.run, args.data, checkpoints, args.vectors, args.tables, args.work, args.figures)


if __name__ == "__main__":
    stage_entry(main)
