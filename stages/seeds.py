"""DVC stage ``seeds@<run>``: the run's ``repro.seeds`` seed replicates measured alike at their final checkpoints."""

import argparse
from pathlib import Path

from pipeline.config import load_params, resolve_device
from pipeline.stage import stage_entry


def main(argv=None):
    # imported inside main: the stage wrapper pins the CPU kernels before torch is imported (pipeline.repro)
    from pipeline.data import require_prepared

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="validated before any work")
    parser.add_argument("--run", required=True, help="a key of `runs` in params.yaml")
    parser.add_argument("--data", type=Path, default=Path("artifacts/data"))
    parser.add_argument("--checkpoints", type=Path, required=True, help="the run's checkpoints (train@<run>)")
    parser.add_argument("--partner", type=Path, required=True, help="the partner's checkpoints (partner@<run>)")
    parser.add_argument("--seeds", type=Path, required=True, help="checkpoints of the other seeds (kept across runs)")
    parser.add_argument("--tables", type=Path, required=True, help="seeds.parquet and seeds_metrics.json")
    args = parser.parse_args(argv)
    params = load_params(args.params)
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
