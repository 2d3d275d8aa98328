"""DVC stage ``prepare``: dataset -> split, standardisation statistics and probe subset under ``--out``."""

import argparse
from pathlib import Path

from pipeline.stage import stage_entry
from pipeline.config import load_params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="validated before any work")
    parser.add_argument("--out", type=Path, default=Path("artifacts/data"))
    args = parser.parse_args(argv)
    params = load_params(args.params)

    from pipeline.flows.runtime import configure_prefect
    configure_prefect()
    from pipeline.flows.prepare import prepare_flow
    prepare_flow(params, args.out)


if __name__ == "__main__":
    stage_entry(main)
