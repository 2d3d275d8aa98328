"""Typed, validated configuration: one frozen dataclass per ``params.yaml`` section.

Every field declares its type, its allowed range or names, its unit and what it means (``unit`` and ``doc`` in the
field metadata, mirrored by the comment beside it in ``params.yaml``; ``docs/params.md`` is generated from them by
:mod:`pipeline.docs`). Loading fails before any compute with a :class:`ConfigError` whose
message names the dotted key and what is allowed, e.g. ``train.lr: must be > 0, got -0.1``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

DATASETS = ("digits", "synthetic", "cifar10", "mnist", "fashion_mnist", "npz", "image_folder")
NPZ_LAYOUTS = ("nchw", "nhwc")
IMAGE_MODES = ("rgb", "grayscale")
MODELS = ("mlp", "resnet", "resnet20", "resnet20_noshort")  # the built-in names the docs list; see MODEL_NAMES
RESNET_NAME = re.compile(r"resnet(\d+)(_noshort)?")
IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
MODEL_NAMES = (
    "mlp, resnet, resnet<depth> or resnet<depth>_noshort (depth 6n + 2: 8, 14, 20, 32, 44, 56, 110, ...), "
    "or an import path package.module:callable"
)
RESNET_NORMS = ("batch", "group", "layer", "none")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "step", "cosine")
ACTIVATIONS = ("relu", "tanh", "gelu", "elu")
EIGEN_METHODS = ("lanczos", "power", "arpack")
TRACE_METHODS = ("hutchinson", "hutchpp")
FLATNESS_MEASURES = ("epsilon", "pac_bayes", "adaptive")
CURVATURE_OPERATORS = ("hessian", "ggn")
GROUP_LEVELS = ("none", "block", "module")
HVP_METHODS = ("reverse_over_reverse", "forward_over_reverse", "double_backward")
DTYPES = ("float32", "float64")
PLANES = ("random", "pca", "eigen")
DIRECTION_NORMS = ("filter", "layer", "none")
DIRECTION_IGNORES = ("biasbn", "none")
LINE_SPLITS = ("train", "test")
ALIGN_METHODS = ("none", "weights", "activations")
PATH_STATISTICS = ("reset", "repair")
EXECUTORS = ("local", "dask")
LOSSES = ("cross_entropy", "mse")
TRACK_UNITS = ("steps", "epochs")
FULL_BATCH = "full"
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")
_RUN_NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")

# Upper bounds of the size-like keys: generous for research, but they stop absurd values (a typo's extra digits)
# before any work, with one line naming the key, instead of an allocation error or a run that never ends.
MAX_SEED = 2**31 - 1  # seeds plus their offsets (seed + 1, + 11, + 17, partner offset) stay in numpy's 32-bit range
MAX_EPOCHS = 100_000
MAX_SAMPLES = 10_000_000  # samples: far above every supported train split (MNIST's 60,000); `prepare` checks the split
MAX_BATCH = 1_000_000  # samples per step or per forward; the stages check train batch sizes against the split
MAX_STEPS = 10**9  # optimisation steps (intervals counted in steps)
MAX_HVPS = 1_000_000  # Hessian-vector products of one solve (a ResNet20 product takes ~10 ms on a CPU: ~3 hours)
MAX_EIGENPAIRS = (
    1000  # the Krylov basis holds ~2k + 10 float64 vectors of the parameter count (ResNet20: 4.4 GB at 1000)
)
MAX_LINE_POINTS = 100_001  # one forward pass over the probe set per point and split
MAX_SURFACE_POINTS = 2001  # per axis: 2001^2 = 4.0M points, ~1 GiB of coordinates and tables, hours of forwards
SURFACE_BYTES_PER_POINT = 256  # coordinates (float64 x 2), loss/accuracy, tile files and the table (pandas + Arrow)
MAX_CURVATURE_MAP = 201  # per axis: every sub-grid point is one eigen-solve (201^2 = 40,401 solves)
MAX_RESNET_DEPTH = 1202  # He et al.'s deepest CIFAR ResNet
MAX_MLP_HIDDEN_PARAMETERS = 2**28  # 268M: float32 weights, gradients, optimiser state and Krylov vectors of 8 bytes
MAX_SYNTHETIC_BYTES = 4 * 2**30  # the synthetic inputs are generated in memory as float32


def _bytes(n: float) -> str:
    """``n`` bytes in binary units, e.g. ``75 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PiB"  # pragma: no cover


def surface_estimate(points: int) -> str:
    """What a ``points`` x ``points`` grid costs, for the error message of ``landscape.surface_points``."""
    total = points * points
    return (
        f"a {points} x {points} grid is {total:.3g} points, about {_bytes(total * SURFACE_BYTES_PER_POINT)} of "
        f"coordinates and tables at {SURFACE_BYTES_PER_POINT} bytes per point"
    )


