"""DVC stage ``report``: ``reports/index.html`` (self-contained) and ``reports/README.md`` from the metrics and
tables of every run, plus the JSON data that ``dvc plots show`` and ``dvc plots diff`` draw."""

from pipeline.stage import stage_arguments, stage_entry


def main(argv=None):
    args, params = stage_arguments(
        __doc__,
        argv,
        "metrics",
        run=False,
        tables=("reports/tables", "one folder per run"),
        figures=("reports/figures", "folder of the landscape_figures stage's side-by-side figures"),
        overview=("reports/figures/overview", "where this stage writes its own figures"),
        plots=("reports/plots", "JSON exports for dvc plots"),
        out=("reports", "folder of index.html and README.md"),
    )

    from pipeline.flows.runtime import configure_prefect

    configure_prefect()
    from pipeline.flows.report import report_flow

    report_flow(params, args.metrics, args.tables, args.figures, args.overview, args.plots, args.out)


if __name__ == "__main__":
    stage_entry(main)
