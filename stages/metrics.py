"""DVC stage ``metrics``: gather every run's headline numbers into ``reports/metrics.json``."""

from pipeline.stage import STAGE_PATHS, stage_arguments, stage_entry


def main(argv=None):
    args, params = stage_arguments(
        __doc__, argv, run=False, tables=("reports/tables", "one folder per run"), out=STAGE_PATHS["metrics"]
    )

    from pipeline.flows.runtime import configure_prefect

    configure_prefect()
    from pipeline.flows.metrics import metrics_flow

    metrics_flow(params, args.tables, args.out)


if __name__ == "__main__":
    stage_entry(main)