def _printable(text: str) -> str:
    """Escape control characters so that an error stays on one line whatever the user's keys contain."""
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range.

    ``str(error)`` is one line: ``<dotted key>: <what is wrong and what is allowed>``.
    """

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        key, message = _printable(key), _printable(message)
        super().__init__(f"{key}: {message}" if key else message)


def spec(
    default: Any,
    *,
    unit: str = "",
    ge=None,
    gt=None,
    le=None,
    lt=None,
    choices=None,
    pattern=None,
    estimate=None,
    validate=None,
    mapping: bool = False,
    doc: str = "",
):
    """A dataclass field with its validation rules, unit and explanation kept in the metadata.

    ``estimate``: ``value -> str``, the cost of a value, added to the message when an upper bound fails.
    ``validate``: ``(key, value) -> value``, a check of its own (raising :class:`ConfigError`), after the type's.
    ``mapping``: the value is a mapping of names to plain values (strings, numbers, booleans, null and lists of
    them), kept as a sorted tuple of ``(name, value)`` pairs so that the config stays frozen.
    ``doc``: what the key means, for the generated reference ``docs/params.md`` (:mod:`pipeline.docs`); it plays no
    part in validation, ``dataclasses.asdict`` or any fingerprint.
    """
    meta = dict(
        unit=unit,
        ge=ge,
        gt=gt,
        le=le,
        lt=lt,
        choices=choices,
        pattern=pattern,
        estimate=estimate,
        validate=validate,
        mapping=mapping,
        doc=doc,
    )
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults so that configs stay frozen")
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """``data`` section: which dataset, how it is split, and the fixed probe subset."""

    dataset: str = spec("digits", choices=DATASETS, doc="name")
    root: str = spec("data/raw", doc="folder holding torchvision datasets (cifar10, mnist, fashion_mnist)")
    download: bool = spec(False, doc="allow torchvision to download into `root` (needs internet)")
    test_fraction: float = spec(0.25, gt=0.0, lt=1.0, unit="fraction of samples", doc="digits/synthetic only")
    train_samples: int = spec(
        0, ge=0, le=MAX_SAMPLES, unit="samples", doc="keep a stratified subset of the train split; 0 = all"
    )
    probe_size: int = spec(
        512, ge=1, le=MAX_SAMPLES, unit="samples", doc="fixed probe subset of the train split (curvature, scans)"
    )
    seed: int = spec(0, ge=0, le=MAX_SEED, doc="split, subset and probe selection")
    synthetic_samples: int = spec(600, ge=4, le=MAX_SAMPLES, unit="samples", doc="synthetic only: train + test")
    synthetic_classes: int = spec(3, ge=2, le=1000, unit="classes", doc="synthetic only")
    synthetic_size: int = spec(8, ge=1, le=1024, unit="pixels per side", doc="synthetic only")
    synthetic_channels: int = spec(1, ge=1, le=64, unit="channels", doc="synthetic only")
    path: str = spec("", doc="npz: the .npz file; image_folder: the folder holding train/ and test/")
    npz_layout: str = spec("nchw", choices=NPZ_LAYOUTS, doc="npz only: axis order of 4-D image arrays")
    image_size: int = spec(
        0, ge=0, le=4096, unit="pixels per side", doc="image_folder only: resize to a square; 0 = keep (all equal)"
    )
    image_mode: str = spec("rgb", choices=IMAGE_MODES, doc="image_folder only: 3 channels or 1")
    classes: int = spec(
        0, ge=0, le=100_000, unit="classes", doc="npz only: number of classes; 0 = the largest label + 1"
    )

    def __post_init__(self):
        if self.dataset in ("npz", "image_folder") and not self.path:
            what = "an .npz file" if self.dataset == "npz" else "a folder with train/ and test/ class folders"
            raise ConfigError("data.path", f"dataset {self.dataset} needs a path: {what}")
        if self.dataset == "synthetic":  # generated in memory: estimate the inputs before generating them
            need = self.synthetic_samples * self.synthetic_channels * self.synthetic_size**2 * 4
            if need > MAX_SYNTHETIC_BYTES:
                raise ConfigError(
                    "data.synthetic_samples",
                    f"{self.synthetic_samples} samples of {self.synthetic_channels} x "
                    f"{self.synthetic_size} x {self.synthetic_size} float32 are about {_bytes(need)} of "
                    f"inputs; allowed up to {_bytes(MAX_SYNTHETIC_BYTES)} (fewer samples, a smaller "
                    f"synthetic_size or fewer synthetic_channels)",
                )


def check_model_name(key: str, value: str) -> str:
    """A run's ``model``: a built-in name (``resnet<depth>`` with depth 6n + 2) or ``package.module:callable``."""
    match = RESNET_NAME.fullmatch(value)
    if match:
        depth = int(match.group(1))
        if depth < 8 or (depth - 2) % 6 or depth > MAX_RESNET_DEPTH:
            raise ConfigError(
                key, f"{value!r}: a CIFAR ResNet has depth 6n + 2 between 8 and {MAX_RESNET_DEPTH}, got {depth}"
            )
        return value
    if value in MODELS or IMPORT_PATH.fullmatch(value):
        return value
    raise ConfigError(key, f"unknown model {value!r}; allowed: {MODEL_NAMES}")


