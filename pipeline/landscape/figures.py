"""Figures of loss landscapes (PNG, offline): 1-D interpolations and 2-D surfaces, one run or several side by side.

Inputs are the tidy landscape tables:

- ``INTERPOLATION_1D``: run, path (init_final | random | eigen | partner and its variants partner_aligned,
  partner_aligned_reset, partner_aligned_repair, ...), direction, alpha, distance, split (train | test), loss,
  accuracy. For ``init_final`` and the partner paths ``alpha`` is the interpolation coefficient t (init at t=0 and
  the trained model at t=1; this run's trained model at t=0 and its partner at t=1); for ``random`` and ``eigen``
  it is the step along the direction, with the trained model at alpha=0. The partner paths share one panel.
- ``SURFACE_2D``: run, plane (random | pca | eigen), direction_x, direction_y, alpha, beta, split, loss, accuracy,
  on a full grid with the trained model at (0, 0).

Losses may be NaN or inf where the network diverged: such points are masked (drawn as gaps, or marked), never
plotted as numbers. Every function writes its file atomically and closes its figures, also on error.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping

import matplotlib

matplotlib.use("Agg")  # no display: figures are files

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import LogLocator, MaxNLocator  # noqa: E402

from pipeline.io import save_figure  # noqa: E402

__all__ = [
    "INTERPOLATION_COLUMNS",
    "SURFACE_COLUMNS",
    "PATH_TITLES",
    "grid_minimum",
    "shared_norm",
    "plot_interpolation",
    "plot_surface",
    "plot_surfaces_side_by_side",
    "plot_interpolations_side_by_side",
    "plot_connectivity_side_by_side",
]

INTERPOLATION_COLUMNS = ("run", "path", "direction", "alpha", "distance", "split", "loss", "accuracy")
SURFACE_COLUMNS = ("run", "plane", "direction_x", "direction_y", "alpha", "beta", "split", "loss", "accuracy")

PATH_ORDER = ("init_final", "random", "eigen", "partner")
PATH_TITLES = {
    "init_final": "init → final",
    "random": "random (filter-normalised)",
    "eigen": "top Hessian eigenvector",
    "partner": "to a second seed (linear mode connectivity)",
}
# Coordinate of the trained model on each path kind (t for the two-model paths, alpha for the directions).
TRAINED_AT = {"init_final": 1.0, "random": 0.0, "eigen": 0.0, "partner": 0.0}
T_PATHS = ("init_final", "partner")
# The variants of the path to the partner (one panel, one colour each): plain, permuted to this run's units, and
# with the normalisation statistics recomputed (reset) or the channel statistics repaired (REPAIR).
PARTNER_VARIANTS = {
    "partner": ("naive", "0.45"),
    "partner_aligned": ("aligned", "C0"),
    "partner_reset": ("reset", "C2"),
    "partner_aligned_reset": ("aligned + reset", "C2"),
    "partner_repair": ("REPAIR", "C3"),
    "partner_aligned_repair": ("aligned + REPAIR", "C3"),
}


def _panel(path: str) -> str:
    """The panel a path is drawn in: every partner variant in the ``partner`` panel."""
    return "partner" if path.startswith("partner") else path


def _variants(paths) -> list[str]:
    present = list(dict.fromkeys(map(str, paths)))
    return [p for p in PARTNER_VARIANTS if p in present] + sorted(p for p in present if p not in PARTNER_VARIANTS)


# Axis labels of a plane: (x direction, y direction). Eigen and PCA planes span the top two eigenvectors/components.
PLANE_LABELS = {
    "random": ("random, filter-normalised", "random, filter-normalised"),
    "pca": ("PCA of the trajectory, 1st component", "PCA of the trajectory, 2nd component"),
    "eigen": ("Hessian eigenvector 1", "Hessian eigenvector 2"),
}

CMAP = "viridis"
MIN_STYLE = dict(marker="*", ms=15, color="gold", mec="k", mew=0.8, ls="none", zorder=5)
TRAINED_STYLE = dict(marker="x", ms=10, color="red", mew=2.2, ls="none", zorder=6)


# --- validation and selection -------------------------------------------------------------------------------------


def _check_table(table: pd.DataFrame, columns: Iterable[str], name: str = "table") -> None:
    """ValueError (one line, naming ``name``) when ``table`` lacks any of ``columns`` or has no rows."""
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"{name}: expected a pandas DataFrame, got {type(table).__name__}")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{name}: missing required column(s) {', '.join(repr(c) for c in missing)}")
    if table.empty:
        raise ValueError(f"{name}: table is empty (no rows)")


def _check_levels(levels: int) -> None:
    if not isinstance(levels, (int, np.integer)) or isinstance(levels, bool) or levels < 2:
        raise ValueError(f"levels: need an integer >= 2, got {levels!r}")


def _select_run(table: pd.DataFrame, run: str, name: str = "table") -> pd.DataFrame:
    rows = table[table["run"] == run]
    if rows.empty:
        runs = sorted(map(str, table["run"].unique()))
        raise ValueError(f"run: {run!r} not in {name} (runs: {runs})")
    return rows


def _finite_positive(values) -> np.ndarray:
    """``values`` as floats with NaN, ±inf and non-positive entries (unplottable on a log axis) set to NaN."""
    v = np.asarray(values, dtype=float).copy()
    v[~np.isfinite(v) | (v <= 0)] = np.nan
    return v


# --- surfaces: one grid ---------------------------------------------------------------------------------------------


class _Grid:
    """One run's surface on one plane: coordinates, the loss grid ``Z[i_beta, i_alpha]`` (non-finite → NaN)."""

    def __init__(self, table: pd.DataFrame, *, name: str = "table", run: str | None = None, plane: str | None = None):
        _check_table(table, SURFACE_COLUMNS, name)
        rows = table if run is None else _select_run(table, run, name)
        runs = rows["run"].unique()
        if len(runs) > 1:
            raise ValueError(f"{name}: holds several runs {sorted(map(str, runs))}; select one run")
        if plane is not None:
            rows = rows[rows["plane"] == plane]
            if rows.empty:
                raise ValueError(f"plane: {plane!r} not in {name} for run {runs[0]!r}")
        planes = rows["plane"].unique()
        if len(planes) > 1:
            raise ValueError(f"{name}: run {runs[0]!r} has several planes {sorted(map(str, planes))}; pass plane=")
        if rows.duplicated(["alpha", "beta"]).any():
            raise ValueError(f"{name}: (alpha, beta) pairs repeat for run {runs[0]!r} (several splits or directions?)")
        self.run = str(runs[0])
        self.plane = str(planes[0])
        self.alpha = np.sort(rows["alpha"].unique().astype(float))
        self.beta = np.sort(rows["beta"].unique().astype(float))
        if len(rows) != len(self.alpha) * len(self.beta) or len(self.alpha) < 2 or len(self.beta) < 2:
            raise ValueError(
                f"{name}: grid of run {self.run!r} is not a full grid of at least 2x2 points "
                f"({len(rows)} rows for {len(self.alpha)} alphas x {len(self.beta)} betas)"
            )
        wide = rows.pivot(index="beta", columns="alpha", values="loss").reindex(index=self.beta, columns=self.alpha)
        self.loss = _finite_positive(wide.to_numpy())  # shape (len(beta), len(alpha))
        if not np.isfinite(self.loss).any():
            raise ValueError(f"{name}: run {self.run!r} has no finite positive loss on its grid")
        self.A, self.B = np.meshgrid(self.alpha, self.beta)

    def minimum(self) -> tuple[float, float, float]:
        i, j = np.unravel_index(np.nanargmin(self.loss), self.loss.shape)
        return float(self.alpha[j]), float(self.beta[i]), float(self.loss[i, j])

    def range(self) -> tuple[float, float]:
        return float(np.nanmin(self.loss)), float(np.nanmax(self.loss))

    def labels(self) -> tuple[str, str]:
        x, y = PLANE_LABELS.get(self.plane, (self.plane, self.plane))
        return f"α ({x})", f"β ({y})"

    def contains_origin(self) -> bool:
        return bool(self.alpha[0] <= 0 <= self.alpha[-1] and self.beta[0] <= 0 <= self.beta[-1])


