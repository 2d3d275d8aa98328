"""The report's numbers, exports and documents, from small tables with known contents."""

import base64
import io
import json
import math
import re

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from pipeline.report.exports import PLOT_EXPORTS, plot_exports, write_plot_exports
from pipeline.report.figures import (
    plot_dynamics_overview,
    plot_sharpness_overview,
    plot_spectra_overview,
    plot_training_curves,
)
from pipeline.report.render import render_html, render_markdown, summary_markdown
from pipeline.report.summary import SUMMARY_COLUMNS, Report, RunData, fill_from_config, format_value, summary_rows

METRICS = {
    "a": {
        "train": {
            "status": "completed",
            "train_accuracy": 1.0,
            "test_accuracy": 0.9,
            "generalization_gap": 0.25,
            "epochs": 3,
            "diverged_step": None,
        },
        "hessian": {
            "lambda_max": 4.0,
            "lambda_max_lr_over_2": 0.2,
            "trace_hutchinson": 10.0,
            "noise_scale": 30.0,
            "epsilon_sharpness_absolute": 0.04,
            "pac_bayes_sigma_isotropic": 0.02,
            "trace_hutchinson_stderr": 1.0,
            "trace_hutchpp": 9.5,
            "trace_hutchpp_stderr": 0.5,
        },
        "partner": {},
        "interpolate": {"barrier": 0.7, "barrier_train": 0.7, "barrier_test": 0.6},
        "surface": {},
    },
    "b": {
        "train": {
            "status": "diverged",
            "diverged_step": 17,
            "train_accuracy": float("nan"),
            "test_accuracy": 0.1,
            "generalization_gap": float("nan"),
            "epochs": 3,
        }
    },
    "c": {
        "train": {
            "status": "completed",
            "train_accuracy": 0.8,
            "test_accuracy": 0.75,
            "generalization_gap": 0.1,
            "epochs": 3,
        },
        "hessian": {"lambda_max": 1.0, "trace_hutchinson": 3.0, "trace_hutchinson_stderr": 0.3},
    },
}


def test_summary_rows_take_the_numbers_and_say_what_is_missing():
    rows = {r["run"]: r for r in summary_rows(METRICS, ["a", "b", "c", "d"])}
    a = rows["a"]
    assert a["status"] == "completed" and a["accuracy_gap"] == pytest.approx(0.1)
    assert a["trace"] == 9.5 and a["trace_stderr"] == 0.5  # Hutch++ preferred when present
    assert a["barrier"] == 0.7 and a["lambda_max"] == 4.0 and a["lambda_max_lr_over_2"] == 0.2
    assert a["noise_scale"] == 30.0 and a["epsilon_sharpness"] == 0.04 and a["pac_bayes_sigma"] == 0.02
    assert rows["b"]["status"] == "diverged at step 17"
    assert rows["b"]["train_accuracy"] is None and rows["b"]["accuracy_gap"] is None  # NaN is not a number here
    assert rows["c"]["status"] == "missing: partner, interpolate, surface"
    assert rows["c"]["trace"] == 3.0 and rows["c"]["trace_stderr"] == 0.3 and rows["c"]["barrier"] is None
    assert rows["d"]["status"] == "not trained"
    assert list(rows["a"]) == [key for key, _, _ in SUMMARY_COLUMNS]


def test_model_and_learning_rate_come_from_the_config_stored_with_the_history():
    rows = summary_rows(METRICS, ["a"])
    runs = {"a": RunData("a", metadata={"train_history": {"run": {"model_name": "resnet20", "train": {"lr": 0.05}}}})}
    fill_from_config(rows, runs)
    assert rows[0]["model"] == "resnet20" and rows[0]["lr"] == 0.05


@pytest.mark.parametrize(
    "value, text",
    [
        (None, "—"),
        (float("nan"), "—"),
        (float("inf"), "—"),
        (0.123456, "0.1235"),
        (12345.678, "1.235e+04"),
        (3, "3"),
        ("completed", "completed"),
    ],
)
def test_format_value(value, text):
    assert format_value(value) == text


