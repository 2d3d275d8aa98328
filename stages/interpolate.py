"""DVC stage ``interpolate@<run>``: 1-D loss and accuracy along init -> final, a filter-normalised random direction,
the top Hessian eigenvector, and the path to the second-seed model (linear mode connectivity, with its barrier)."""

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
    parser.add_argument("--partner", type=Path, help="default: artifacts/partners/<run>")
    parser.add_argument("--vectors", type=Path, help="default: artifacts/hessian/<run>")
    parser.add_argument("--tables", type=Path, help="default: reports/tables/<run>")
    parser.add_argument("--work", type=Path, help="finished tiles (resume); default: artifacts/landscape/<run>/interpolate_tiles")
    parser.add_argument("--figures", type=Path, help="default: reports/figures/<run>")
    args, extra = parser.parse_known_args(argv)
    params = load_params(args.params)  # first: a bad run name split by the shell ends here, with the project's line
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    params.run(args.run)
    resolve_device(params.landscape.device, "landscape.device")
    require_prepared(args.data)
    checkpoints = args.checkpoints or Path("artifacts/checkpoints") / args.run
    partner = args.partner or Path("artifacts/partners") / args.run
    require_checkpoints(checkpoints, args.run)
    require_checkpoints(partner, args.run, stage="partner")

    from pipeline.flows.runtime import configure_prefect
    configure_prefect(need_server=params.landscape.executor == "dask")
    from pipeline.flows.landscape import interpolate_flow, task_runner
    flow = interpolate_flow.with_options(task_runner=task_runner(params.landscape) or interpolate_flow.task_runner)
    flow(params, args.run, args.data, checkpoints, partner, args.vectors or Path("artifacts/hessian") / args.run,
         args.tables or Path("reports/tables") / args.run,
         args.work or Path("artifacts/landscape") / args.run / "interpolate_tiles",
         args.figures or Path("reports/figures") / args.run)


if __name__ == "__main__":
    stage_entry(main)
