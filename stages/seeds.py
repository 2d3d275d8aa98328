"""DVC stage ``seeds@<run>``: the run's ``repro.seeds`` seed replicates measured alike at their final checkpoints."""

from pipeline.config import resolve_device
from pipeline.stage import stage_arguments, stage_entry


def main(argv=None):
    args, params = stage_arguments(__doc__, argv, "data", "checkpoints", "partner", "seeds", "tables")
    # torch-using modules after the params: a bad command line or params file ends in a fraction of a second
    from pipeline.data import require_prepared

    params.run(args.run)  # an unknown run fails here, before any work
    resolve_device(params.train.device)
    resolve_device(params.hessian.device, "hessian.device")
    require_prepared(args.data)

    from pipeline.flows.runtime import configure_prefect

    configure_prefect()
    from pipeline.flows.seeds import seeds_flow

    seeds_flow(params, args.run, args.data, args.checkpoints, args.partner, args.seeds, args.tables)


if __name__ == "__main__":
    stage_entry(main)
