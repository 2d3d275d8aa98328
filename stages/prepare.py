"""DVC stage ``prepare``: dataset -> split, standardisation statistics and probe subset under ``--out``."""

from pipeline.stage import STAGE_PATHS, stage_arguments, stage_entry


def main(argv=None):
    args, params = stage_arguments(__doc__, argv, run=False, out=STAGE_PATHS["data"])

    from pipeline.flows.runtime import configure_prefect

    configure_prefect()
    from pipeline.flows.prepare import prepare_flow

    prepare_flow(params, args.out)


if __name__ == "__main__":
    stage_entry(main)
