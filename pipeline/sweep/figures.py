"""The sweep's figure: each measure against the generalisation gap, coloured by batch size, one marker per model,
with Kendall's tau in the panel titles (:func:`plot_sweep`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display: figures are files

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from pipeline.io import save_figure  # noqa: E402
from pipeline.metrics import BY_NAME, MEASURE_NAMES
from pipeline.sweep.stats import TARGETS, check_frame, check_target, completed_rows, kendall_table

CMAP = "viridis"


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


NO_BATCH_COLOUR = "0.55"


def _note(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.35")


def _batch_colours(batch: pd.Series, norm) -> np.ndarray:
    cmap = plt.get_cmap(CMAP)
    colours = np.tile(matplotlib.colors.to_rgba(NO_BATCH_COLOUR), (len(batch), 1))
    values = batch.to_numpy(dtype=float)
    known = np.isfinite(values) & (values > 0)
    if norm is not None and known.any():
        colours[known] = cmap(norm(values[known]))
    return colours


def _log_x(ax, x: np.ndarray) -> None:
    """Log x axis with plain labels ("2", "0.04"); minor ticks at 2, 3, 5 per decade are labelled too when the data
    span less than a decade (else the axis could show a single label)."""
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:.4g}")
    ax.xaxis.set_major_formatter(plain)
    if math.log10(x.max() / x.min()) < 1:
        ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0)))
        ax.xaxis.set_minor_formatter(plain)
    else:
        ax.xaxis.set_minor_formatter(NullFormatter())


def _format_tau(tau: float, p_value: float, n: int) -> str:
    if math.isnan(tau):
        return f"τ undefined (n = {n})"
    return f"τ = {tau:+.2f}, p = {p_value:.2g}, n = {n}"


def plot_sweep(
    frame: pd.DataFrame,
    path: str | Path,
    *,
    target: str = "generalization_gap",
    measures: Sequence[str] | None = None,
    kendall: pd.DataFrame | None = None,
    ncols: int = 4,
) -> Path:
    """A grid of scatter plots, one panel per measure: the measure (log x when all its values are positive)
    against ``target`` over the completed runs; colour = batch size (log scale), marker = model; the title gives
    Kendall's tau, p and n. A panel with no finite value, or a single point, says so.

    Args:
        frame: rows of :func:`sweep_rows`.
        path: the PNG to write (atomically).
        measures: the panels (default: the measures of :data:`MEASURE_NAMES` with at least one finite value in
            ``frame``; all of them when none has one).
        kendall: a :func:`kendall_table` of the same frame and target (computed when None).

    Returns:
        ``path``.
    """
    check_target(target)
    if measures is None:  # the measures with a number somewhere (all of them when none has: each panel says so)
        present = [m for m in MEASURE_NAMES if m in frame.columns]
        measures = [m for m in present if np.isfinite(frame[m].to_numpy(dtype=float)).any()] or present
    check_frame(frame, ["status", "model", "batch_size", target, *measures])
    if not measures:
        raise ValueError("plot_sweep: no measure to plot")
    if kendall is None:
        kendall = kendall_table(frame, target, measures=measures)
    stats = kendall.set_index("measure")
    rows = completed_rows(frame, [target])
    model_of = rows["model"].map(lambda m: "?" if m is None or (isinstance(m, float) and math.isnan(m)) else str(m))
    models = sorted(set(model_of))
    marker_of = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(models)}
    batch = rows["batch_size"].to_numpy(dtype=float)
    batch = batch[np.isfinite(batch) & (batch > 0)]
    norm = None
    if batch.size:
        low, high = float(batch.min()), float(batch.max())
        norm = LogNorm(low, high) if high > low else LogNorm(low / 2, high * 2)

    ncols = max(1, min(ncols, len(measures)))
    nrows = math.ceil(len(measures) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.8 * ncols, 3.2 * nrows), squeeze=False, layout="constrained")
    for ax, name in zip(axes.flat, measures):
        measure = BY_NAME.get(name)
        label = measure.label if measure else name
        x = rows[name].to_numpy(dtype=float)
        y = rows[target].to_numpy(dtype=float)
        finite = np.isfinite(x) & np.isfinite(y)
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel(TARGETS[target][1], fontsize=7)
        ax.tick_params(which="both", labelsize=7)
        tau, p_value, n = (
            stats.loc[name, ["tau", "p_value", "n"]] if name in stats.index else (math.nan, math.nan, int(finite.sum()))
        )
        ax.set_title(f"{label}\n{_format_tau(float(tau), float(p_value), int(n))}", fontsize=8)
        if not finite.any():
            _note(ax, "no finite values" if len(rows) else "no completed runs")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        colours = _batch_colours(rows["batch_size"], norm)
        for model in models:
            pick = finite & (model_of.to_numpy() == model)
            if pick.any():
                ax.scatter(
                    x[pick], y[pick], c=colours[pick], marker=marker_of[model], s=36, edgecolors="k", linewidths=0.5
                )
        if np.all(x[finite] > 0) and x[finite].max() > x[finite].min():
            _log_x(ax, x[finite])
        if finite.sum() < 2:
            ax.text(0.5, 0.08, "one run: no correlation", ha="center", transform=ax.transAxes, fontsize=8, color="0.35")
    for ax in list(axes.flat)[len(measures) :]:
        ax.set_visible(False)
    if norm is not None:
        bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=CMAP), ax=axes, shrink=0.7)
        bar.set_label("batch size (samples per step)", fontsize=8)
        bar.ax.tick_params(which="both", labelsize=7)
        ticks = np.unique(batch)
        if ticks.size <= 8:
            bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
            bar.ax.yaxis.set_minor_formatter(NullFormatter())
    handles = [Line2D([], [], marker=marker_of[m], ls="none", mfc="0.8", mec="k", label=m) for m in models]
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=min(len(handles), 6),
        fontsize=8,
        title="model",
        title_fontsize=8,
    )
    excluded = len(frame) - len(rows)
    fig.suptitle(
        f"Flatness vs {TARGETS[target][1]}: {len(rows)} completed run(s)"
        + (f", {excluded} excluded (not completed or no gap)" if excluded else ""),
        fontsize=10,
    )
    return save_figure(fig, path)
