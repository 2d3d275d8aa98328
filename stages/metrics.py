"""DVC stage ``metrics``: gather every run's headline numbers into ``reports/metrics.json``."""

import argparse
from pathlib import Path

from pipeline.stage import stage_entry
from pipeline.config import load_params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="validated before any work")
    parser.add_argument("--tables", type=Path, default=Path("reports/tables"))
    parser.add_argument("--out", type=Path, default=Path("reports/metrics.json"))
    args = parser.parse_args(argv)
    params = load_params(args.params)

    from pipeline.flows.runtime import configure_prefect
    configure_prefect()
    from pipeline.flows.metrics import metrics_flow
    metrics_flow(params, args.tables, args.out)


if __name__ == "__main__":
    stage_entry(main)