def grid_minimum(table: pd.DataFrame) -> tuple[float, float, float]:
    """(alpha, beta, loss) of the lowest finite loss on one run's ``SURFACE_2D`` grid (one run, one plane).

    Ties go to the first point in (beta, alpha) order. Raises ValueError for an empty table, missing columns, several
    runs or planes, a grid that is not full, or no finite loss.
    """
    return _Grid(table).minimum()


def _log_norm(vmin: float, vmax: float) -> LogNorm:
    if vmax <= vmin:  # a flat surface: widen a little so contours and colour bars still work
        vmin, vmax = vmin / 1.01, vmax * 1.01
    return LogNorm(vmin=vmin, vmax=vmax)


def shared_norm(tables: Mapping[str, pd.DataFrame] | Iterable[pd.DataFrame]) -> LogNorm:
    """One log colour scale over several surfaces: vmin/vmax are the min/max of all finite, positive losses.

    ``tables`` maps names to ``SURFACE_2D`` tables (or is an iterable of tables). Non-finite and non-positive
    losses are ignored; for a flat landscape (min == max) the range is widened by 1 % each way.
    """
    frames = list(tables.values()) if isinstance(tables, Mapping) else list(tables)
    if not frames:
        raise ValueError("tables: no tables given")
    low, high = math.inf, -math.inf
    for index, frame in enumerate(frames):
        _check_table(frame, ("loss",), f"tables[{index}]")
        values = _finite_positive(frame["loss"].to_numpy())
        if np.isfinite(values).any():
            low, high = min(low, float(np.nanmin(values))), max(high, float(np.nanmax(values)))
    if not math.isfinite(low):
        raise ValueError("tables: no finite positive loss in any table")
    return _log_norm(low, high)


