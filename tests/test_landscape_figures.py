"""Landscape figures: synthetic tables with closed-form losses, PNGs that decode, one shared colour scale."""

import math

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from pipeline.landscape.figures import (
    INTERPOLATION_COLUMNS,
    SURFACE_COLUMNS,
    grid_minimum,
    plot_interpolation,
    plot_interpolations_side_by_side,
    plot_surface,
    plot_surfaces_side_by_side,
    shared_norm,
)

COORDS = np.linspace(-1.0, 1.0, 11)


def surface(run="mlp", scale=1.0, shift=(0.2, -0.4), plane="random"):
    """11x11 grid, loss = scale * (0.1 + (a - sa)^2 + 2 (b - sb)^2): a unique minimum at a grid point ``shift``."""
    rows = []
    for a in COORDS:
        for b in COORDS:
            loss = scale * (0.1 + (a - shift[0]) ** 2 + 2 * (b - shift[1]) ** 2)
            rows.append(
                {
                    "run": run,
                    "plane": plane,
                    "direction_x": "dx",
                    "direction_y": "dy",
                    "alpha": a,
                    "beta": b,
                    "split": "probe",
                    "loss": loss,
                    "accuracy": float(np.exp(-loss)),
                }
            )
    return pd.DataFrame(rows, columns=list(SURFACE_COLUMNS))


def interpolation(runs=("mlp",), kinds=("init_final", "random", "eigen", "partner")):
    rows = []
    for r, run in enumerate(runs):
        for kind in kinds:
            t_path = kind in ("init_final", "partner")
            xs = np.linspace(0, 1, 21) if t_path else np.linspace(-1, 1, 21)
            for x in xs:
                for split, offset in (("train", 0.0), ("test", 0.05)):
                    if kind == "init_final":
                        loss = 2.3 * (1 - x) + 0.05 + offset
                    elif kind == "partner":
                        loss = 0.05 + 0.8 * x * (1 - x) + offset
                    else:
                        loss = 0.05 + (1 + r) * x**2 + offset
                    rows.append(
                        {
                            "run": run,
                            "path": kind,
                            "direction": f"{kind}-0",
                            "alpha": x,
                            "distance": 10 * x,
                            "split": split,
                            "loss": loss,
                            "accuracy": float(np.clip(1 - loss / 2.5, 0, 1)),
                        }
                    )
    return pd.DataFrame(rows, columns=list(INTERPOLATION_COLUMNS))


def assert_png(path):
    assert path.exists() and path.suffix == ".png"
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    assert float(image[..., :3].std()) > 0  # not a blank canvas


@pytest.fixture(autouse=True)
def no_open_figures():
    plt.close("all")
    yield
    assert plt.get_fignums() == [], "a figure was left open"


def test_plot_interpolation_writes_png(tmp_path):
    out = plot_interpolation(
        interpolation(), tmp_path / "sub" / "interp.png", run="mlp", barriers={"partner": 0.2, "init_final": 0.0}
    )
    assert out == tmp_path / "sub" / "interp.png"
    assert_png(out)


def test_plot_interpolation_masks_non_finite_losses(tmp_path):
    table = interpolation(kinds=("random", "partner"))
    table.loc[table.index[:3], "loss"] = np.inf
    table.loc[table.index[5:8], "loss"] = np.nan
    table.loc[table["path"] == "partner", "loss"] = np.nan  # a panel with no finite loss at all
    assert_png(plot_interpolation(table, tmp_path / "interp.png", run="mlp"))


def test_plot_interpolations_side_by_side(tmp_path):
    table = interpolation(runs=("mlp", "resnet20", "resnet20_noshort"), kinds=("random", "eigen"))
    table.loc[table.index[2], "loss"] = -np.inf
    assert_png(plot_interpolations_side_by_side(table, tmp_path / "cmp.png"))
    assert_png(plot_interpolations_side_by_side(table, tmp_path / "cmp_eigen.png", path_kind="eigen"))
    with pytest.raises(ValueError, match="path_kind"):
        plot_interpolations_side_by_side(table, tmp_path / "none.png", path_kind="partner")


def test_plot_surface_writes_three_pngs(tmp_path):
    paths = plot_surface(surface(), tmp_path / "mlp", run="mlp", levels=12)
    assert set(paths) == {"contour", "filled", "3d"}
    assert paths["contour"].name == "surface_contour.png"
    assert paths["filled"].name == "surface_filled.png"
    assert paths["3d"].name == "surface_3d.png"
    for path in paths.values():
        assert path.parent == tmp_path / "mlp"
        assert_png(path)


def test_plot_surface_with_non_finite_losses(tmp_path):
    table = surface(plane="pca")
    table.loc[table.index[:4], "loss"] = np.inf
    table.loc[table.index[10:14], "loss"] = np.nan
    for path in plot_surface(table, tmp_path, run="mlp").values():
        assert_png(path)