def _plain(key: str, value: Any) -> Any:
    """A YAML value made of strings, numbers, booleans, null and lists of them (lists as tuples)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
            raise ConfigError(key, f"must be finite, got {value!r}")
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_plain(f"{key}[{i}]", v) for i, v in enumerate(value))
    raise ConfigError(
        key, f"expected a plain value (string, number, true/false, null or a list of them), got {type(value).__name__}"
    )


@dataclass(frozen=True)
class ModelConfig:
    """``model`` section: architecture hyper-parameters shared by the runs (a run may override them)."""

    mlp_depth: int = spec(2, ge=0, le=1000, unit="hidden layers")
    mlp_width: int = spec(128, ge=1, le=65536, unit="units per hidden layer")
    mlp_activation: str = spec("relu", choices=ACTIVATIONS, doc="name")
    mlp_widths: tuple[int, ...] = spec(
        (),
        ge=1,
        le=65536,
        unit="units per hidden layer",
        doc="one width per hidden layer; replaces mlp_depth x mlp_width",
    )
    resnet_depth: int = spec(
        20, ge=8, le=MAX_RESNET_DEPTH, unit="layers", doc="6n + 2 (20, 32, 44, 56, 110); model `resnet` only"
    )
    resnet_width: float = spec(
        1.0, gt=0.0, le=64.0, unit="width multiplier k", doc="16k, 32k, 64k channels per stage (16k whole)"
    )
    resnet_shortcut: bool = spec(True, doc="skip connections (false: no shortcuts, as Li et al.); model `resnet` only")
    resnet_norm: str = spec(
        "batch", choices=RESNET_NORMS, doc="after every convolution; layer = one group over channels and pixels"
    )
    resnet_groups: int = spec(
        8, ge=1, le=4096, unit="groups", doc="norm group: the largest divisor of the channels <= this"
    )
    model_kwargs: tuple[tuple[str, Any], ...] = spec(
        (), mapping=True, doc="keyword arguments of a model from an import path: a mapping of plain values"
    )

    def __post_init__(self):
        # Hidden-to-hidden weights alone (the input and output layers depend on the dataset); every analysis also
        # keeps gradients, optimiser state and float64 Krylov vectors of this size.
        widths = self.mlp_widths or (self.mlp_width,) * self.mlp_depth
        hidden = sum(a * (b + 1) for a, b in zip(widths[:-1], widths[1:]))
        if hidden > MAX_MLP_HIDDEN_PARAMETERS:
            key = "model.mlp_widths" if self.mlp_widths else "model.mlp_width"
            layers = (
                f"hidden layers of {', '.join(map(str, widths))} units"
                if self.mlp_widths
                else f"{self.mlp_depth} hidden layers of {self.mlp_width} units"
            )
            raise ConfigError(
                key,
                f"{layers} hold {hidden:.3g} parameters (about {_bytes(4 * hidden)} in float32) "
                f"between hidden layers; allowed up to {MAX_MLP_HIDDEN_PARAMETERS:.3g} "
                f"(smaller or fewer hidden layers)",
            )
        if (self.resnet_depth - 2) % 6:
            raise ConfigError(
                "model.resnet_depth", f"must be 6n + 2 (8, 14, 20, 32, 44, 56, 110), got {self.resnet_depth}"
            )
        if (16 * self.resnet_width) != int(16 * self.resnet_width):
            raise ConfigError(
                "model.resnet_width",
                f"16 x {self.resnet_width:g} = {16 * self.resnet_width:g} is not a whole number of channels "
                "(allowed: multiples of 1/16, e.g. 0.25, 0.5, 1, 2)",
            )


@dataclass(frozen=True)
class TrainConfig:
    """``train`` section: optimiser, schedule, checkpointing and logging (a run may override any key)."""

    epochs: int = spec(30, ge=1, le=MAX_EPOCHS, unit="epochs")
    batch_size: int | str = spec(
        64, ge=1, le=MAX_BATCH, unit="samples per step", doc="or `full`: full-batch gradient descent"
    )
    loss: str = spec("cross_entropy", choices=LOSSES, doc="cross_entropy | mse (squared error to the one-hot target)")
    optimizer: str = spec("sgd", choices=OPTIMIZERS, doc="name")
    lr: float = spec(0.05, gt=0.0, unit="learning rate per step (peak of the schedule)")
    momentum: float = spec(0.9, ge=0.0, lt=1.0, unit="SGD heavy-ball coefficient")
    nesterov: bool = spec(False, doc="SGD only; needs momentum > 0")
    weight_decay: float = spec(5e-4, ge=0.0, unit="L2 coefficient added to the gradient")
    adam_beta1: float = spec(0.9, ge=0.0, lt=1.0, doc="Adam only")
    adam_beta2: float = spec(0.999, ge=0.0, lt=1.0, doc="Adam only")
    schedule: str = spec("cosine", choices=SCHEDULES, doc="name")
    milestones: tuple[int, ...] = spec(
        (), le=MAX_EPOCHS, unit="epochs", doc="step schedule: epochs at which lr *= gamma"
    )
    gamma: float = spec(0.1, gt=0.0, le=1.0, unit="factor per milestone", doc="step schedule")
    checkpoint_every: int = spec(5, ge=1, le=MAX_EPOCHS, unit="epochs", doc="plus the init and final checkpoints")
    log_every: int = spec(
        0, ge=0, le=MAX_STEPS, unit="steps", doc="extra per-step history rows; 0 = per-epoch rows only"
    )
    eval_batch_size: int = spec(
        1024, ge=1, le=MAX_BATCH, unit="samples per forward", doc="evaluation only; results do not change"
    )
    track_sharpness_every: int = spec(
        5, ge=0, le=MAX_STEPS, unit="steps or epochs (track_sharpness_unit)", doc="0 = off"
    )
    track_sharpness_unit: str = spec("epochs", choices=TRACK_UNITS, doc="unit of track_sharpness_every")
    track_tol: float = spec(1e-3, gt=0.0, lt=1.0, unit="Ritz residual / lambda_max", doc="tracked lambda_max (Lanczos)")
    track_max_hvps: int = spec(200, ge=10, le=MAX_HVPS, unit="Hessian-vector products per tracked lambda_max")
    track_batches: int = spec(
        8,
        ge=0,
        le=10_000,
        unit="mini-batches",
        doc="fixed mini-batches of the run's own batch size for the tracked batch sharpness; 0 = off",
    )
    seed: int = spec(0, ge=0, le=MAX_SEED, doc="initialisation and batch order")
    device: str = spec("auto", pattern=_DEVICE_PATTERN, doc="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")

    def __post_init__(self):
        if isinstance(self.batch_size, str) and self.batch_size != FULL_BATCH:
            raise ConfigError(
                "train.batch_size",
                f"expected an integer >= 1 or 'full' (full-batch gradient descent), got {self.batch_size!r}",
            )
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0.0):
            raise ConfigError("train.nesterov", "needs optimizer: sgd and momentum > 0")
        if list(self.milestones) != sorted(set(self.milestones)) or any(m < 1 for m in self.milestones):
            raise ConfigError(
                "train.milestones", f"must be strictly increasing epochs >= 1, got {list(self.milestones)}"
            )
        if self.schedule == "step" and not self.milestones:
            raise ConfigError("train.milestones", "schedule: step needs at least one milestone (epochs)")
        if self.schedule == "step" and self.milestones[-1] >= self.epochs:  # epochs count from 0: it would never apply
            raise ConfigError(
                "train.milestones", f"must be < epochs ({self.epochs}) to take effect, got {list(self.milestones)}"
            )


def _check_checkpoint_selection(key: str, value) -> None:
    if isinstance(value, str) and value not in ("final", "all"):
        raise ConfigError(
            key,
            f"unknown selection {value!r}; allowed: final, all, or an integer k >= 1 (every k-th checkpoint plus the final one)",  # noqa: E501
        )
    if isinstance(value, int) and value < 1:
        raise ConfigError(key, f"must be final, all, or an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class HessianConfig:
    """``hessian`` section: curvature of the probe-set loss at the checkpoints (BatchNorm in eval mode, no dropout).

    Eigenvalues come at every checkpoint of ``checkpoints``; the costlier details (trace, spectral density, the
    Gauss-Newton operator, per-group spectra) at those of ``details``.
    """

    checkpoints: str | int = spec(
        "all", doc="final | all | k: every k-th checkpoint (by epoch order) plus the final one"
    )
    details: str | int = spec("final", doc="same choices: where trace, density, GGN and per-group spectra are computed")
    method: str = spec(
        "lanczos", choices=EIGEN_METHODS, doc="eigen-solver (power = PyHessian's deflated power iteration)"
    )
    top_k: int = spec(5, ge=1, le=MAX_EIGENPAIRS, unit="eigenvalues", doc="largest eigenvalues, with eigenvectors")
    lambda_min: bool = spec(True, doc="also the most negative (smallest algebraic) eigenvalue")
    tol: float = spec(
        1e-3, gt=0.0, lt=1.0, unit="Ritz residual / |lambda_max|", doc="lanczos/arpack; power: relative change"
    )
    max_hvps: int = spec(600, ge=10, le=MAX_HVPS, unit="Hessian-vector products per eigen-solve")
    power_iters: int = spec(
        100, ge=1, le=MAX_HVPS, unit="products per eigenvalue", doc="power only (PyHessian's maxIter)"
    )
    trace: tuple[str, ...] = spec(("hutchinson", "hutchpp"), doc="trace estimators (hutchinson, hutchpp); [] = none")
    trace_hvps: int = spec(60, ge=4, le=MAX_HVPS, unit="Hessian-vector products per estimator")
    density_runs: int = spec(
        2, ge=0, le=1000, unit="random start vectors", doc="stochastic Lanczos quadrature; 0 = no density"
    )
    density_steps: int = spec(64, ge=2, le=10_000, unit="Lanczos steps per run")
    density_sigma: float = spec(0.01, gt=0.0, unit="fraction of the spectrum's range", doc="Gaussian smoothing width")
    density_points: int = spec(500, ge=10, le=1_000_000, unit="grid points")
    operators: tuple[str, ...] = spec(("hessian",), doc="hessian (always at `checkpoints`), ggn (at `details`)")
    groups: str = spec(
        "block", choices=GROUP_LEVELS, doc="per-group top eigenvalue at `details`: block | module | none"
    )
    group_top_k: int = spec(1, ge=1, le=MAX_EIGENPAIRS, unit="eigenvalues per group")
    noise: bool = spec(True, doc="at `checkpoints`: gradient noise scale (per-sample gradients) and g'Hg/|g|^2")
    flatness: tuple[str, ...] = spec(
        ("epsilon", "pac_bayes", "adaptive"), doc="at `details`: epsilon, pac_bayes, adaptive; [] = none"
    )
    flatness_radius: float = spec(0.5, gt=0.0, unit="L2 norm of the weight perturbation", doc="epsilon-ball (absolute)")
    flatness_box: float = spec(1e-3, gt=0.0, unit="fraction of |w_i| + 1", doc="Keskar et al.'s box (relative)")
    flatness_steps: int = spec(20, ge=1, le=MAX_HVPS, unit="ascent steps per start", doc="projected gradient ascent")
    pac_bayes_bound: float = spec(0.1, gt=0.0, unit="nats of expected loss increase", doc="the largest sigma within it")
    pac_bayes_draws: int = spec(
        10, ge=1, le=100_000, unit="noise draws", doc="the same draws for every sigma of the bisection"
    )
    adaptive_l2: float = spec(0.1, gt=0.0, unit="rho: ||delta / |w| ||_2 <= rho", doc="adaptive worst case, l2")
    adaptive_linf: float = spec(1e-3, gt=0.0, unit="rho: |delta_i| <= rho |w_i|", doc="adaptive worst case, l-inf")
    adaptive_average: float = spec(
        0.05, gt=0.0, unit="rho: delta_i = rho |w_i| z_i", doc="adaptive average case (z Gaussian; uniform: l-inf)"
    )
    adaptive_m: int = spec(
        128, ge=0, le=MAX_BATCH, unit="samples per batch", doc="m-sharpness: fixed batches of the probe set; 0 = whole"
    )
    adaptive_draws: int = spec(10, ge=1, le=100_000, unit="noise draws", doc="average case, the same draws everywhere")
    reparam_alpha: float = spec(
        10.0, ge=0.0, unit="scale", doc="Dinh et al.'s rescaling at `details` (ReLU layer pairs); 0 = off"
    )
    hvp: str = spec("reverse_over_reverse", choices=HVP_METHODS, doc="chosen by benchmarks/hvp.py; see README")
    batch_size: int = spec(
        512, ge=1, le=MAX_BATCH, unit="samples per forward", doc="splits the probe set; does not change results"
    )
    dtype: str = spec("float32", choices=DTYPES, doc="network precision for the products (solvers run in float64)")
    device: str = spec("auto", pattern=_DEVICE_PATTERN, doc="auto | cpu | cuda | cuda:N")
    seed: int = spec(0, ge=0, le=MAX_SEED, doc="start vectors and trace probes")

    def __post_init__(self):
        _check_checkpoint_selection("hessian.checkpoints", self.checkpoints)
        _check_checkpoint_selection("hessian.details", self.details)
        for key, values, allowed in (
            ("trace", self.trace, TRACE_METHODS),
            ("operators", self.operators, CURVATURE_OPERATORS),
            ("flatness", self.flatness, FLATNESS_MEASURES),
        ):
            for i, value in enumerate(values):
                if value not in allowed:
                    raise ConfigError(f"hessian.{key}[{i}]", f"unknown name {value!r}; allowed: {', '.join(allowed)}")
            if len(set(values)) != len(values):
                raise ConfigError(f"hessian.{key}", f"names must not repeat, got {list(values)}")
        needed = 2 * (max(self.top_k, self.group_top_k) + int(self.lambda_min)) + 10
        if self.max_hvps < needed:
            raise ConfigError(
                "hessian.max_hvps",
                f"must be >= {needed} for top_k {self.top_k} (a Krylov basis of twice "
                f"the wanted pairs plus the residual products), got {self.max_hvps}",
            )
        if "hessian" not in self.operators:
            raise ConfigError("hessian.operators", f"must include 'hessian', got {list(self.operators)}")


@dataclass(frozen=True)
class LandscapeConfig:
    """``landscape`` section: the 1-D scans (``interpolate``) and 2-D surfaces (``surface``) around each run's final
    checkpoint, and how their grid points are evaluated (batched engine, tiles, executor).

    Every direction is scaled to the norm of the filter-normalised random direction (which has, filter by filter, the
    norm of the weights), so a coordinate means the same distance for random, PCA and eigenvector directions.
    """

    norm: str = spec("filter", choices=DIRECTION_NORMS, doc="random directions: filter (Li et al. 2018) | layer | none")
    ignore: str = spec("biasbn", choices=DIRECTION_IGNORES, doc="biasbn: biases and BatchNorm parameters do not move")
    seed: int = spec(0, ge=0, le=MAX_SEED, doc="random directions: x uses seed, y uses seed + 1 (1-D: seed)")
    line_points: int = spec(
        41, ge=3, le=MAX_LINE_POINTS, unit="points", doc="final + alpha * d, alpha in [-line_range, line_range]"
    )
    line_range: float = spec(1.0, gt=0.0, unit="direction lengths")
    path_points: int = spec(
        21, ge=3, le=MAX_LINE_POINTS, unit="points", doc="on t in [0, 1]: init -> final, final -> partner"
    )
    splits: tuple[str, ...] = spec(("train", "test"), doc="1-D scans evaluated on: train | test")
    partner_seed_offset: int = spec(
        1, ge=1, le=1_000_000, doc="mode connectivity partner: the run retrained with train.seed + offset"
    )
    align: str = spec(
        "weights",
        choices=ALIGN_METHODS,
        doc="partner permuted to the run's unit order before its path: none | weights (Ainsworth et al. 2023) | "
        "activations (Jordan et al. 2023)",
    )
    align_passes: int = spec(100, ge=1, le=100_000, unit="passes", doc="weight matching stops earlier at no gain")
    path_bn: tuple[str, ...] = spec(
        ("reset", "repair"),
        doc="more variants of the (aligned) partner path: reset (BatchNorm statistics recomputed at each point) | "
        "repair (REPAIR: channel statistics set to the endpoints' interpolation); [] = none",
    )
    stats_batch_size: int = spec(
        0,
        ge=0,
        le=MAX_BATCH,
        unit="samples per forward",
        doc="statistics pass of reset and repair over the train split; 0 = all at once (exact population statistics)",
    )
    plane: str = spec("random", choices=PLANES, doc="2-D plane: random | pca (of the trajectory) | eigen (top two)")
    surface_points: int = spec(41, ge=2, le=MAX_SURFACE_POINTS, unit="points per axis", estimate=surface_estimate)
    surface_range: float = spec(1.0, gt=0.0, unit="direction lengths", doc="grid over [-range, range]^2")
    curvature_map: int = spec(
        0,
        ge=0,
        le=MAX_CURVATURE_MAP,
        unit="points per axis",
        doc="|lambda_min/lambda_max| on a coarse sub-grid; 0 = off",
    )
    curvature_tol: float = spec(1e-2, gt=0.0, lt=1.0, unit="Ritz residual / |lambda_max|", doc="curvature map solves")
    tile_size: int = spec(
        256,
        ge=1,
        le=MAX_SURFACE_POINTS**2,
        unit="points per tile",
        doc="one Prefect task per tile; finished tiles are kept",
    )
    chunk: int = spec(0, ge=0, le=65536, unit="points per forward", doc="0 = measured once per model and device")
    batch_size: int = spec(512, ge=1, le=MAX_BATCH, unit="samples per forward", doc="does not change results")
    executor: str = spec("local", choices=EXECUTORS, doc="local (this process) | dask (prefect-dask)")
    scheduler: str = spec("", doc='dask: scheduler address, e.g. tcp://10.0.0.5:8786; "" = LocalCluster on 127.0.0.1')
    workers: int = spec(2, ge=1, le=1024, unit="processes", doc="dask LocalCluster only")
    device: str = spec("auto", pattern=_DEVICE_PATTERN, doc="auto | cpu | cuda | cuda:N")

    def __post_init__(self):
        for i, value in enumerate(self.splits):
            if value not in LINE_SPLITS:
                raise ConfigError(
                    f"landscape.splits[{i}]", f"unknown split {value!r}; allowed: {', '.join(LINE_SPLITS)}"
                )
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ConfigError(
                "landscape.splits", f"need one or both of train, test without repeats, got {list(self.splits)}"
            )
        for i, value in enumerate(self.path_bn):
            if value not in PATH_STATISTICS:
                raise ConfigError(
                    f"landscape.path_bn[{i}]", f"unknown variant {value!r}; allowed: {', '.join(PATH_STATISTICS)}"
                )
        if len(set(self.path_bn)) != len(self.path_bn):
            raise ConfigError("landscape.path_bn", f"variants must not repeat, got {list(self.path_bn)}")
        for key in ("line_points", "surface_points"):
            if getattr(self, key) % 2 == 0:
                raise ConfigError(
                    f"landscape.{key}",
                    f"must be odd, so that the trained model (0) is a grid point; got {getattr(self, key)}",
                )
        if self.scheduler and self.executor != "dask":
            raise ConfigError(
                "landscape.scheduler", "is read only with executor: dask; set executor: dask or leave it empty"
            )
        if self.scheduler and not re.fullmatch(r"(tcp|tls|ucx|inproc)://\S+", self.scheduler):
            raise ConfigError(
                "landscape.scheduler", f"expected a Dask address like tcp://HOST:PORT, got {self.scheduler!r}"
            )


@dataclass(frozen=True)
class ReproConfig:
    """``repro`` section: the kernel and thread settings that make CPU results the same bits on every machine.

    PyTorch's CPU kernels (ATen's vectorised loops, oneDNN convolutions, MKL GEMMs) dispatch on the CPU's
    instruction set and split reductions by thread count, and hundreds of SGD steps amplify the last-bit
    differences. ``pin`` caps all three at AVX2, which every x86-64 machine of the last decade has, and ``threads``
    fixes the intra-op thread count; both are set before torch is imported in every stage process (see
    :mod:`pipeline.repro`) and recorded in every table's provenance. ``seeds`` is how many training seeds each run
    has (:mod:`pipeline.sweep.seeds`): one run proves nothing when the noise of its seed is as large as the effect.
    """

    pin: bool = spec(
        True, doc="CPU kernels at AVX2 (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_CBWR); false = native"
    )
    threads: int = spec(
        2,
        ge=0,
        le=1024,
        unit="intra-op threads",
        doc="fixed, so bits do not depend on the core count; 0 = torch's default",
    )
    seeds: int = spec(
        3,
        ge=1,
        le=100,
        unit="training seeds per run",
        doc="the `seeds` stage: headline numbers as mean and 95% interval",
    )


@dataclass(frozen=True)
class RunConfig:
    """One training run (``runs.<name>``): an architecture plus its resolved model and train settings."""

    name: str
    model_name: str
    model: ModelConfig
    train: TrainConfig

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "model_name": self.model_name,
            "model": dataclasses.asdict(self.model),
            "train": dataclasses.asdict(self.train),
        }


@dataclass(frozen=True)
class Params:
    """The whole validated ``params.yaml``."""

    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    runs: tuple[RunConfig, ...]
    hessian: HessianConfig = HessianConfig()
    landscape: LandscapeConfig = LandscapeConfig()
    repro: ReproConfig = ReproConfig()

    def run(self, name: str) -> RunConfig:
        for run in self.runs:
            if run.name == name:
                return run
        raise ConfigError("runs", f"no run named {name!r}; defined: {', '.join(r.name for r in self.runs)}")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "hessian": HessianConfig,
    "landscape": LandscapeConfig,
    "repro": ReproConfig,
}


# --------------------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------------------


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _check_value(key: str, tp, value: Any, meta: Mapping[str, Any]) -> Any:
    """Check one scalar or sequence value against its declared type and metadata; return the coerced value."""
    if meta.get("mapping"):
        if isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
            value = dict(value)  # the (name, value) pairs of a config written back (dataclasses.asdict)
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError(key, f"expected a mapping of names to plain values, got {value!r}")
        return tuple(sorted((k, _plain(f"{key}.{k}", v)) for k, v in value.items()))
    origin = typing.get_origin(tp)
    if origin is tuple:
        item_type = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list of {_type_name(item_type).split(' ', 1)[1]}s, got {value!r}")
        return tuple(_check_value(f"{key}[{i}]", item_type, v, meta) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(arms) < len(typing.get_args(tp)):
            return None
        matching = [a for a in arms if type(value) is a or (a is float and type(value) is int)]
        if not matching and len(arms) > 1:
            raise ConfigError(
                key, f"expected {' or '.join(_type_name(a) for a in arms)}, got {value!r} ({type(value).__name__})"
            )
        tp = matching[0] if matching else arms[0]
    # bool is a subclass of int: never accept it where a number is expected, nor a number where a bool is.
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            try:
                value = float(value)
            except OverflowError:
                raise ConfigError(key, f"must be finite, got an integer of {len(str(value))} digits") from None
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(key, f"unknown name {value!r}; allowed: {', '.join(meta['choices'])}")
    if meta.get("pattern") is not None and not meta["pattern"].fullmatch(value):
        raise ConfigError(key, f"invalid value {value!r}; allowed: auto, cpu, cuda, cuda:N, mps")
    if meta.get("validate") is not None:
        value = meta["validate"](key, value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(key, f"must be finite, got {value!r}")
        for bound, op, text in (
            ("ge", lambda a, b: a >= b, ">="),
            ("gt", lambda a, b: a > b, ">"),
            ("le", lambda a, b: a <= b, "<="),
            ("lt", lambda a, b: a < b, "<"),
        ):
            limit = meta.get(bound)
            if limit is not None and not op(value, limit):
                cost = meta.get("estimate") if bound in ("le", "lt") else None
                raise ConfigError(key, f"must be {text} {limit}, got {value!r}" + (f" ({cost(value)})" if cost else ""))
    return value


def build_section(cls: type, raw: Any, prefix: str, base: Any = None):
    """Build the frozen dataclass ``cls`` from the mapping ``raw``; keys missing in ``raw`` come from ``base``.

    Raises:
        ConfigError: naming ``prefix.key`` for unknown keys, wrong types and out-of-range values.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(prefix, f"expected a mapping of keys to values, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{prefix}.{key}", f"unknown key; allowed: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = _check_value(f"{prefix}.{name}", hints[name], raw[name], f.metadata)
        elif base is not None:
            values[name] = getattr(base, name)
    try:
        return cls(**values)
    except ConfigError as err:  # cross-field checks name the section key; re-prefix for run overrides
        if prefix.startswith("runs."):
            raise ConfigError(prefix + "." + err.key.split(".", 1)[1], err.message) from None
        raise


def _build_runs(raw: Any, model: ModelConfig, train: TrainConfig) -> tuple[RunConfig, ...]:
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError("runs", "expected a non-empty mapping of run names to {model: NAME, <train/model overrides>}")
    runs = []
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, entry in raw.items():
        key = f"runs.{name}"
        if not isinstance(name, str) or not _RUN_NAME_PATTERN.fullmatch(name):
            raise ConfigError(key, "run names start with a letter and use letters, digits, '_' and '-'")
        if not isinstance(entry, Mapping):
            raise ConfigError(key, f"expected a mapping with at least 'model', got {entry!r}")
        if "model" not in entry:
            raise ConfigError(f"{key}.model", f"missing; allowed: {MODEL_NAMES}")
        model_name = _check_value(f"{key}.model", str, entry["model"], {"validate": check_model_name})
        overrides = {k: v for k, v in entry.items() if k != "model"}
        for k in overrides:
            if k not in model_keys and k not in train_keys:
                allowed = ["model", *sorted(model_keys), *sorted(train_keys)]
                raise ConfigError(f"{key}.{k}", f"unknown key; allowed: {', '.join(allowed)}")
        run_model = build_section(ModelConfig, {k: v for k, v in overrides.items() if k in model_keys}, key, model)
        run_train = build_section(TrainConfig, {k: v for k, v in overrides.items() if k in train_keys}, key, train)
        runs.append(RunConfig(name=name, model_name=model_name, model=run_model, train=run_train))
    return tuple(runs)


def read_yaml(path: str | Path) -> Any:
    """Read YAML 1.2 (as DVC does: ``5e-4`` is a number), raising ConfigError for a missing or malformed file."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"{path}: file not found")
    try:
        return YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError("", f"{path}: not UTF-8 text (byte {err.start})") from None
    except YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError("", f"{path}: not valid YAML{where}: {problem}") from None


def parse_params(raw: Any) -> Params:
    """Validate a parsed ``params.yaml`` mapping and return the typed :class:`Params`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(
            "", f"params: expected a mapping of sections ({', '.join([*SECTIONS, 'runs'])}), got {type(raw).__name__}"
        )
    allowed = [*SECTIONS, "runs"]
    for key in raw:
        if key not in allowed:
            raise ConfigError(str(key), f"unknown section; allowed: {', '.join(allowed)}")
    sections = {name: build_section(cls, raw.get(name), name) for name, cls in SECTIONS.items()}
    if "runs" not in raw:
        raise ConfigError("runs", "missing; define at least one run, e.g. runs: {mlp: {model: mlp}}")
    runs = _build_runs(raw["runs"], sections["model"], sections["train"])
    return Params(runs=runs, **sections)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``.

    Raises:
        ConfigError: one line naming the file or the dotted key and what is allowed.
    """
    return parse_params(read_yaml(path))


def check_batch_size(key: str, batch_size: int | str, n_train: int, dataset: str = "the dataset") -> None:
    """A train batch size larger than the train split would silently be full-batch gradient descent: refuse it.

    Raises:
        ConfigError: naming ``key`` (``train.batch_size``, ``runs.<name>.batch_size``, ``grid.batch_size[i]``),
        the split size and what is allowed.
    """
    if isinstance(batch_size, int) and batch_size > n_train:
        raise ConfigError(
            key,
            f"must be <= {n_train}, the train split of {dataset} (or 'full' for full-batch "
            f"gradient descent), got {batch_size}",
        )


def check_run_batch_size(params: Params, run_name: str, n_train: int, dataset: str = "the dataset") -> None:
    """:func:`check_batch_size` for the run ``run_name``, naming ``runs.<name>.batch_size`` when the run overrides
    ``train.batch_size`` (its value differs) and ``train.batch_size`` otherwise."""
    run = params.run(run_name)
    key = "train.batch_size" if run.train.batch_size == params.train.batch_size else f"runs.{run_name}.batch_size"
    check_batch_size(key, run.train.batch_size, n_train, dataset)


def read_prepared_meta(folder: str | Path) -> dict:
    """``folder/meta.json`` of the prepared data (n_train, input_shape, num_classes, ...), read without torch.

    Raises:
        DataError: naming the file when it is missing or not the JSON object ``prepare`` writes.
    """
    import json

    from pipeline.errors import DataError

    path = Path(folder) / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; run the data preparation stage first") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: unreadable ({first}); rerun the data preparation stage") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("n_train"), int):
        raise DataError(f"{path}: not the summary the data preparation stage writes (no n_train); rerun it")
    return meta


def resolve_device(name: str, key: str = "train.device") -> str:
    """Map a device setting (``key``) to a concrete torch device string; a missing accelerator is a ConfigError."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(key, f"{name!r} requested but no CUDA device is available; allowed here: auto, cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(key, f"{name!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(key, "'mps' requested but not available; allowed here: auto, cpu")
    return name