def tables(run="a", lr=(0.1, 0.05, 0.0)):
    epochs = np.arange(len(lr))
    history = pd.DataFrame(
        {
            "run": run,
            "scope": "epoch",
            "epoch": epochs,
            "step": epochs * 10,
            "lr": lr,
            "train_loss": [2.0, 1.0, 0.5],
            "train_accuracy": [0.1, 0.5, 0.9],
            "test_loss": [2.1, 1.2, 0.8],
            "test_accuracy": [0.1, 0.4, 0.8],
        }
    )
    history = pd.concat([history, history.iloc[[1]].assign(scope="step", step=15)], ignore_index=True)
    eig = pd.DataFrame(
        {
            "run": run,
            "epoch": np.repeat(epochs, 2),
            "lr": np.repeat(lr, 2),
            "operator": "hessian",
            "group": "all",
            "quantity": "eigenvalue",
            "index": [0, 1] * len(lr),
            "value": [5.0, 1.0, 8.0, 2.0, 9.0, 3.0],
        }
    )
    spectrum = pd.concat([eig, eig.assign(group="net.1"), eig.assign(operator="ggn", value=eig.value / 2)])
    lam = np.linspace(-1, 10, 7)
    density = pd.concat(
        [
            pd.DataFrame(
                {
                    "run": run,
                    "epoch": e,
                    "operator": op,
                    "kind": kind,
                    "lambda": lam,
                    "density": lam * 0 + e + 1.0,
                    "weight": np.nan,
                }
            )
            for e in (0, 2)
            for op in ("hessian", "ggn")
            for kind in ("smoothed", "node")
        ]
    )
    line = pd.DataFrame(
        [
            {
                "run": run,
                "path": path,
                "direction": "d",
                "alpha": a,
                "distance": a,
                "split": split,
                "loss": (10 if split == "test" else 1) * (a + 1),
                "accuracy": 0.5,
            }
            for path, alphas in (("partner", (0.0, 0.5, 1.0)), ("random", (-1.0, 0.0, 1.0)), ("init_final", (0.0, 1.0)))
            for a in alphas
            for split in ("train", "test")
        ]
    )
    tracked = pd.DataFrame(
        {
            "run": run,
            "epoch": [0, 0, 1],
            "step": [20, 0, 10],
            "lr": 0.1,
            "two_over_lr": 20.0,
            "stability_threshold": 38.0,
            "lambda_max": [12.0, 4.0, 9.0],
            "grad_sharpness": [2.0, 1.0, 1.5],
            "first_order": [-0.3, -1.0, -0.5],
            "second_order": [0.1, 0.2, 0.1],
            "predicted_change": [-0.2, -0.8, -0.4],
            "actual_change": [-0.19, -0.8, -0.41],
            "model_error": [0.01, 0.0, -0.01],
        }
    )
    return RunData(
        run,
        tables={
            "train_history": history,
            "hessian_spectrum": spectrum,
            "hessian_density": density,
            "interpolation_1d": line,
            "sharpness_history": tracked,
        },
    )


def test_plot_exports_hold_exactly_the_table_values():
    frames = plot_exports(tables())
    assert set(frames) == set(PLOT_EXPORTS)
    for name, frame in frames.items():  # each has the x and y fields its dvc.yaml plot names
        x, ys, _ = PLOT_EXPORTS[name]
        assert list(frame.columns) == [x, *ys], name
    assert "loss" not in frames and "accuracy" not in frames  # the per-epoch curves are DVCLive's (pipeline.live)
    sharp = frames["sharpness"]
    assert sharp.lambda_max.tolist() == [5.0, 8.0, 9.0]  # hessian, group all, index 0
    assert sharp.two_over_lr.iloc[:2].tolist() == [20.0, 40.0] and math.isnan(sharp.two_over_lr.iloc[2])  # lr = 0
    density = frames["density"]
    assert len(density) == 7 and (density.density == 3.0).all()  # final epoch, smoothed, hessian
    partner = frames["partner_path"]
    assert partner.t.tolist() == [0.0, 0.5, 1.0] and partner.train_loss.tolist() == [1.0, 1.5, 2.0]
    assert partner.test_loss.tolist() == [10.0, 15.0, 20.0]
    assert frames["random_line"].alpha.tolist() == [-1.0, 0.0, 1.0]
    tracked = frames["tracked_sharpness"]  # sorted by step
    assert tracked.step.tolist() == [0, 10, 20] and tracked.lambda_max.tolist() == [4.0, 9.0, 12.0]
    assert tracked.stability_threshold.tolist() == [38.0] * 3 and tracked.grad_sharpness.tolist() == [1.0, 1.5, 2.0]
    assert frames["step_model"].actual_change.tolist() == [-0.8, -0.41, -0.19]


def test_a_run_without_tables_exports_nothing_and_its_figures_still_draw(tmp_path):
    empty = {"x": RunData("x", tables={"train_history": tables().tables["train_history"].iloc[0:0]})}
    assert plot_exports(empty["x"]) == {}
    assert write_plot_exports(empty, tmp_path / "plots") == []
    for plot in (plot_training_curves, plot_sharpness_overview, plot_spectra_overview, plot_dynamics_overview):
        assert mpimg.imread(plot(empty, tmp_path / f"{plot.__name__}.png")).shape[2] in (3, 4)