def test_grid_minimum_is_the_argmin():
    table = surface(shift=(0.2, -0.4)).sample(frac=1.0, random_state=0)  # row order must not matter
    alpha, beta, loss = grid_minimum(table)
    best = table.loc[table["loss"].idxmin()]
    assert (alpha, beta, loss) == (best.alpha, best.beta, best.loss)
    assert alpha == pytest.approx(0.2) and beta == pytest.approx(-0.4) and loss == pytest.approx(0.1)
    # a diverged point below everything else (or NaN) is not the minimum
    table.loc[table["loss"].idxmin(), "loss"] = -np.inf
    table.iloc[0, table.columns.get_loc("loss")] = np.nan
    a2, b2, l2 = grid_minimum(table)
    assert np.isfinite(l2) and l2 == table["loss"][np.isfinite(table["loss"])].min()


def test_shared_norm_spans_all_runs():
    tables = {
        "mlp": surface("mlp", scale=1.0),
        "resnet20": surface("resnet20", scale=0.1),
        "resnet20_noshort": surface("resnet20_noshort", scale=5.0),
    }
    tables["mlp"].loc[0, "loss"] = np.inf
    tables["resnet20"].loc[3, "loss"] = np.nan
    norm = shared_norm(tables)
    finite = pd.concat(tables.values())["loss"]
    finite = finite[np.isfinite(finite)]
    assert norm.vmin == pytest.approx(finite.min()) and norm.vmax == pytest.approx(finite.max())
    assert norm.vmin == pytest.approx(0.01) and math.isfinite(norm.vmax)


def test_plot_surfaces_side_by_side(tmp_path):
    tables = {
        "mlp": surface("mlp"),
        "resnet20": surface("resnet20", scale=0.1, shift=(0.0, 0.0)),
        "resnet20_noshort": surface("resnet20_noshort", scale=5.0, plane="eigen"),
    }
    tables["resnet20_noshort"].loc[:5, "loss"] = np.inf
    out = plot_surfaces_side_by_side(tables, tmp_path / "side.png", levels=10)
    assert_png(out)
    # a table holding several runs is narrowed to the run named by its key
    both = pd.concat([surface("mlp"), surface("resnet20", scale=0.1)])
    assert_png(plot_surfaces_side_by_side({"mlp": both, "resnet20": both}, tmp_path / "side2.png"))


@pytest.mark.parametrize("column", ["loss", "alpha", "beta"])
def test_surface_missing_column_names_it(tmp_path, column):
    table = surface().drop(columns=[column])
    with pytest.raises(ValueError, match=f"table.*'{column}'"):
        plot_surface(table, tmp_path, run="mlp")
    with pytest.raises(ValueError, match=f"'{column}'"):
        plot_surfaces_side_by_side({"mlp": table}, tmp_path / "x.png")
    if column == "loss":
        with pytest.raises(ValueError, match="'loss'"):
            shared_norm({"mlp": table})
    with pytest.raises(ValueError, match=f"'{column}'"):
        grid_minimum(table)


@pytest.mark.parametrize("column", ["loss", "split", "path"])
def test_interpolation_missing_column_names_it(tmp_path, column):
    table = interpolation().drop(columns=[column])
    with pytest.raises(ValueError, match=f"table.*'{column}'"):
        plot_interpolation(table, tmp_path / "x.png", run="mlp")
    with pytest.raises(ValueError, match=f"table.*'{column}'"):
        plot_interpolations_side_by_side(table, tmp_path / "x.png")


def test_empty_tables_raise(tmp_path):
    with pytest.raises(ValueError, match="table.*empty"):
        plot_interpolation(interpolation().iloc[:0], tmp_path / "x.png", run="mlp")
    with pytest.raises(ValueError, match="table.*empty"):
        plot_interpolations_side_by_side(interpolation().iloc[:0], tmp_path / "x.png")
    with pytest.raises(ValueError, match="table.*empty"):
        plot_surface(surface().iloc[:0], tmp_path, run="mlp")
    with pytest.raises(ValueError, match="empty"):
        plot_surfaces_side_by_side({"mlp": surface().iloc[:0]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="tables"):
        plot_surfaces_side_by_side({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="empty"):
        grid_minimum(surface().iloc[:0])
    assert not list(tmp_path.iterdir())  # nothing written, no temporary files left


def test_unknown_run_and_incomplete_grid_raise(tmp_path):
    with pytest.raises(ValueError, match="run: 'vgg'"):
        plot_surface(surface(), tmp_path, run="vgg")
    with pytest.raises(ValueError, match="run: 'vgg'"):
        plot_interpolation(interpolation(), tmp_path / "x.png", run="vgg")
    with pytest.raises(ValueError, match="full grid"):
        plot_surface(surface().iloc[1:], tmp_path, run="mlp")
    two_planes = pd.concat([surface(plane="random"), surface(plane="pca")])
    with pytest.raises(ValueError, match="plane"):
        plot_surface(two_planes, tmp_path, run="mlp")
    assert len(plot_surface(two_planes, tmp_path / "pca", run="mlp", plane="pca", levels=5)) == 3
