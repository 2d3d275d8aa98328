"""Tests for pipeline.config: defaults, run overrides, frozenness and one-line ConfigErrors for malformed params.

Every malformed case checks three things: a :class:`ConfigError` is raised, its ``.key`` is the dotted key of the
offending value, and ``str(error)`` is a single line ``<key>: <message>`` naming what is allowed (names or bound).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from pathlib import Path

import pytest

from pipeline.config import (
    ACTIVATIONS,
    DATASETS,
    MODELS,
    OPTIMIZERS,
    SCHEDULES,
    ConfigError,
    DataConfig,
    HessianConfig,
    ModelConfig,
    Params,
    RunConfig,
    TrainConfig,
    load_params,
    parse_params,
)

REPO = Path(__file__).resolve().parents[1]
MINIMAL = {"runs": {"mlp": {"model": "mlp"}}}


def params_with(**sections) -> dict:
    """The minimal valid params with the given sections merged in (a value of ``...`` deletes the section)."""
    raw = copy.deepcopy(MINIMAL)
    for name, value in sections.items():
        if value is ...:
            raw.pop(name, None)
        else:
            raw[name] = value
    return raw


def run_with(**entry) -> dict:
    """Minimal params whose only run ``a`` is ``{model: mlp, **entry}``."""
    return {"runs": {"a": {"model": "mlp", **entry}}}


def assert_one_line_error(err: ConfigError, key: str, *needles: str) -> None:
    text = str(err)
    assert err.key == key, text
    assert "\n" not in text and "\r" not in text, f"multi-line message: {text!r}"
    if key:
        assert text == f"{key}: {err.message}".replace("\n", "\\n"), text
    for needle in needles:
        assert needle in err.message, f"{needle!r} not in {text!r}"


# --------------------------------------------------------------------------------------------------------------
# Malformed params: (id, raw params, expected dotted key, substrings the message must contain)
# --------------------------------------------------------------------------------------------------------------

BAD = [
    # structure
    ("not-a-mapping", [1, 2], "", ("data", "model", "train", "runs")),
    ("unknown-section", params_with(optimiser={"lr": 0.1}), "optimiser", ("data", "model", "train", "runs")),
    ("section-not-mapping", params_with(data=["digits"]), "data", ("mapping",)),
    ("data-unknown-key", params_with(data={"datasets": "digits"}), "data.datasets", ("dataset", "probe_size")),
    ("model-unknown-key", params_with(model={"depth": 3}), "model.depth", ("mlp_depth", "mlp_width")),
    ("train-unknown-key", params_with(train={"learning_rate": 0.1}), "train.learning_rate", ("lr", "epochs")),
    # wrong types
    ("lr-string", params_with(train={"lr": "0.1"}), "train.lr", ("a number", "'0.1'")),
    ("lr-bool", params_with(train={"lr": True}), "train.lr", ("a number",)),
    ("epochs-bool", params_with(train={"epochs": True}), "train.epochs", ("an integer",)),
    ("batch_size-float", params_with(train={"batch_size": 64.0}), "train.batch_size", ("an integer",)),
    ("nesterov-int", params_with(train={"nesterov": 1}), "train.nesterov", ("true or false",)),
    ("download-string-yes", params_with(data={"download": "yes"}), "data.download", ("true or false",)),
    ("root-int", params_with(data={"root": 5}), "data.root", ("a string",)),
    ("device-int", params_with(train={"device": 0}), "train.device", ("a string",)),
    ("milestones-string", params_with(train={"milestones": "5,10"}), "train.milestones", ("list", "integer")),
    ("milestones-mapping", params_with(train={"milestones": {"a": 5}}), "train.milestones", ("list", "integer")),
    ("milestones-item-string", params_with(train={"milestones": [5, "x"]}), "train.milestones[1]", ("an integer",)),
    ("milestones-item-float", params_with(train={"milestones": [5, 7.5]}), "train.milestones[1]", ("an integer",)),
    # out of range
    ("lr-zero", params_with(train={"lr": 0}), "train.lr", ("> 0",)),
    ("lr-negative", params_with(train={"lr": -0.1}), "train.lr", ("> 0", "-0.1")),
    ("lr-nan", params_with(train={"lr": float("nan")}), "train.lr", ("finite",)),
    ("lr-inf", params_with(train={"lr": float("inf")}), "train.lr", ("finite",)),
    ("lr-minus-inf", params_with(train={"lr": float("-inf")}), "train.lr", ("finite",)),
    ("weight_decay-inf", params_with(train={"weight_decay": float("inf")}), "train.weight_decay", ("finite",)),
    ("weight_decay-negative", params_with(train={"weight_decay": -1e-4}), "train.weight_decay", (">= 0",)),
    ("epochs-zero", params_with(train={"epochs": 0}), "train.epochs", (">= 1",)),
    ("momentum-one", params_with(train={"momentum": 1.0}), "train.momentum", ("< 1",)),
    ("momentum-negative", params_with(train={"momentum": -0.1}), "train.momentum", (">= 0",)),
    ("adam_beta2-one", params_with(train={"adam_beta2": 1}), "train.adam_beta2", ("< 1",)),
    ("test_fraction-1.5", params_with(data={"test_fraction": 1.5}), "data.test_fraction", ("< 1",)),
    ("test_fraction-zero", params_with(data={"test_fraction": 0}), "data.test_fraction", ("> 0",)),
    ("probe_size-zero", params_with(data={"probe_size": 0}), "data.probe_size", (">= 1",)),
    ("train_samples-negative", params_with(data={"train_samples": -1}), "data.train_samples", (">= 0",)),
    ("synthetic_classes-one", params_with(data={"synthetic_classes": 1}), "data.synthetic_classes", (">= 2",)),
    ("data-seed-negative", params_with(data={"seed": -1}), "data.seed", (">= 0",)),
    ("train-seed-negative", params_with(train={"seed": -3}), "train.seed", (">= 0",)),
    ("checkpoint_every-zero", params_with(train={"checkpoint_every": 0}), "train.checkpoint_every", (">= 1",)),
    ("gamma-zero", params_with(train={"gamma": 0}), "train.gamma", ("> 0",)),
    ("gamma-above-one", params_with(train={"gamma": 1.5}), "train.gamma", ("<= 1",)),
    ("log_every-negative", params_with(train={"log_every": -1}), "train.log_every", (">= 0",)),
    ("eval_batch_size-zero", params_with(train={"eval_batch_size": 0}), "train.eval_batch_size", (">= 1",)),
    ("mlp_depth-negative", params_with(model={"mlp_depth": -1}), "model.mlp_depth", (">= 0",)),
    ("mlp_width-zero", params_with(model={"mlp_width": 0}), "model.mlp_width", (">= 1",)),
    ("lr-int-too-large-for-float", params_with(train={"lr": 10**400}), "train.lr", ("finite",)),
    # unknown names
    ("dataset-unknown", params_with(data={"dataset": "imagenet"}), "data.dataset", DATASETS),
    ("optimizer-unknown", params_with(train={"optimizer": "rmsprop"}), "train.optimizer", OPTIMIZERS),
    ("schedule-unknown", params_with(train={"schedule": "linear"}), "train.schedule", SCHEDULES),
    ("activation-unknown", params_with(model={"mlp_activation": "sigmoid"}), "model.mlp_activation", ACTIVATIONS),
    ("run-model-unknown", run_with(model="vgg16"), "runs.a.model", ("mlp", "resnet<depth>", "package.module:callable")),
    ("run-model-not-string", run_with(model=["mlp"]), "runs.a.model", ("a string",)),
    ("device-tpu", params_with(train={"device": "tpu"}), "train.device", ("auto", "cpu", "cuda", "cuda:N", "mps")),
    ("device-cuda-colon", params_with(train={"device": "cuda:"}), "train.device", ("auto", "cpu", "cuda:N")),
    ("device-uppercase", params_with(train={"device": "CPU"}), "train.device", ("auto", "cpu")),
    ("device-trailing-newline", params_with(train={"device": "cpu\n"}), "train.device", ("cpu",)),
    # mode connectivity
    ("align-unknown", params_with(landscape={"align": "git-rebasin"}), "landscape.align", ("none", "weights")),
    ("path_bn-unknown", params_with(landscape={"path_bn": ["reset", "fixup"]}), "landscape.path_bn[1]", ("repair",)),
    ("path_bn-repeat", params_with(landscape={"path_bn": ["reset", "reset"]}), "landscape.path_bn", ("repeat",)),
    ("path_bn-string", params_with(landscape={"path_bn": "reset"}), "landscape.path_bn", ("list",)),
    (
        "stats_batch_size-negative",
        params_with(landscape={"stats_batch_size": -1}),
        "landscape.stats_batch_size",
        (">= 0",),
    ),
    ("align_passes-zero", params_with(landscape={"align_passes": 0}), "landscape.align_passes", (">= 1",)),
    # runs
    ("runs-missing", params_with(runs=...), "runs", ("model",)),
    ("runs-empty", params_with(runs={}), "runs", ("non-empty mapping", "model")),
    ("runs-null", params_with(runs=None), "runs", ("mapping",)),
    ("runs-list", params_with(runs=[{"model": "mlp"}]), "runs", ("mapping",)),
    ("runs-string", params_with(runs="mlp"), "runs", ("mapping",)),
    ("run-not-mapping", params_with(runs={"a": "mlp"}), "runs.a", ("mapping", "model")),
    ("run-null", params_with(runs={"a": None}), "runs.a", ("mapping", "model")),
    ("run-without-model", params_with(runs={"a": {"lr": 0.1}}), "runs.a.model", ("missing", "mlp", "resnet<depth>")),
    ("run-name-digit-first", params_with(runs={"1bad": {"model": "mlp"}}), "runs.1bad", ("letter", "_", "-")),
    ("run-name-space", params_with(runs={"a b": {"model": "mlp"}}), "runs.a b", ("letter",)),
    ("run-name-int", params_with(runs={1: {"model": "mlp"}}), "runs.1", ("letter",)),
    ("run-name-trailing-newline", params_with(runs={"a\n": {"model": "mlp"}}), "runs.a\n", ("letter",)),
    ("run-unknown-key", run_with(learning_rate=0.1), "runs.a.learning_rate", ("model", "lr", "mlp_width", "epochs")),
    ("run-lr-string", run_with(lr="fast"), "runs.a.lr", ("a number",)),
    ("run-epochs-float", run_with(epochs=2.5), "runs.a.epochs", ("an integer",)),
    ("run-lr-negative", run_with(lr=-1), "runs.a.lr", ("> 0",)),
    ("run-mlp_width-zero", run_with(mlp_width=0), "runs.a.mlp_width", (">= 1",)),
    ("run-activation-unknown", run_with(mlp_activation="swish"), "runs.a.mlp_activation", ACTIVATIONS),
    ("run-optimizer-unknown", run_with(optimizer="lbfgs"), "runs.a.optimizer", OPTIMIZERS),
    ("run-milestones-item", run_with(milestones=[1, None]), "runs.a.milestones[1]", ("an integer",)),
    # cross-field
    (
        "nesterov-momentum-zero",
        params_with(train={"nesterov": True, "momentum": 0}),
        "train.nesterov",
        ("sgd", "momentum > 0"),
    ),
    (
        "nesterov-adam",
        params_with(train={"nesterov": True, "optimizer": "adam"}),
        "train.nesterov",
        ("sgd", "momentum > 0"),
    ),
    ("step-without-milestones", params_with(train={"schedule": "step"}), "train.milestones", ("step", "milestone")),
    (
        "milestones-decreasing",
        params_with(train={"milestones": [10, 5]}),
        "train.milestones",
        ("strictly increasing", ">= 1", "[10, 5]"),
    ),
    (
        "milestones-repeated",
        params_with(train={"schedule": "step", "milestones": [5, 5]}),
        "train.milestones",
        ("strictly increasing",),
    ),
    ("milestones-zero", params_with(train={"milestones": [0, 5]}), "train.milestones", (">= 1",)),
    (
        "run-nesterov-adam",
        params_with(train={"nesterov": True}, runs={"a": {"model": "mlp", "optimizer": "adam"}}),
        "runs.a.nesterov",
        ("sgd", "momentum > 0"),
    ),
    ("run-step-without-milestones", run_with(schedule="step"), "runs.a.milestones", ("step",)),
    ("run-milestones-decreasing", run_with(milestones=[3, 2]), "runs.a.milestones", ("strictly increasing",)),
    # hessian
    ("hessian-unknown-key", params_with(hessian={"topk": 3}), "hessian.topk", ("top_k", "method")),
    ("hessian-method", params_with(hessian={"method": "eigsh"}), "hessian.method", ("lanczos", "power", "arpack")),
    (
        "hessian-checkpoints-name",
        params_with(hessian={"checkpoints": "last"}),
        "hessian.checkpoints",
        ("final", "all", "integer"),
    ),
    ("hessian-checkpoints-zero", params_with(hessian={"checkpoints": 0}), "hessian.checkpoints", (">= 1",)),
    (
        "hessian-checkpoints-bool",
        params_with(hessian={"checkpoints": True}),
        "hessian.checkpoints",
        ("a string or an integer",),
    ),
    ("hessian-details-float", params_with(hessian={"details": 2.5}), "hessian.details", ("a string or an integer",)),
    ("hessian-top-k-zero", params_with(hessian={"top_k": 0}), "hessian.top_k", (">= 1",)),
    ("hessian-tol-one", params_with(hessian={"tol": 1.0}), "hessian.tol", ("< 1",)),
    ("hessian-tol-nan", params_with(hessian={"tol": float("nan")}), "hessian.tol", ("finite",)),
    (
        "hessian-trace-name",
        params_with(hessian={"trace": ["hutchinson", "xtrace"]}),
        "hessian.trace[1]",
        ("hutchinson", "hutchpp"),
    ),
    ("hessian-trace-scalar", params_with(hessian={"trace": "hutchpp"}), "hessian.trace", ("list",)),
    ("hessian-trace-repeated", params_with(hessian={"trace": ["hutchpp", "hutchpp"]}), "hessian.trace", ("repeat",)),
    (
        "hessian-operators-without-hessian",
        params_with(hessian={"operators": ["ggn"]}),
        "hessian.operators",
        ("must include 'hessian'",),
    ),
    (
        "hessian-operator-name",
        params_with(hessian={"operators": ["hessian", "fisher"]}),
        "hessian.operators[1]",
        ("ggn",),
    ),
    ("hessian-groups", params_with(hessian={"groups": "layer"}), "hessian.groups", ("block", "module", "none")),
    ("hessian-hvp", params_with(hessian={"hvp": "finite_difference"}), "hessian.hvp", ("reverse_over_reverse",)),
    ("hessian-dtype", params_with(hessian={"dtype": "float16"}), "hessian.dtype", ("float32", "float64")),
    ("hessian-trace-hvps", params_with(hessian={"trace_hvps": 3}), "hessian.trace_hvps", (">= 4",)),
    (
        "hessian-max-hvps-too-small",
        params_with(hessian={"top_k": 20, "max_hvps": 40}),
        "hessian.max_hvps",
        (">= 52", "top_k 20"),
    ),
    ("hessian-device", params_with(hessian={"device": "gpu"}), "hessian.device", ("cuda",)),
]


def _as_param(case):
    return case if isinstance(case, type(pytest.param(None))) else pytest.param(*case, id=case[0])


@pytest.mark.parametrize("case_id, raw, key, needles", [_as_param(c) for c in BAD])
def test_malformed_params_raise_one_line_config_error(case_id, raw, key, needles):
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    assert_one_line_error(info.value, key, *needles)


def test_bad_cases_cover_at_least_24_distinct_inputs():
    assert len({c.id if hasattr(c, "id") else c[0] for c in BAD}) == len(BAD) >= 24


def test_milestones_type_message_wording():
    with pytest.raises(ConfigError) as info:
        parse_params(params_with(train={"milestones": "5,10"}))
    assert "expected a list of integers," in str(info.value)


def test_unknown_key_with_newline_gives_one_line_message():
    with pytest.raises(ConfigError) as info:
        parse_params(params_with(data={"data\nset": "digits"}))
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------------------
# File-level errors and YAML 1.2 parsing
# --------------------------------------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert_one_line_error(info.value, "", "file not found", str(path))


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_params(tmp_path)
    assert_one_line_error(info.value, "", "file not found")


@pytest.mark.parametrize(
    "text, needles",
    [
        pytest.param("data: [\n", ("line 2",), id="unclosed-flow"),
        pytest.param("train:\n\tlr: 0.1\n", ("line 2", "column 1"), id="tab-indent"),
        pytest.param("runs:\n  a: {model: mlp}\n  a: {model: mlp}\n", ("duplicate key",), id="duplicate-key"),
        pytest.param("data: {dataset: 'digits}\n", (), id="unterminated-quote"),
        pytest.param("x: !!python/object:os.system {}\n", ("line 1",), id="python-tag-unsafe"),
    ],
)
def test_invalid_yaml_syntax(tmp_path, text, needles):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert_one_line_error(info.value, "", str(path), "not valid YAML", *needles)


def test_empty_file_is_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_params(write(tmp_path, "# only a comment\n"))
    assert_one_line_error(info.value, "", "data", "model", "train", "runs")


def test_yaml_1_2_exponent_without_dot_is_a_float(tmp_path):
    params = load_params(
        write(tmp_path, "train:\n  lr: 5e-4\n  weight_decay: 1e-5\nruns:\n  a: {model: mlp, lr: 2e-3}\n")
    )
    assert params.train.lr == 5e-4 and isinstance(params.train.lr, float)
    assert params.train.weight_decay == 1e-5
    assert params.run("a").train.lr == 2e-3


def test_yaml_1_2_yes_is_a_string_not_a_bool(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_params(write(tmp_path, "data:\n  download: yes\nruns:\n  a: {model: mlp}\n"))
    assert_one_line_error(info.value, "data.download", "true or false", "'yes'")


def test_yaml_empty_section_means_defaults(tmp_path):
    params = load_params(write(tmp_path, "data:\nmodel:\ntrain:\nruns:\n  a: {model: resnet20}\n"))
    assert (params.data, params.model, params.train) == (DataConfig(), ModelConfig(), TrainConfig())


def test_file_level_key_error_from_yaml(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_params(write(tmp_path, "train:\n  optimizer: rmsprop\nruns:\n  a: {model: mlp}\n"))
    assert_one_line_error(info.value, "train.optimizer", "sgd", "adam")


def test_undecodable_file_is_config_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"data: {dataset: \xff\xfe}\nruns: {a: {model: mlp}}\n")
    with pytest.raises(ConfigError):
        load_params(path)


# --------------------------------------------------------------------------------------------------------------
# Valid params: defaults, overrides, frozenness
# --------------------------------------------------------------------------------------------------------------


def test_minimal_params_give_documented_defaults():
    params = parse_params(MINIMAL)
    assert (params.data, params.model, params.train) == (DataConfig(), ModelConfig(), TrainConfig())
    d, m, t = params.data, params.model, params.train
    assert (d.dataset, d.root, d.download, d.test_fraction, d.train_samples, d.probe_size, d.seed) == (
        "digits",
        "data/raw",
        False,
        0.25,
        0,
        512,
        0,
    )
    assert (d.synthetic_samples, d.synthetic_classes, d.synthetic_size, d.synthetic_channels) == (600, 3, 8, 1)
    assert (m.mlp_depth, m.mlp_width, m.mlp_activation) == (2, 128, "relu")
    assert (t.epochs, t.batch_size, t.optimizer, t.lr, t.momentum, t.nesterov, t.weight_decay) == (
        30,
        64,
        "sgd",
        0.05,
        0.9,
        False,
        5e-4,
    )
    assert (t.adam_beta1, t.adam_beta2, t.schedule, t.milestones, t.gamma) == (0.9, 0.999, "cosine", (), 0.1)
    assert (t.checkpoint_every, t.log_every, t.eval_batch_size, t.seed, t.device) == (5, 0, 1024, 0, "auto")
    (run,) = params.runs
    assert (run.name, run.model_name, run.model, run.train) == ("mlp", "mlp", m, t)


def test_run_overrides_merge_over_sections():
    raw = {
        "model": {"mlp_depth": 3},
        "train": {"epochs": 7, "optimizer": "adam"},
        "runs": {"a": {"model": "mlp", "lr": 0.2, "mlp_width": 8}, "b": {"model": "resnet20"}},
    }
    params = parse_params(raw)
    a, b = params.run("a"), params.run("b")
    assert [r.name for r in params.runs] == ["a", "b"]
    assert a.model_name == "mlp" and b.model_name == "resnet20"
    assert a.train == dataclasses.replace(params.train, lr=0.2)
    assert a.model == dataclasses.replace(params.model, mlp_width=8)
    assert (a.train.epochs, a.train.optimizer, a.model.mlp_depth) == (7, "adam", 3)
    assert b.train == params.train and b.model == params.model
    assert params.train.lr == 0.05 and params.model.mlp_width == 128  # sections themselves are untouched


def test_run_override_can_fix_a_cross_field_combination():
    raw = {
        "train": {"schedule": "step", "milestones": [10]},
        "runs": {"a": {"model": "mlp", "schedule": "cosine", "milestones": []}},
    }
    params = parse_params(raw)
    assert params.run("a").train.schedule == "cosine" and params.run("a").train.milestones == ()


@pytest.mark.parametrize(
    "section, values",
    [
        pytest.param("train", {"lr": 1}, id="int-lr-coerced"),
        pytest.param("train", {"device": "cuda:3"}, id="device-cuda-n"),
        pytest.param("train", {"device": "mps"}, id="device-mps"),
        pytest.param("train", {"schedule": "step", "milestones": [10, 20], "gamma": 1.0}, id="step-schedule"),
        pytest.param("train", {"nesterov": True, "momentum": 0.5}, id="nesterov-sgd"),
        pytest.param("train", {"optimizer": "adam", "momentum": 0.0}, id="adam-momentum-0"),
        pytest.param("model", {"mlp_depth": 0, "mlp_activation": "gelu"}, id="mlp-depth-0"),
        pytest.param("data", {"dataset": "synthetic", "test_fraction": 0.5, "probe_size": 1}, id="synthetic"),
    ],
)
def test_valid_edge_values_are_accepted(section, values):
    params = parse_params(params_with(**{section: values}))
    cfg = getattr(params, section)
    for name, value in values.items():
        got = getattr(cfg, name)
        assert got == (tuple(value) if isinstance(value, list) else value)
    assert isinstance(params.train.lr, float)


def test_configs_are_frozen():
    params = parse_params(params_with(train={"milestones": [5]}))
    run = params.run("mlp")
    for obj, name, value in [
        (params.data, "dataset", "mnist"),
        (params.model, "mlp_width", 1),
        (params.train, "lr", 1.0),
        (run, "name", "x"),
        (run.train, "epochs", 1),
        (params, "runs", ()),
    ]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, value)
    assert isinstance(params.train.milestones, tuple) and isinstance(params.runs, tuple)


def test_run_lookup_unknown_name_lists_defined_runs():
    params = parse_params({"runs": {"alpha": {"model": "mlp"}, "beta": {"model": "resnet20_noshort"}}})
    with pytest.raises(ConfigError) as info:
        params.run("nope")
    assert_one_line_error(info.value, "runs", "'nope'", "alpha", "beta")


def test_run_to_dict_round_trips_through_parse():
    params = parse_params(run_with(lr=0.3, mlp_width=16))
    d = params.run("a").to_dict()
    assert d["name"] == "a" and d["model_name"] == "mlp"
    assert d["train"]["lr"] == 0.3 and d["model"]["mlp_width"] == 16
    again = parse_params({"model": d["model"], "train": d["train"], "runs": {"a": {"model": "mlp"}}})
    assert again.run("a") == params.run("a")


def test_spec_rejects_mutable_defaults():
    from pipeline.config import spec

    with pytest.raises(TypeError):
        spec([])


def test_repo_params_yaml_loads_cleanly():
    path = REPO / "params.yaml"
    if not path.is_file():
        pytest.skip("no params.yaml in the repository")
    params = load_params(path)
    assert isinstance(params, Params) and params.runs
    assert all(isinstance(r, RunConfig) and r.model_name in MODELS for r in params.runs)


@pytest.mark.parametrize("cls", [DataConfig, ModelConfig, TrainConfig, HessianConfig])
def test_numeric_fields_declare_a_bound_or_unit(cls):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else tp
        if item in (int, float):
            meta = f.metadata
            has_bound = any(meta.get(b) is not None for b in ("ge", "gt", "le", "lt"))
            assert has_bound or meta.get("unit"), f"{cls.__name__}.{f.name} has neither a bound nor a unit"
            default = f.default
            values = default if isinstance(default, tuple) else (default,)
            assert all(isinstance(v, item) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def test_hessian_checkpoint_selection_accepts_names_and_integers():
    assert parse_params(params_with(hessian={"checkpoints": 3, "details": "all"})).hessian.checkpoints == 3
    assert parse_params(params_with()).hessian == HessianConfig()
    assert parse_params(params_with(hessian={"trace": []})).hessian.trace == ()
