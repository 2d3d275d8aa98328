"""DVC stage ``report``: ``reports/index.html`` (self-contained) and ``reports/README.md`` from the metrics and
tables of every run, plus the JSON data that ``dvc plots show`` and ``dvc plots diff`` draw."""

import argparse
from pathlib import Path

from pipeline.stage import stage_entry
from pipeline.config import load_params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="validated before any work")
    parser.add_argument("--metrics", type=Path, default=Path("reports/metrics.json"))
    parser.add_argument("--tables", type=Path, default=Path("reports/tables"))
    parser.add_argument("--figures", type=Path, default=Path("reports/figures"),
                        help="folder of the landscape_figures stage's side-by-side figures")
    parser.add_argument("--overview", type=Path, default=Path("reports/figures/overview"),
                        help="where this stage writes its own figures")
    parser.add_argument("--plots", type=Path, default=Path("reports/plots"), help="JSON exports for dvc plots")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="folder of index.html and README.md")
    args = parser.parse_args(argv)
    params = load_params(args.params)

    from pipeline.flows.runtime import configure_prefect
    configure_prefect()
    from pipeline.flows.report import report_flow
    report_flow(params, args.metrics, args.tables, args.figures, args.overview, args.plots, args.out)


if __name__ == "__main__":
    stage_entry(main)
