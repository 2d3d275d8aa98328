"""The ``report`` flow: the summary of all runs as ``reports/index.html`` and ``reports/README.md``, the JSON data of
``dvc plots``, and the summary as Prefect table and markdown artifacts (shown on the flow run's page in the UI).

Tasks: reading the tables, one per overview figure, the plot exports, and writing the two documents.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger

from pipeline.config import Params
from pipeline.errors import DataError
from pipeline.flows.chain import pipeline_flow
from pipeline.flows.common import markdown_artifact, table_artifact, unit_of_work
from pipeline.io import plot_placeholder
from pipeline.provenance import git_revision
from pipeline.report.claims import reparam_rows, report_claims
from pipeline.report.exports import write_plot_exports
from pipeline.report.figures import (
    plot_dynamics_overview,
    plot_sharpness_overview,
    plot_spectra_overview,
    plot_training_curves,
)
from pipeline.report.render import render_html, render_markdown, summary_markdown, write_text
from pipeline.report.summary import (
    Report,
    comparison_rows,
    connectivity_rows,
    fill_from_config,
    library_versions,
    load_runs,
    provenance_rows,
    recorded_settings,
    seed_rows,
    summary_rows,
)

# Figures of the landscape_figures stage shown in the report: (file in the figures folder, title, caption).
LANDSCAPE_FIGURES = (
    (
        "surfaces.png",
        "Loss surfaces side by side",
        "Probe-set loss over a 2-D plane through each trained model (×), on one logarithmic colour scale; ★ is the "
        "grid minimum.",
    ),
    (
        "interpolations_random.png",
        "1-D: a filter-normalised random direction",
        "Loss along θ + α·d with d filter-normalised (Li et al. 2018), train and test splits.",
    ),
    (
        "interpolations_partner.png",
        "Mode connectivity: paths to the second-seed model",
        "Linear paths from each run (t = 0) to the same architecture trained from another seed (t = 1): naive; "
        "with the second model's units permuted to the first's (landscape.align: weight or activation matching); "
        "and, on the aligned path, with BatchNorm statistics recomputed at every point (reset) or every channel's "
        "mean and standard deviation set to the endpoints' interpolation (REPAIR, Jordan et al. 2023). Loss above "
        "(train solid, test dashed), test accuracy below.",
    ),
)


@unit_of_work(task_run_name="read-tables")
def read_tables(tables_dir: Path, runs: tuple[str, ...]):
    return load_runs(tables_dir, runs)


@unit_of_work(task_run_name="figure-{name}")
def make_figure(name: str, runs, path: Path) -> Path:
    plot = {
        "training": plot_training_curves,
        "sharpness": plot_sharpness_overview,
        "spectra": plot_spectra_overview,
        "dynamics": plot_dynamics_overview,
    }
    return plot[name](runs, path)


@unit_of_work(task_run_name="plot-exports")
def make_exports(runs, out_dir: Path) -> list[Path]:
    return write_plot_exports(runs, out_dir)


@unit_of_work(task_run_name="write-documents")
def write_documents(report: Report, out_dir: Path) -> tuple[Path, Path]:
    return (
        write_text(out_dir / "index.html", render_html(report)),
        write_text(out_dir / "README.md", render_markdown(report, out_dir)),
    )


@pipeline_flow(name="report", flow_run_name="report")
def report_flow(
    params: Params,
    metrics_path: Path,
    tables_dir: Path,
    figures_dir: Path,
    overview_dir: Path,
    plots_dir: Path,
    out_dir: Path,
) -> dict:
    """Write ``<out_dir>/index.html`` and ``<out_dir>/README.md`` from ``metrics.json`` and the tables."""
    logger = get_run_logger()
    names = tuple(run.name for run in params.runs)
    if not Path(metrics_path).is_file():
        raise DataError(f"{metrics_path}: missing; run `dvc repro metrics` first")
    metrics = json.loads(Path(metrics_path).read_text())
    runs = read_tables(tables_dir, names)
    summary = summary_rows(metrics, names)
    fill_from_config(summary, runs)

    overview = [
        (
            "training",
            "Training curves",
            "Train (solid) and test (dashed) cross-entropy, and test accuracy, at the end of every epoch.",
        ),
        (
            "sharpness",
            "Sharpness during training",
            "Top Hessian eigenvalue of the probe-set loss at every "
            "checkpoint against 2/η of the learning rate in effect (Cohen et al. 2021).",
        ),
        (
            "dynamics",
            "Sharpness tracked during training",
            "Left: λmax (Lanczos, warm-started from the "
            "previous eigenvector) and the curvature along the gradient at the tracked steps "
            "(train.track_sharpness_every), against the optimiser's stability threshold. Right: relative error of "
            "the quadratic model of each tracked step, against η·λmax/2.",
        ),
        (
            "spectra",
            "Hessian spectra",
            "Top eigenvalues (Lanczos) and spectral density (stochastic Lanczos quadrature) at the final checkpoint.",
        ),
    ]
    figures = [
        (title, make_figure(name, runs, Path(overview_dir) / f"{name}.png"), caption)
        for name, title, caption in overview
    ]
    for file, title, caption in LANDSCAPE_FIGURES:
        path = Path(figures_dir) / file
        if not path.is_file():  # the report still builds; the gap is visible in it
            logger.warning("%s: missing; run `dvc repro landscape_figures` (a placeholder is shown)", path)
            path = plot_placeholder(
                Path(overview_dir) / f"missing_{file}",
                run="all runs",
                message=f"{file} missing: run `dvc repro landscape_figures`",
            )
        figures.append((title, path, caption))

    exports = make_exports(runs, plots_dir)
    report = Report(
        summary=summary,
        figures=figures,
        provenance=provenance_rows(runs),
        settings=recorded_settings(runs),
        revision=git_revision(),
        libraries=library_versions(),
        exports=exports,
        seeds=seed_rows(metrics, names),
        comparisons=comparison_rows(metrics),
        connectivity=connectivity_rows(metrics, names),
        reparam=reparam_rows(metrics, names),
        claims=report_claims(
            metrics,
            {name: runs[name].metadata.get("train_history", {}).get("run", {}) for name in names if name in runs},
            {name: runs[name].tables.get("sharpness_history") for name in names if name in runs},
        ),
    )
    index, readme = write_documents(report, Path(out_dir))

    markdown = summary_markdown(summary)
    markdown_artifact(
        markdown=f"# Loss-landscape report\n\nRevision `{report.revision}`\n\n{markdown}\n\nFull report: `{index}`",
        key="report-summary",
        description="Summary of all runs (the table of reports/index.html)",
    )
    table_artifact(
        [{k: v for k, v in row.items()} for row in summary], key="report-table", description="Summary of all runs"
    )
    for row in summary:
        if row["status"] != "completed":
            logger.warning("%s: %s", row["run"], row["status"])
    logger.info(
        "report: %s and %s (%d figures, %d JSON exports for dvc plots)", index, readme, len(figures), len(exports)
    )
    return {"index": str(index), "readme": str(readme), "summary": summary}
