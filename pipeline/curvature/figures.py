"""The ``hessian`` stage's figures from its tables: sharpness over checkpoints against the stability bound, the
top of the spectrum, and the spectral density (PNG, offline, written atomically)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: figures are files

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.io import save_figure


def _select(spectrum: pd.DataFrame, operator="hessian", group="all", quantity="eigenvalue") -> pd.DataFrame:
    s = spectrum
    return s[(s.operator == operator) & (s.group == group) & (s.quantity == quantity)]


def plot_sharpness(spectrum: pd.DataFrame, path: str | Path, *, run: str, momentum: float = 0.0) -> None:
    """λmax of the Hessian over the checkpoints against the stability bound 2/η of the learning rate in effect.

    Gradient descent on a quadratic diverges along directions with λ > 2/η; heavy-ball momentum β moves the bound to
    (2 + 2β)/η (Cohen et al. 2021), drawn dashed when β > 0.
    """
    top = _select(spectrum).query("index == 0").sort_values("epoch")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(top.epoch, top.value, "o-", color="C0", label=r"$\lambda_{max}$ (Hessian, probe set)")
    ggn = _select(spectrum, "ggn").query("index == 0").sort_values("epoch")
    if len(ggn):
        ax.plot(ggn.epoch, ggn.value, "s", color="C2", label=r"$\lambda_{max}$ (Gauss-Newton)")
    low = _select(spectrum, quantity="lambda_min").sort_values("epoch")
    if len(low):
        ax.plot(low.epoch, low.value.abs(), "v--", color="C3", alpha=0.7, label=r"$|\lambda_{min}|$")
    bound = top[top.lr > 0]
    if len(bound):
        ax.plot(bound.epoch, 2.0 / bound.lr, "-", color="k", lw=1, label=r"$2/\eta$")
        if momentum > 0:
            ax.plot(
                bound.epoch,
                (2.0 + 2.0 * momentum) / bound.lr,
                "--",
                color="k",
                lw=1,
                label=rf"$(2+2\beta)/\eta$, $\beta$={momentum:g}",
            )
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("curvature")
    ax.set_title(f"{run}: sharpness against the stability bound")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_spectrum(spectrum: pd.DataFrame, path: str | Path, *, run: str) -> None:
    """Left: the top-k eigenvalues (and λmin) over the checkpoints. Right: per-group λmax at the last checkpoint."""
    eig = _select(spectrum)
    groups = spectrum[
        (spectrum.operator == "hessian")
        & (spectrum.group != "all")
        & (spectrum.quantity == "eigenvalue")
        & (spectrum["index"] == 0)
    ]
    fig, axes = plt.subplots(1, 2 if len(groups) else 1, figsize=(11 if len(groups) else 6.4, 4.2), squeeze=False)
    ax = axes[0, 0]
    for index, rows in eig.groupby("index"):
        rows = rows.sort_values("epoch")
        ax.plot(rows.epoch, rows.value, "o-", ms=3, label=rf"$\lambda_{{{index + 1}}}$")
    low = _select(spectrum, quantity="lambda_min").sort_values("epoch")
    if len(low):
        ax.plot(low.epoch, low.value, "v--", color="C3", ms=3, label=r"$\lambda_{min}$")
    ax.set_yscale("symlog", linthresh=max(1e-3, float(eig.value.abs().max() if len(eig) else 1) * 1e-3))
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("eigenvalue")
    ax.set_title(f"{run}: Hessian eigenvalues")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    if len(groups):
        last = groups[groups.epoch == groups.epoch.max()]
        ax = axes[0, 1]
        ax.barh(np.arange(len(last)), last.value.to_numpy(), color="C0")
        ax.set_yticks(np.arange(len(last)), last.group.tolist(), fontsize=7)
        ax.invert_yaxis()
        for i, value in enumerate(last.value.to_numpy()):
            ax.annotate(f"{value:.3g}", (value, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
        ax.margins(x=0.15)
        ax.set_xlabel(r"$\lambda_{max}$ of the diagonal block")
        ax.set_title(f"per parameter group, epoch {int(last.epoch.iloc[0])}")
        ax.grid(True, axis="x", alpha=0.3)
    save_figure(fig, path)


def plot_density(density: pd.DataFrame, path: str | Path, *, run: str) -> None:
    """SLQ spectral density on a log scale, one line per operator and checkpoint (the newest drawn darkest)."""
    smoothed = density[density.kind == "smoothed"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    epochs = sorted(smoothed.epoch.unique())
    for (operator, epoch), rows in smoothed.groupby(["operator", "epoch"]):
        alpha = 1.0 if epoch == epochs[-1] else 0.35
        color = "C0" if operator == "hessian" else "C2"
        floor = 1e-12 * max(float(rows.density.max()), 1e-300)
        ax.plot(
            rows["lambda"],
            np.maximum(rows.density, floor),
            color=color,
            alpha=alpha,
            lw=1,
            label=f"{operator}, epoch {epoch}",
        )
    ax.set_yscale("log")
    top = smoothed.density.max() if len(smoothed) else 1.0
    if len(smoothed) and math.isfinite(top):
        ax.set_ylim(top * 1e-8, top * 3)
    ax.set_xlabel(r"eigenvalue $\lambda$")
    ax.set_ylabel("density (smoothed)")
    ax.set_title(f"{run}: spectral density (stochastic Lanczos quadrature)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
