"""The ``prepare`` flow: load, split and standardise the dataset, fix the probe subset."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger

from pipeline.config import Params
from pipeline.data import prepare_dataset, save_prepared
from pipeline.flows.chain import pipeline_flow
from pipeline.flows.common import unit_of_work


@pipeline_flow(name="prepare", flow_run_name="prepare-{params.data.dataset}")
def prepare_flow(params: Params, out_dir: Path) -> dict:
    """Load, split and standardise the dataset; fix the probe subset; write ``out_dir``."""
    logger = get_run_logger()
    data = unit_of_work(prepare_dataset, name="load-and-split")(params.data)
    unit_of_work(save_prepared, name="write-prepared")(data, out_dir)
    meta = json.loads((Path(out_dir) / "meta.json").read_text())
    logger.info(
        "%s: %d train, %d test, probe %d, input %s, %d classes",
        data.name,
        len(data.y_train),
        len(data.y_test),
        len(data.probe_index),
        data.input_shape,
        data.num_classes,
    )
    return meta
