"""DVC stage ``interpolate@<run>``: 1-D loss and accuracy along init -> final, a filter-normalised random direction,
the top Hessian eigenvector, and the path to the second-seed model (linear mode connectivity, with its barrier)."""

from pipeline.config import resolve_device
from pipeline.stage import stage_arguments, stage_entry


def main(argv=None):
    args, params = stage_arguments(
        __doc__,
        argv,
        "data",
        "checkpoints",
        "partner",
        "vectors",
        "tables",
        "figures",
        work=("artifacts/landscape/{run}/interpolate_tiles", "finished tiles (resume)"),
    )
    # torch-using modules after the params: a bad command line or params file ends in a fraction of a second
    from pipeline.data import require_prepared
    from pipeline.training.checkpoints import require_checkpoints

    params.run(args.run)
    resolve_device(params.landscape.device, "landscape.device")
    require_prepared(args.data)
    checkpoints, partner = args.checkpoints, args.partner
    require_checkpoints(checkpoints, args.run)
    require_checkpoints(partner, args.run, stage="partner")

    from pipeline.flows.runtime import configure_prefect

    configure_prefect(need_server=params.landscape.executor == "dask")
    from pipeline.flows.cluster import task_runner
    from pipeline.flows.landscape import interpolate_flow

    flow = interpolate_flow.with_options(task_runner=task_runner(params.landscape) or interpolate_flow.task_runner)
    flow(params, args.run, args.data, checkpoints, partner, args.vectors, args.tables, args.work, args.figures)


if __name__ == "__main__":
    stage_entry(main)
