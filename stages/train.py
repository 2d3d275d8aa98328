"""DVC stage ``train@<run>``: train one run, resuming from its persisted checkpoints when they match."""

import argparse
from pathlib import Path

from pipeline.stage import stage_entry
from pipeline.config import check_run_batch_size, load_params, read_prepared_meta, resolve_device


def main(argv=None):
    from pipeline.data import require_prepared
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="validated before any work")
    parser.add_argument("--run", required=True, help="a key of `runs` in params.yaml")
    parser.add_argument("--data", type=Path, default=Path("artifacts/data"))
    parser.add_argument("--checkpoints", type=Path, help="default: artifacts/checkpoints/<run>")
    parser.add_argument("--tables", type=Path, help="default: reports/tables/<run>")
    args, extra = parser.parse_known_args(argv)
    params = load_params(args.params)  # first: a bad run name split by the shell ends here, with the project's line
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    resolve_device(params.run(args.run).train.device)  # unknown run or absent accelerator: fail before any work
    require_prepared(args.data)
    meta = read_prepared_meta(args.data)  # the split size, without loading data.pt: a too-large batch fails here
    check_run_batch_size(params, args.run, meta["n_train"], meta.get("name", "the prepared data"))
    checkpoints = args.checkpoints or Path("artifacts/checkpoints") / args.run
    tables = args.tables or Path("reports/tables") / args.run

    from pipeline.flows.runtime import configure_prefect
    configure_prefect()
    from pipeline.flows.stages import train_flow
    train_flow(params, args.run, args.data, checkpoints, tables / "train_history.parquet",
               tables / "train_metrics.json", tables / "sharpness_history.parquet")


if __name__ == "__main__":
    stage_entry(main)
