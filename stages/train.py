"""DVC stage ``train@<run>``: train one run, resuming from its persisted checkpoints when they match."""

from pipeline.config import check_run_batch_size, read_prepared_meta, resolve_device
from pipeline.stage import stage_arguments, stage_entry


def main(argv=None):
    args, params = stage_arguments(__doc__, argv, "data", "checkpoints", "tables", "live")
    # torch-using modules after the params: a bad command line or params file ends in a fraction of a second
    from pipeline.data import require_prepared

    resolve_device(params.run(args.run).train.device)  # unknown run or absent accelerator: fail before any work
    require_prepared(args.data)
    meta = read_prepared_meta(args.data)  # the split size, without loading data.pt: a too-large batch fails here
    check_run_batch_size(params, args.run, meta["n_train"], meta.get("name", "the prepared data"))
    checkpoints, tables = args.checkpoints, args.tables

    from pipeline.flows.runtime import configure_prefect

    configure_prefect()
    from pipeline.flows.train import train_flow

    train_flow(
        params,
        args.run,
        args.data,
        checkpoints,
        tables / "train_history.parquet",
        tables / "train_metrics.json",
        tables / "sharpness_history.parquet",
        args.live,
    )


if __name__ == "__main__":
    stage_entry(main)
