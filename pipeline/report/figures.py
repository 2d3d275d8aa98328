"""The report's overview figures: training curves, sharpness, the tracked dynamics and the spectra of every run
side by side (PNG, offline, written atomically)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")  # no display: figures are files

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.io import save_figure  # noqa: E402
from pipeline.report.summary import RunData


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def epoch_rows(history: pd.DataFrame) -> pd.DataFrame:
    rows = history[history.scope == "epoch"] if "scope" in history else history
    return rows.sort_values("epoch")


def plot_training_curves(runs: Mapping[str, RunData], path: str | Path) -> Path:
    """Train (solid) and test (dashed) loss on a log scale, and test accuracy, over epochs; one colour per run."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    drawn = 0
    for i, (name, data) in enumerate(runs.items()):
        history = data.tables.get("train_history")
        if history is None or history.empty:
            continue
        rows = epoch_rows(history)
        color = f"C{i % 10}"
        finite = lambda s: s.where(np.isfinite(s) & (s > 0))  # noqa: E731 (log scale: gaps, not zeros)
        ax_loss.plot(rows.epoch, finite(rows.train_loss), "-", color=color, label=f"{name} train")
        ax_loss.plot(rows.epoch, finite(rows.test_loss), "--", color=color, label=f"{name} test")
        ax_acc.plot(rows.epoch, rows.test_accuracy, "-", color=color, label=name)
        drawn += 1
    if not drawn:
        _empty(ax_loss, "no training history")
        _empty(ax_acc, "no training history")
    else:
        ax_loss.set_yscale("log")
        ax_loss.set(xlabel="epoch", ylabel="cross-entropy (nats)", title="loss: train (solid), test (dashed)")
        ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
        for ax in (ax_loss, ax_acc):
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    return save_figure(fig, path)


def eigen_rows(spectrum: pd.DataFrame, quantity: str = "eigenvalue") -> pd.DataFrame:
    s = spectrum
    return s[(s.operator == "hessian") & (s.group == "all") & (s.quantity == quantity)]