def _log_levels(norm: LogNorm, levels: int) -> np.ndarray:
    """``levels`` contour levels of the loss, evenly spaced in log10(loss), with the exact ends of ``norm``."""
    out = np.logspace(math.log10(norm.vmin), math.log10(norm.vmax), levels)
    out[0], out[-1] = norm.vmin, norm.vmax
    return out


def _mark(ax, grid: _Grid, *, legend: bool = True) -> None:
    """The grid minimum (star, value in the legend) and the trained model at (0, 0) (cross)."""
    a, b, loss = grid.minimum()
    ax.plot([a], [b], label=f"grid minimum: loss {loss:.4g} at ({a:.3g}, {b:.3g})", **MIN_STYLE)
    if grid.contains_origin():
        ax.plot([0.0], [0.0], label="trained model (0, 0)", **TRAINED_STYLE)
    masked = ~np.isfinite(grid.loss)
    if masked.any():
        ax.plot(
            grid.A[masked],
            grid.B[masked],
            marker="s",
            ms=3,
            color="0.5",
            ls="none",
            zorder=4,
            clip_on=False,
            label=f"diverged / non-finite loss ({int(masked.sum())} points)",
        )
    if legend:
        ax.legend(fontsize=7, loc="upper right", framealpha=0.85)
    _few_ticks(ax)


def _few_ticks(ax, n: int = 5) -> None:
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(n))


def _filled(ax, grid: _Grid, norm: LogNorm, levels: int):
    return ax.contourf(
        grid.A,
        grid.B,
        np.ma.masked_invalid(grid.loss),
        levels=_log_levels(norm, levels),
        norm=norm,
        cmap=CMAP,
        extend="neither",
    )


