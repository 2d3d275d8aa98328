"""DVC stage ``landscape_figures``: the runs' loss surfaces side by side on one colour scale, and their 1-D curves."""

from pipeline.stage import stage_arguments, stage_entry


def main(argv=None):
    args, params = stage_arguments(
        __doc__,
        argv,
        run=False,
        tables=("reports/tables", "one folder per run"),
        out=("reports/figures", "where the side-by-side figures go"),
    )

    from pipeline.flows.runtime import configure_prefect

    configure_prefect()
    from pipeline.flows.landscape_figures import landscape_figures_flow

    landscape_figures_flow(params, args.tables, args.out)


if __name__ == "__main__":
    stage_entry(main)
