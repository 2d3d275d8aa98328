"""The ``landscape_figures`` stage flow: every run's surface and 1-D scans side by side (reads the scan tables only)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import get_run_logger

from pipeline.config import Params
from pipeline.errors import DataError
from pipeline.flows.chain import pipeline_flow
from pipeline.io import plot_placeholder
from pipeline.landscape.figures import (
    plot_connectivity_side_by_side,
    plot_interpolations_side_by_side,
    plot_surfaces_side_by_side,
)


@pipeline_flow(name="landscape-figures", flow_run_name="landscape-figures")
def landscape_figures_flow(params: Params, tables_dir: Path, out_dir: Path) -> dict:
    """The runs side by side: surfaces on one colour scale, 1-D curves along the random direction, and the
    mode-connectivity paths (naive, aligned, with statistics reset or repaired) one column per run."""
    logger = get_run_logger()
    surfaces, lines = {}, []
    for run in params.runs:
        folder = Path(tables_dir) / run.name
        missing = [name for name in ("surface_2d.parquet", "interpolation_1d.parquet") if not (folder / name).is_file()]
        if missing:
            raise DataError(
                f"{folder / missing[0]}: missing; run `dvc repro surface@{run.name} interpolate@{run.name}` first"
            )
        surface, line = (pd.read_parquet(folder / name) for name in ("surface_2d.parquet", "interpolation_1d.parquet"))
        if surface.empty or line.empty:  # a diverged run: said in its own figures and metrics
            logger.warning("%s: no scan (diverged run); left out of the side-by-side figures", run.name)
            continue
        surfaces[run.name] = surface
        lines.append(line)
    out_dir = Path(out_dir)
    figures = {
        "surfaces": out_dir / "surfaces.png",
        "random": out_dir / "interpolations_random.png",
        "partner": out_dir / "interpolations_partner.png",
    }
    if not surfaces:
        for path in figures.values():
            plot_placeholder(path, run="all runs", message="no run has a finite landscape")
        return {k: str(v) for k, v in figures.items()}
    written = {"surfaces": str(plot_surfaces_side_by_side(surfaces, figures["surfaces"]))}
    table = pd.concat(lines, ignore_index=True)
    written["random"] = str(plot_interpolations_side_by_side(table, figures["random"], path_kind="random"))
    written["partner"] = str(plot_connectivity_side_by_side(table, figures["partner"]))
    logger.info("figures: %s", ", ".join(written.values()))
    return written
