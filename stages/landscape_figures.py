"""DVC stage ``landscape_figures``: the runs' loss surfaces side by side on one colour scale, and their 1-D curves."""

import argparse
from pathlib import Path

from pipeline.stage import stage_entry
from pipeline.config import load_params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="validated before any work")
    parser.add_argument("--tables", type=Path, default=Path("reports/tables"))
    parser.add_argument("--out", type=Path, default=Path("reports/figures"))
    args = parser.parse_args(argv)
    params = load_params(args.params)

    from pipeline.flows.runtime import configure_prefect
    configure_prefect()
    from pipeline.flows.landscape import landscape_figures_flow
    landscape_figures_flow(params, args.tables, args.out)


if __name__ == "__main__":
    stage_entry(main)