def test_write_plot_exports_writes_one_json_per_quantity_and_run_with_null_for_missing(tmp_path):
    runs = {"a": tables("a"), "b": tables("b")}
    written = write_plot_exports(runs, tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == sorted(
        f"{q}/{r}.json" for q in PLOT_EXPORTS for r in ("a", "b")
    )
    assert [r["train_loss"] for r in json.loads((tmp_path / "random_line/a.json").read_text())] == [0.0, 1.0, 2.0]
    sharp = json.loads((tmp_path / "sharpness/a.json").read_text())
    assert sharp[-1] == {"epoch": 2, "lambda_max": 9.0, "two_over_lr": None}  # lr = 0: no bound (not 0, not NaN)


def _figures(tmp_path):
    runs = {"a": tables("a"), "b": tables("b", lr=(0.2, 0.1, 0.0))}
    return [
        ("Training", plot_training_curves(runs, tmp_path / "t.png"), "cap <1>"),
        ("Sharpness", plot_sharpness_overview(runs, tmp_path / "s.png"), "cap 2"),
        ("Spectra", plot_spectra_overview(runs, tmp_path / "p.png"), "cap 3"),
    ]


def _report(tmp_path):
    return Report(
        summary=summary_rows(METRICS, ["a", "b"]),
        figures=_figures(tmp_path),
        provenance=[
            {
                "run": "a",
                "table": "train_history",
                "git_revision": "abc",
                "code": "c0de",
                "data": "da7a",
                "torch": "2.x",
            }
        ],
        settings={"runs.a": {"train": {"lr": 0.05}}},
        revision="abc123",
        libraries={"torch": "2.x"},
    )


def test_the_html_report_is_self_contained_and_every_figure_decodes(tmp_path):
    page = render_html(_report(tmp_path))
    assert not re.search(r"""(src|href)=['"]?(https?:|//)""", page)  # nothing to fetch
    uris = re.findall(r"<img src='data:image/png;base64,([^']+)'", page)
    assert len(uris) == 3
    for uri, (_, path, _) in zip(uris, _figures(tmp_path)):
        image = mpimg.imread(io.BytesIO(base64.b64decode(uri)), format="png")
        assert image.shape[:2] == mpimg.imread(path).shape[:2] and image.shape[0] > 100
    assert "cap &lt;1&gt;" in page  # text is escaped
    assert "diverged at step 17" in page and "<tr class='bad'>" in page
    assert page.count("<th title=") == len(SUMMARY_COLUMNS)


def test_the_markdown_report_links_figures_beside_it(tmp_path):
    text = render_markdown(_report(tmp_path), tmp_path)
    assert "![Training](t.png)" in text and "![Spectra](p.png)" in text
    table = summary_markdown(summary_rows(METRICS, ["a"]))
    header, rule, row = table.splitlines()
    assert header.count("|") == rule.count("|") == row.count("|") == len(SUMMARY_COLUMNS) + 1
    assert "| 0.7 |" in row and "| 9.5 |" in row


def test_dvc_yaml_draws_every_export_with_its_fields():
    from conftest import REPO
    from ruamel.yaml import YAML

    plots = {}
    for entry in YAML(typ="safe").load((REPO / "dvc.yaml").read_text())["plots"]:
        ((path, spec),) = entry.items()
        plots[path] = spec
    assert set(plots) == {f"reports/plots/{q}" for q in PLOT_EXPORTS}
    for quantity, (x, ys, _) in PLOT_EXPORTS.items():
        spec = plots[f"reports/plots/{quantity}"]
        assert spec["x"] == x and ([spec["y"]] if isinstance(spec["y"], str) else spec["y"]) == list(ys)


def test_the_dynamics_figure_draws_tracked_runs_and_says_when_none_tracked(tmp_path):
    runs = {"a": tables("a"), "b": tables("b")}
    drawn = mpimg.imread(plot_dynamics_overview(runs, tmp_path / "d.png"))
    untracked = {
        name: RunData(name, tables={k: v for k, v in data.tables.items() if k != "sharpness_history"})
        for name, data in runs.items()
    }
    empty = mpimg.imread(plot_dynamics_overview(untracked, tmp_path / "e.png"))
    assert drawn.shape[2] in (3, 4) and empty.shape[2] in (3, 4)
    assert float(drawn[..., :3].std()) > float(empty[..., :3].std())  # curves and points, not just a note