def plot_sharpness_overview(runs: Mapping[str, RunData], path: str | Path) -> Path:
    """λmax over the checkpoints for every run, each against its own stability bound 2/η (thin line, same colour)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = 0
    bounds: dict[tuple, list[tuple[str, str]]] = {}
    for i, (name, data) in enumerate(runs.items()):
        spectrum = data.tables.get("hessian_spectrum")
        if spectrum is None or spectrum.empty:
            continue
        top = eigen_rows(spectrum).query("index == 0").sort_values("epoch")
        if top.empty:
            continue
        color = f"C{i % 10}"
        ax.plot(top.epoch, top.value.where(top.value > 0), "o-", ms=3, color=color, label=rf"{name} $\lambda_{{max}}$")
        bound = top[top.lr > 0]
        if len(bound):
            bounds.setdefault(tuple(zip(bound.epoch.tolist(), bound.lr.tolist())), []).append((name, color))
        drawn += 1
    for schedule, owners in bounds.items():  # runs with the same schedule share one line
        epochs, lrs = np.array(schedule).T
        shared = len(owners) > 1 or len(bounds) == 1
        ax.plot(
            epochs,
            2.0 / lrs,
            "-",
            lw=1,
            color="k" if shared else owners[0][1],
            alpha=0.8,
            label=r"$2/\eta$" + ("" if len(bounds) == 1 else " (" + ", ".join(n for n, _ in owners) + ")"),
        )
    if not drawn:
        _empty(ax, "no Hessian spectrum")
    else:
        ax.set_yscale("log")
        ax.set(
            xlabel="epoch", ylabel="curvature", title=r"sharpness $\lambda_{max}$ against the stability bound $2/\eta$"
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def plot_tracked_sharpness(tables: Mapping[str, pd.DataFrame], path: str | Path, *, title: str = "") -> Path:
    """The ``sharpness_history`` tables of some runs (``{run: frame}``), two panels.

    Left: tracked λmax (solid), the curvature along the gradient g'Hg/|g|² (dotted) and the batch sharpness
    E_B[g_B'H_B g_B/|g_B|²] over fixed mini-batches (dash-dot; Andreyev & Beneventano 2024) over the steps, each
    run against its optimiser's stability threshold (dashed; 2/η for plain gradient descent, (2+2β)/η with
    momentum). For Adam, the preconditioned sharpness λmax(P⁻¹H) (solid with dots) against its threshold
    (2+2β₁)/((1−β₁)η) (dashed; Cohen et al. 2022). Tables from before a column existed draw without it.
    Right: how well the quadratic model predicts the change of the probe loss over one step, as
    |actual − predicted| / |first-order term|, against η·λmax/2 (1 = the edge of stability).
    """
    fig, (ax_sharp, ax_model) = plt.subplots(1, 2, figsize=(11, 4))
    drawn, spans, edges = 0, [], []
    # (label, schedule) -> runs: runs with the same threshold over the same steps share one line
    thresholds: dict[tuple[str, tuple], list[tuple[str, str]]] = {}
    positive = lambda s: s.where(np.isfinite(s) & (s > 0))  # noqa: E731 (log scale: gaps, not zeros)
    for i, (name, frame) in enumerate(tables.items()):
        if frame is None or frame.empty:
            continue
        rows = frame.sort_values("step")
        color = f"C{i % 10}"
        ax_sharp.plot(
            rows.step, positive(rows.lambda_max), "-", color=color, lw=1.2, label=rf"{name} $\lambda_{{max}}$"
        )
        ax_sharp.plot(
            rows.step, positive(rows.grad_sharpness), ":", color=color, lw=1, label=rf"{name} $g^\top Hg/\|g\|^2$"
        )
        curves = [rows.lambda_max]
        batch = rows.get("batch_sharpness")
        if batch is not None and positive(batch).notna().any():
            ax_sharp.plot(
                rows.step,
                positive(batch),
                "-.",
                color=color,
                lw=1.2,
                label=f"{name} batch sharpness",
            )
            curves.append(batch)
        preconditioned = rows.get("preconditioned_sharpness")
        if preconditioned is not None and positive(preconditioned).notna().any():
            ax_sharp.plot(
                rows.step,
                positive(preconditioned),
                ".-",
                ms=3,
                color=color,
                lw=1.2,
                label=rf"{name} $\lambda_{{max}}(P^{{-1}}H)$",
            )
            curves.append(preconditioned)
        threshold = rows.stability_threshold.where(np.isfinite(rows.stability_threshold))
        if threshold.notna().any():
            momentum = not np.allclose(threshold.dropna(), rows.two_over_lr[threshold.notna()], rtol=1e-9)
            label = r"$(2+2\beta)/\eta$" if momentum else r"$2/\eta$"
            key = tuple(zip(rows.step.tolist(), threshold.round(12).tolist()))
            thresholds.setdefault((label, key), []).append((name, color))
        adam = rows.get("preconditioned_threshold")
        adam = adam.where(np.isfinite(adam)) if adam is not None else pd.Series(np.nan, index=rows.index)
        if adam.notna().any():
            key = tuple(zip(rows.step.tolist(), adam.round(12).tolist()))
            thresholds.setdefault((r"$(2+2\beta_1)/((1-\beta_1)\eta)$", key), []).append((name, color))
        spans += [
            float(v) for series in (*curves, threshold, adam) for v in (series.min(), series.max()) if math.isfinite(v)
        ]
        relative = (rows.model_error.abs() / rows.first_order.abs()).where(rows.first_order.abs() > 0)
        edge = rows.lr * rows.lambda_max / 2.0
        edges += [float(v) for v in edge if math.isfinite(v) and v > 0]
        ax_model.scatter(edge, positive(relative), s=8, color=color, alpha=0.7, label=name)
        drawn += 1
    for (label, schedule), owners in thresholds.items():
        steps, values = np.array(schedule, dtype=float).T
        shared = len(owners) > 1 or len(thresholds) == 1
        ax_sharp.plot(
            steps,
            values,
            "--",
            lw=1,
            color="k" if shared else owners[0][1],
            alpha=0.8,
            label=label + ("" if len(thresholds) == 1 else " (" + ", ".join(n for n, _ in owners) + ")"),
        )
    if not drawn:
        _empty(ax_sharp, "no tracked sharpness (train.track_sharpness_every: 0)")
        _empty(ax_model, "no tracked steps")
    else:
        positive_spans = [v for v in spans if v > 0]
        if positive_spans and max(positive_spans) > 30 * min(positive_spans):  # linear shows "at 2/η" best
            ax_sharp.set_yscale("log")
        else:
            ax_sharp.set_ylim(bottom=0, top=1.15 * max(spans + [1e-12]))
        ax_sharp.set(
            xlabel="step",
            ylabel="curvature",
            title=title or "tracked sharpness against the stability threshold",
        )
        ax_model.set_yscale("log")
        if edges and max(edges) > 30 * min(edges):
            ax_model.set_xscale("log")
        ax_model.axvline(1.0, color="k", lw=1, ls="--")
        ax_model.set(
            xlabel=r"$\eta\,\lambda_{max}/2$ (1: edge of stability)",
            ylabel=r"$|\Delta L - \Delta L_{quad}|\,/\,|g^\top\Delta\theta|$",
            title="quadratic model of the step taken: relative error",
        )
        for ax in (ax_sharp, ax_model):
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_dynamics_overview(runs: Mapping[str, RunData], path: str | Path) -> Path:
    """:func:`plot_tracked_sharpness` of every run that tracked its sharpness during training."""
    return plot_tracked_sharpness({name: data.tables.get("sharpness_history") for name, data in runs.items()}, path)


def plot_spectra_overview(runs: Mapping[str, RunData], path: str | Path) -> Path:
    """Left: the top-k Hessian eigenvalues at the final checkpoint. Right: the spectral densities (SLQ, final
    checkpoint) of every run on one log-density axis."""
    fig, (ax_top, ax_density) = plt.subplots(1, 2, figsize=(11, 4))
    top_drawn = density_drawn = 0
    for i, (name, data) in enumerate(runs.items()):
        color = f"C{i % 10}"
        spectrum = data.tables.get("hessian_spectrum")
        if spectrum is not None and not spectrum.empty:
            eig = eigen_rows(spectrum)
            if len(eig):
                last = eig[eig.epoch == eig.epoch.max()].sort_values("index")
                ax_top.plot(
                    last["index"] + 1, last.value, "o-", color=color, label=f"{name} (epoch {last.epoch.iloc[0]})"
                )
                top_drawn += 1
        density = data.tables.get("hessian_density")
        if density is not None and not density.empty:
            smooth = density[(density.kind == "smoothed") & (density.operator == "hessian")]
            if len(smooth):
                smooth = smooth[smooth.epoch == smooth.epoch.max()]
                floor = 1e-12 * max(float(smooth.density.max()), 1e-300)
                ax_density.plot(smooth["lambda"], np.maximum(smooth.density, floor), color=color, lw=1, label=name)
                density_drawn += 1
    if top_drawn:
        ax_top.set_yscale("symlog", linthresh=1e-3)
        ax_top.set(xlabel="rank k", ylabel=r"$\lambda_k$", title="top Hessian eigenvalues, final checkpoint")
        ax_top.grid(True, alpha=0.3)
        ax_top.legend(fontsize=7)
    else:
        _empty(ax_top, "no Hessian spectrum")
    if density_drawn:
        ax_density.set_yscale("log")
        ax_density.set(
            xlabel=r"eigenvalue $\lambda$",
            ylabel="density (smoothed)",
            title="spectral density (stochastic Lanczos quadrature)",
        )
        ax_density.grid(True, alpha=0.3)
        ax_density.legend(fontsize=7)
    else:
        _empty(ax_density, "no spectral density")
    return save_figure(fig, path)