def _colorbar(fig, mappable, ax, label: str, **kwargs):
    """Colour bar of a log-scaled contour set, ticked at 1, 2, 5 x 10^k with plain labels."""
    return fig.colorbar(mappable, ax=ax, label=label, ticks=LogLocator(subs=(1.0, 2.0, 5.0)), format="%.3g", **kwargs)


def plot_surface(
    table: pd.DataFrame, folder: str | Path, *, run: str, levels: int = 30, plane: str | None = None
) -> dict[str, Path]:
    """Three views of one run's loss surface, written to ``folder``: ``surface_contour.png`` (contour lines spaced
    evenly in log10(loss)), ``surface_filled.png`` (filled contours, log colour scale and colour bar) and
    ``surface_3d.png`` (3-D surface of log10(loss), minimum starred). The first two mark the grid minimum (star)
    and the trained model (cross). ``plane`` picks one plane when the run has several in ``table``.

    Returns:
        {"contour": path, "filled": path, "3d": path}.
    """
    _check_levels(levels)
    grid = _Grid(table, run=run, plane=plane)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    norm = _log_norm(*grid.range())
    xlabel, ylabel = grid.labels()
    out = {
        "contour": folder / "surface_contour.png",
        "filled": folder / "surface_filled.png",
        "3d": folder / "surface_3d.png",
    }

    fig, ax = plt.subplots(figsize=(6.0, 5.2))
    lines = ax.contour(
        grid.A,
        grid.B,
        np.ma.masked_invalid(grid.loss),
        levels=_log_levels(norm, levels),
        norm=norm,
        cmap=CMAP,
        linewidths=0.9,
    )
    ax.clabel(lines, lines.levels[:: max(1, levels // 6)], fontsize=6, fmt="%.3g")
    _mark(ax, grid)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_aspect("equal", adjustable="box")
    ax.set_title(f"{run}: loss contours ({grid.plane} plane, {levels} levels in log10 loss)", fontsize=10)
    save_figure(fig, out["contour"])

    fig, ax = plt.subplots(figsize=(6.6, 5.2))
    filled = _filled(ax, grid, norm, levels)
    _colorbar(fig, filled, ax, "loss (log scale)")
    _mark(ax, grid)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_aspect("equal", adjustable="box")
    ax.set_title(f"{run}: loss surface ({grid.plane} plane)", fontsize=10)
    save_figure(fig, out["filled"])

    fig = plt.figure(figsize=(7.0, 5.6))
    ax = fig.add_subplot(projection="3d")
    z = np.log10(grid.loss)  # NaN where the loss is not finite: drawn as holes
    ax.plot_surface(
        grid.A,
        grid.B,
        z,
        cmap=CMAP,
        vmin=float(np.nanmin(z)),
        vmax=float(np.nanmax(z)),
        rstride=1,
        cstride=1,
        linewidth=0.1,
        edgecolor="k",
        alpha=0.95,
        antialiased=True,
    )
    a, b, loss = grid.minimum()
    ax.plot([a], [b], [math.log10(loss)], **MIN_STYLE)
    _few_ticks(ax)
    ax.tick_params(labelsize=7)
    ax.set_xlabel(xlabel, fontsize=8, labelpad=6)
    ax.set_ylabel(ylabel, fontsize=8, labelpad=6)
    ax.set_zlabel("log10 loss", fontsize=8, labelpad=6)
    ax.view_init(elev=35, azim=-60)
    ax.set_title(f"{run}: loss surface ({grid.plane} plane)", fontsize=10)
    save_figure(fig, out["3d"])
    return out


def plot_surfaces_side_by_side(tables: Mapping[str, pd.DataFrame], path: str | Path, *, levels: int = 30) -> Path:
    """One filled-contour panel per run (in the order of ``tables``), all on ONE log colour scale
    (:func:`shared_norm`) with one shared colour bar; each panel titled with the run and its minimum loss, and
    marked like :func:`plot_surface`. A table holding several runs is narrowed to the run named by its key."""
    _check_levels(levels)
    if not isinstance(tables, Mapping) or not tables:
        raise ValueError("tables: need a non-empty mapping of run name -> SURFACE_2D table")
    grids = []
    for name, table in tables.items():
        _check_table(table, SURFACE_COLUMNS, f"tables[{name!r}]")
        several = table["run"].nunique() > 1
        grids.append(_Grid(table, name=f"tables[{name!r}]", run=name if several else None))
    norm = shared_norm({name: pd.DataFrame({"loss": g.loss.ravel()}) for name, g in zip(tables, grids)})
    n = len(grids)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n + 1.0, 4.8), squeeze=False, layout="constrained")
    for ax, name, grid in zip(axes[0], tables, grids):
        filled = _filled(ax, grid, norm, levels)
        _mark(ax, grid)
        xlabel, ylabel = grid.labels()
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_aspect("equal", adjustable="box")
        ax.set_title(f"{name}\nmin loss {grid.minimum()[2]:.4g}", fontsize=10)
    _colorbar(fig, filled, list(axes[0]), "loss (log scale, shared by all panels)", shrink=0.9)
    return save_figure(fig, path)


# --- 1-D interpolations ---------------------------------------------------------------------------------------------


def _path_kinds(rows: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(_panel(str(p)) for p in rows["path"].unique()))
    return [p for p in PATH_ORDER if p in present] + sorted(p for p in present if p not in PATH_ORDER)


def _xlabel(kind: str) -> str:
    if kind == "init_final":
        return "t (0 = initialisation, 1 = trained model)"
    if kind == "partner":
        return "t (0 = this run, 1 = second seed)"
    return "α (step along the direction)"


def _shades(cmap: str, n: int) -> list:
    colormap = plt.get_cmap(cmap)
    return [colormap(0.85 - 0.4 * i / max(n - 1, 1)) for i in range(n)]


def _mark_diverged(ax, x: np.ndarray, loss: np.ndarray) -> bool:
    bad = ~np.isfinite(np.asarray(loss, dtype=float))
    if bad.any():
        ax.plot(
            x[bad],
            np.full(bad.sum(), 0.97),
            "x",
            color="C3",
            ms=5,
            transform=ax.get_xaxis_transform(),
            clip_on=False,
            zorder=5,
        )
    return bool(bad.any())


def plot_interpolation(
    table: pd.DataFrame, path: str | Path, *, run: str, barriers: Mapping[str, float] | None = None
) -> Path:
    """Loss (log scale; train solid, test dashed) and accuracy (right axis) along each 1-D path of one run, one panel
    per path kind in the order init → final, random, eigen, partner. The trained model is a dotted vertical line;
    non-finite losses are left out of the lines and marked with a red x at the top. ``barriers`` maps path kinds to
    the loss barrier, shown in that panel's title."""
    _check_table(table, INTERPOLATION_COLUMNS)
    rows = _select_run(table, run)
    kinds = _path_kinds(rows)
    barriers = dict(barriers or {})
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.0 * len(kinds), 4.2), squeeze=False, layout="constrained")
    diverged = False
    for ax, kind in zip(axes[0], kinds):
        acc_ax = ax.twinx()
        part = rows[rows["path"].map(_panel) == kind]
        variants = _variants(part["path"]) if kind == "partner" else [kind]
        lines = [(v, d) for v in variants for d in dict.fromkeys(part[part["path"] == v]["direction"])]
        directions = list(dict.fromkeys(part["direction"]))
        loss_colors, acc_colors = _shades("Blues", len(lines)), _shades("Oranges", len(lines))
        positive = False
        for i, (variant, direction) in enumerate(lines):
            colors = (PARTNER_VARIANTS[variant][1],) * 2 if len(variants) > 1 and variant in PARTNER_VARIANTS else None
            for split, style in (("train", "-"), ("test", "--")):
                line = part[(part["path"] == variant) & (part["direction"] == direction) & (part["split"] == split)]
                line = line.sort_values("alpha")
                if line.empty:
                    continue
                x = line["alpha"].to_numpy(dtype=float)
                loss = _finite_positive(line["loss"].to_numpy())
                positive |= bool(np.isfinite(loss).any())
                ax.plot(x, loss, style, color=colors[0] if colors else loss_colors[i], lw=1.6, zorder=3)
                accuracy = line["accuracy"].to_numpy(dtype=float)
                acc_ax.plot(x, accuracy, style, color=colors[1] if colors else acc_colors[i], lw=1.0, alpha=0.45)
                diverged |= _mark_diverged(ax, x, line["loss"].to_numpy())
        if positive:
            ax.set_yscale("log")
            ax.set_ylabel("loss (log scale)", color="C0")
        else:  # every loss on this path diverged: no scale to show
            ax.set_yticks([])
            ax.set_ylabel("loss (no finite value)", color="C0")
        ax.axvline(TRAINED_AT.get(kind, 0.0), color="k", ls=":", lw=1.2)
        if kind == "partner":
            ax.axvline(1.0, color="0.4", ls=":", lw=1.0)
        title = PATH_TITLES.get(kind, kind)
        shown = [(v, barriers[v]) for v in variants if barriers.get(v) is not None]
        if len(shown) == 1:
            title += f"\nbarrier = {float(shown[0][1]):.3f}"
        elif shown:
            names = [PARTNER_VARIANTS.get(v, (v,))[0].replace("aligned + ", "+") for v, _ in shown]
            title += "\nbarriers: " + " · ".join(f"{n} {float(b):.3g}" for n, (_, b) in zip(names, shown))
        if len(directions) > 1 and len(variants) == 1:
            title += f"  ({len(directions)} directions)"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(_xlabel(kind))
        ax.xaxis.set_major_locator(MaxNLocator(6))
        acc_ax.set_ylim(-0.02, 1.02)
        acc_ax.set_ylabel("accuracy", color="C1")
        ax.grid(True, which="major", alpha=0.3)
        ax.set_zorder(acc_ax.get_zorder() + 1)  # loss lines above the accuracy lines
        ax.patch.set_visible(False)
    handles = [
        Line2D([], [], color="C0", ls="-", label="train loss"),
        Line2D([], [], color="C0", ls="--", label="test loss"),
        Line2D([], [], color="C1", ls="-", label="train accuracy"),
        Line2D([], [], color="C1", ls="--", label="test accuracy"),
        Line2D([], [], color="k", ls=":", label="trained model"),
    ]
    if "partner" in kinds:
        handles.append(Line2D([], [], color="0.4", ls=":", label="second seed"))
        variants = _variants(rows[rows["path"].map(_panel) == "partner"]["path"])
        if len(variants) > 1:
            handles += [Line2D([], [], color=PARTNER_VARIANTS[v][1], label=PARTNER_VARIANTS[v][0]) for v in variants]
    if diverged:
        handles.append(Line2D([], [], color="C3", marker="x", ls="none", label="non-finite loss"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False)
    fig.suptitle(f"{run}: loss and accuracy along 1-D paths")
    return save_figure(fig, path)


def plot_interpolations_side_by_side(table: pd.DataFrame, path: str | Path, *, path_kind: str = "random") -> Path:
    """The train loss of every run in ``table`` along paths of kind ``path_kind`` on one log axis, one colour per
    run (several directions of a run share its colour), to compare architectures."""
    _check_table(table, INTERPOLATION_COLUMNS)
    rows = table[(table["path"] == path_kind) & (table["split"] == "train")]
    if rows.empty:
        raise ValueError(
            f"path_kind: no train rows with path {path_kind!r} in table "
            f"(paths: {sorted(map(str, table['path'].unique()))})"
        )
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    positive = diverged = False
    for index, run in enumerate(dict.fromkeys(rows["run"])):
        part = rows[rows["run"] == run]
        for k, direction in enumerate(dict.fromkeys(part["direction"])):
            line = part[part["direction"] == direction].sort_values("alpha")
            x = line["alpha"].to_numpy(dtype=float)
            loss = _finite_positive(line["loss"].to_numpy())
            positive |= bool(np.isfinite(loss).any())
            ax.plot(
                x,
                loss,
                "-",
                color=f"C{index % 10}",
                lw=1.6,
                alpha=1.0 if k == 0 else 0.5,
                label=str(run) if k == 0 else None,
            )
            diverged |= _mark_diverged(ax, x, line["loss"].to_numpy())
    if positive:
        ax.set_yscale("log")
    ax.axvline(TRAINED_AT.get(path_kind, 0.0), color="k", ls=":", lw=1.2, label="trained model")
    if diverged:
        ax.plot([], [], "x", color="C3", label="non-finite loss")
    ax.set_xlabel(_xlabel(path_kind))
    ax.set_ylabel("train loss (log scale)")
    ax.set_title(f"train loss along {PATH_TITLES.get(path_kind, path_kind)}", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_connectivity_side_by_side(table: pd.DataFrame, path: str | Path) -> Path:
    """Every run's paths to its second-seed model, one column per run: the loss (log scale; train solid, test
    dashed) and the test accuracy of each variant (naive, aligned, aligned + reset, aligned + REPAIR) on one axis."""
    _check_table(table, INTERPOLATION_COLUMNS)
    rows = table[table["path"].map(lambda p: str(p).startswith("partner"))]
    if rows.empty:
        raise ValueError(f"table: no partner path (paths: {sorted(map(str, table['path'].unique()))})")
    runs = list(dict.fromkeys(rows["run"]))
    fig, axes = plt.subplots(2, len(runs), figsize=(4.4 * len(runs) + 0.6, 6.4), squeeze=False, layout="constrained")
    diverged = False
    for column, run in enumerate(runs):
        part = rows[rows["run"] == run]
        loss_ax, acc_ax = axes[0][column], axes[1][column]
        positive = False
        for variant in _variants(part["path"]):
            label, color = PARTNER_VARIANTS.get(variant, (variant, "C7"))
            for split, style in (("train", "-"), ("test", "--")):
                line = part[(part["path"] == variant) & (part["split"] == split)].sort_values("alpha")
                if line.empty:
                    continue
                x = line["alpha"].to_numpy(dtype=float)
                loss = _finite_positive(line["loss"].to_numpy())
                positive |= bool(np.isfinite(loss).any())
                loss_ax.plot(x, loss, style, color=color, lw=1.6)
                diverged |= _mark_diverged(loss_ax, x, line["loss"].to_numpy())
                if split == "test" or set(part["split"]) == {"train"}:
                    acc_ax.plot(x, 100 * line["accuracy"].to_numpy(dtype=float), "-", color=color, lw=1.6, label=label)
        if positive:
            loss_ax.set_yscale("log")
        loss_ax.set_title(run, fontsize=10)
        loss_ax.set_ylabel("loss (log scale)" if column == 0 else "")
        acc_ax.set_ylabel("test accuracy (%)" if column == 0 else "")
        acc_ax.set_ylim(-2, 102)
        acc_ax.set_xlabel(_xlabel("partner"))
        for ax in (loss_ax, acc_ax):
            ax.grid(True, which="major", alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(6))
    handles = [
        Line2D([], [], color=color, label=label)
        for v, (label, color) in PARTNER_VARIANTS.items()
        if v in set(rows["path"])
    ]
    handles += [Line2D([], [], color="k", ls="-", label="train"), Line2D([], [], color="k", ls="--", label="test")]
    if diverged:
        handles.append(Line2D([], [], color="C3", marker="x", ls="none", label="non-finite loss"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle("Linear paths to the second-seed model: naive, permutation-aligned, and with statistics fixed")
    return save_figure(fig, path)
