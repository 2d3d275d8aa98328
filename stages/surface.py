"""DVC stage ``surface@<run>``: the 2-D loss surface around the final checkpoint (random, PCA or eigenvector plane),
on the probe set, tile by tile; optionally the |lambda_min / lambda_max| map on a coarse sub-grid."""

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
    parser.add_argument("--vectors", type=Path, help="eigen plane; default: artifacts/hessian/<run>")
    parser.add_argument("--tables", type=Path, help="default: reports/tables/<run>")
    parser.add_argument("--work", type=Path, help="finished tiles (resume); default: artifacts/landscape/<run>/surface_tiles")
    parser.add_argument("--figures", type=Path, help="default: reports/figures/<run>")
    args, extra = parser.parse_known_args(argv)
    params = load_params(args.params)  # first: a bad run name split by the shell ends here, with the project's line
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    params.run(args.run)
    resolve_device(params.landscape.device, "landscape.device")
    require_prepared(args.data)
    checkpoints = args.checkpoints or Path("artifacts/checkpoints") / args.run
    require_checkpoints(checkpoints, args.run)

    from pipeline.flows.runtime import configure_prefect
    configure_prefect(need_server=params.landscape.executor == "dask")
    from pipeline.flows.landscape import surface_flow, task_runner
    flow = surface_flow.with_options(task_runner=task_runner(params.landscape) or surface_flow.task_runner)
    flow(params, args.run, args.data, checkpoints, args.vectors or Path("artifacts/hessian") / args.run,
         args.tables or Path("reports/tables") / args.run,
         args.work or Path("artifacts/landscape") / args.run / "surface_tiles",
         args.figures or Path("reports/figures") / args.run)


if __name__ == "__main__":
    stage_entry(main)
