"""Datasets: load, split, standardise and fix the probe subset, deterministically from a :class:`DataConfig`.

Images are kept in their stored form (uint8 for image datasets, float32 for the synthetic one) and standardised on
demand with ``(x.float() - mean) / std``, where mean and std come from the train split only. The same config gives
bitwise-identical tensors (and fingerprint) in any process; nothing is downloaded unless ``data.download`` is true.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipeline.config import DataConfig
from pipeline.errors import DataError  # noqa: F401 - re-exported: pipeline.data.DataError is the public name
from pipeline.io import save_torch, write_json

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no boolean equality
class PreparedData:
    """A split dataset in stored form plus its train-split statistics and the fixed probe subset."""

    name: str
    x_train: Tensor  # [N, C, H, W] uint8 (images) or float32 (synthetic)
    y_train: Tensor  # int64 [N]
    x_test: Tensor  # [M, C, H, W], same dtype as x_train
    y_test: Tensor  # int64 [M]
    mean: Tensor  # float32 [C, H, W] (per pixel) or [C, 1, 1] (per channel)
    std: Tensor  # float32, same shape as mean, zeros replaced by 1
    probe_index: Tensor  # int64 [P], sorted distinct rows of the train split
    num_classes: int
    config: DataConfig | None = None  # the config that produced it (recorded in meta.json; not fingerprinted)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one sample, (C, H, W)."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    def standardise(self, x: Tensor) -> Tensor:
        """Return ``(x.float() - mean) / std`` as float32 (x in stored form, [B, C, H, W])."""
        return (x.float() - self.mean) / self.std

    def train_tensors(self) -> tuple[Tensor, Tensor]:
        """Returns: standardised float32 train images [N, C, H, W] and int64 labels [N]."""
        return self.standardise(self.x_train), self.y_train

    def test_tensors(self) -> tuple[Tensor, Tensor]:
        """Returns: standardised float32 test images [M, C, H, W] and int64 labels [M]."""
        return self.standardise(self.x_test), self.y_test

    def probe_tensors(self) -> tuple[Tensor, Tensor]:
        """Returns: the probe rows of the standardised train split, [P, C, H, W] float32 and [P] int64."""
        return self.standardise(self.x_train[self.probe_index]), self.y_train[self.probe_index]

    def fingerprint(self) -> str:
        """Returns: sha256 hex digest over the name, num_classes and every tensor's dtype, shape and bytes."""
        digest = hashlib.sha256(f"{self.name}|{self.num_classes}".encode())
        for field_name in _TENSOR_FIELDS:
            t = getattr(self, field_name).contiguous()
            digest.update(f"|{field_name}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.numpy().tobytes())
        return digest.hexdigest()


_TENSOR_FIELDS = ("x_train", "y_train", "x_test", "y_test", "mean", "std", "probe_index")


# ------------------------------------------------------------------------------------------------------------------
# Raw datasets: each returns (x_train, y_train, x_test, y_test, num_classes, per_pixel_stats)
# ------------------------------------------------------------------------------------------------------------------


def _stratified_split(x: Tensor, y: Tensor, cfg: DataConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fixed stratified train/test split (sklearn, random_state=cfg.seed); each part keeps the original order."""
    from sklearn.model_selection import train_test_split

    try:
        train_idx, test_idx = train_test_split(
            np.arange(len(y)), test_size=cfg.test_fraction, stratify=y.numpy(), random_state=cfg.seed
        )
    except ValueError as err:  # e.g. fewer test samples than classes
        raise DataError(
            f"data.test_fraction: cannot split {len(y)} samples stratified with test_fraction "
            f"{cfg.test_fraction}: {str(err).splitlines()[0]}"
        ) from None
    train_idx, test_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(test_idx))
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def _load_digits(cfg: DataConfig):
    from sklearn.datasets import load_digits

    bunch = load_digits()  # bundled with scikit-learn: 1797 images 8x8, values 0..16
    x = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)  # [1797, 1, 8, 8]
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return (*_stratified_split(x, y, cfg), 10, True)


def _make_synthetic(cfg: DataConfig):
    g = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.synthetic_channels, cfg.synthetic_size, cfg.synthetic_size)
    y = torch.arange(cfg.synthetic_samples, dtype=torch.int64) % cfg.synthetic_classes  # balanced classes
    class_means = torch.randn((cfg.synthetic_classes, *shape), generator=g)
    x = class_means[y] + torch.randn((cfg.synthetic_samples, *shape), generator=g)  # float32 [N, C, S, S]
    return (*_stratified_split(x, y, cfg), cfg.synthetic_classes, False)


# md5 of the files of cifar-10-python.tar.gz (as torchvision lists them): a full batch (10,000 images) that does not
# match is refused; a smaller one (a subset, a test fixture) is read with one warning that it is not the official file.
_CIFAR_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
_CIFAR_BATCH_IMAGES = 10_000


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR-10's batch files hold: dicts, lists, strings, ints and uint8 numpy arrays.

    ``pickle.load`` would call any importable function the file names (a crafted ``data_batch_1`` runs a shell
    command); here any other global is refused.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name} (not part of the CIFAR-10 format)")
        return super().find_class(module, name)


def _read_cifar_file(path: str) -> tuple[dict, bool]:
    """One CIFAR-10 pickle as a dict with str keys, read by :class:`_CifarUnpickler`, and whether its md5 is the
    official file's.

    Raises:
        DataError: naming the file, for anything that is not a CIFAR-10 batch.
    """
    raw = Path(path).read_bytes()
    official = hashlib.md5(raw).hexdigest() == _CIFAR_MD5.get(os.path.basename(path))
    try:
        payload = _CifarUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as err:  # noqa: BLE001 - refused globals, truncation, garbage: all one line naming the file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"{path}: not a CIFAR-10 batch file ({first})") from None
    if not isinstance(payload, dict):
        raise DataError(f"{path}: not a CIFAR-10 batch file (a {type(payload).__name__}, expected a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in payload.items()}, official


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        print(message, file=sys.stderr, flush=True)


def _cifar_split(folder: str, names: tuple[str, ...]) -> tuple[Tensor, Tensor]:
    """Images [N, 3, 32, 32] uint8 and labels [N] int64 of the named batch files (rows R|G|B, row-major 32x32)."""
    xs, ys = [], []
    for name in names:
        path = os.path.join(folder, name)
        batch, official = _read_cifar_file(path)
        data, labels = batch.get("data"), batch.get("labels")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DataError(f"{path}: 'data' must be a uint8 array of shape [N, 3072], found {found}")
        if (
            not isinstance(labels, list)
            or len(labels) != len(data)
            or not all(isinstance(v, int) and 0 <= v < 10 for v in labels)
        ):
            raise DataError(f"{path}: 'labels' must be {len(data)} integers in [0, 10)")
        if not official and len(data) == _CIFAR_BATCH_IMAGES:
            raise DataError(f"{path}: md5 differs from the official CIFAR-10 batch; re-extract cifar-10-python.tar.gz")
        if not official:
            _warn_once(
                f"warning: {folder}: batches differ from the official CIFAR-10 release (a subset or another "
                "copy); read with the restricted unpickler"
            )
        xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        ys.append(torch.tensor(labels, dtype=torch.int64))
    return torch.cat(xs), torch.cat(ys)


def _load_torchvision(cfg: DataConfig):
    """Official train/test splits of CIFAR-10, MNIST or FashionMNIST from ``cfg.root`` as uint8 NCHW.

    CIFAR-10's pickled batches are read by a restricted unpickler (never ``pickle.load``): data cannot run code.
    """
    root = cfg.root
    if cfg.dataset == "cifar10":
        label, folder, files = "CIFAR-10", os.path.join(root, "cifar-10-batches-py"), _CIFAR_FILES
        hint = f"extract cifar-10-python.tar.gz into {root}"
    else:
        from torchvision import datasets

        cls = datasets.MNIST if cfg.dataset == "mnist" else datasets.FashionMNIST
        label = "MNIST" if cfg.dataset == "mnist" else "FashionMNIST"
        folder, files = os.path.join(root, cls.__name__, "raw"), _MNIST_FILES
        hint = f"uncompressed idx files; gunzip the {label} .gz downloads into {folder}"
    expected = f"expected {folder}/{{{','.join(files)}}} ({hint}) or set data.download: true"
    if cfg.dataset == "cifar10":  # shorter, as the files are numbered
        expected = expected.replace(",".join(files[:5]), "data_batch_1..5")
    if cfg.dataset == "cifar10" and cfg.download and not all(os.path.isfile(os.path.join(folder, f)) for f in files):
        from torchvision import datasets

        try:  # torchvision checks the md5 of the archive it downloads
            datasets.CIFAR10(root, train=True, download=True)
        except Exception as err:  # noqa: BLE001 - network errors
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DataError(f"data.root: could not download {label} into {root} ({first})") from None
    if not cfg.download and not all(os.path.isfile(os.path.join(folder, f)) for f in files):
        raise DataError(f"data.root: {label} not found: {expected}")
    if cfg.dataset == "cifar10":
        _read_cifar_file(os.path.join(folder, "batches.meta"))  # checked like the batches
        x_train, y_train = _cifar_split(folder, _CIFAR_FILES[:5])
        x_test, y_test = _cifar_split(folder, ("test_batch",))
        return x_train, y_train, x_test, y_test, 10, False
    try:
        train, test = cls(root, train=True, download=cfg.download), cls(root, train=False, download=cfg.download)
    except Exception as err:  # network errors, truncated or foreign files; torchvision messages may span lines
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"data.root: could not load {label} from {root} ({first}); {expected}") from None

    def to_nchw(ds) -> tuple[Tensor, Tensor]:  # .data is a uint8 tensor [N, 28, 28] (idx files: no pickle)
        x = ds.data.to(torch.uint8).unsqueeze(1).contiguous()
        return x, torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)

    return (*to_nchw(train), *to_nchw(test), len(train.classes), False)


# ------------------------------------------------------------------------------------------------------------------
# Your own files: .npz arrays and image folders
# ------------------------------------------------------------------------------------------------------------------

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _npz_images(path: str, key: str, x: np.ndarray, layout: str) -> Tensor:
    """``x`` as float32 or uint8 NCHW: 3-D arrays are one channel, 4-D ones in ``layout``."""
    if x.ndim not in (3, 4) or 0 in x.shape:
        raise DataError(f"{path}: {key} must be images of shape (N, H, W) or (N, C, H, W), found shape {x.shape}")
    if not (x.dtype == np.uint8 or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{path}: {key} must be uint8 or floating point, found {x.dtype}")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise DataError(f"{path}: {key} holds NaN or infinite values")
    x = x[:, None] if x.ndim == 3 else (x.transpose(0, 3, 1, 2) if layout == "nhwc" else x)
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t if t.dtype == torch.uint8 else t.float()


def _npz_labels(path: str, key: str, y: np.ndarray, n: int) -> Tensor:
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {key} must be {n} integer labels, found {y.dtype} of shape {y.shape}")
    return torch.from_numpy(y.astype(np.int64))


def _check_labels(path: str, labels: dict[str, Tensor], classes: int) -> int:
    """The class count: ``classes``, or the largest label + 1; every label in ``[0, classes)``."""
    found = max(int(y.max()) for y in labels.values()) + 1
    classes = classes or found
    for key, y in labels.items():
        bad = (y < 0) | (y >= classes)
        if bad.any():
            raise DataError(
                f"{path}: {key} has labels outside [0, {classes}) (e.g. {int(y[bad][0])} at index "
                f"{int(bad.nonzero()[0])})"
            )
    if classes < 2:
        raise DataError(f"{path}: need at least 2 classes, found labels {sorted(set(labels['y_train'].tolist()))}")
    return classes


def _load_npz(cfg: DataConfig):
    """``x_train``, ``y_train`` and optionally ``x_test``, ``y_test`` from ``cfg.path`` (no pickles: data cannot run
    code); without a test split, split like digits (stratified, ``test_fraction``)."""
    path = cfg.path
    if not os.path.isfile(path):
        raise DataError(f"data.path: {path}: file not found (dataset npz: an .npz with x_train, y_train)")
    try:
        archive = np.load(path, allow_pickle=False)
        keys = set(archive.files)
    except Exception as err:  # noqa: BLE001 - truncated, not a zip, ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"{path}: not a readable .npz file ({first})") from None
    missing = [k for k in ("x_train", "y_train") if k not in keys]
    if missing or ("x_test" in keys) != ("y_test" in keys):
        missing = missing or [k for k in ("x_test", "y_test") if k not in keys]
        raise DataError(
            f"{path}: missing {', '.join(missing)}; found keys {', '.join(sorted(keys)) or 'none'} (expected x_train, "
            "y_train and optionally x_test, y_test)"
        )
    try:
        arrays = {k: archive[k] for k in NPZ_KEYS if k in keys}
    except ValueError as err:  # object arrays need pickle, refused
        raise DataError(f"{path}: cannot read the arrays without pickle ({str(err).splitlines()[0]})") from None
    x_train = _npz_images(path, "x_train", arrays["x_train"], cfg.npz_layout)
    labels = {"y_train": _npz_labels(path, "y_train", arrays["y_train"], len(x_train))}
    if "x_test" in arrays:
        x_test = _npz_images(path, "x_test", arrays["x_test"], cfg.npz_layout)
        if x_test.shape[1:] != x_train.shape[1:] or x_test.dtype != x_train.dtype:
            raise DataError(
                f"{path}: x_test is {x_test.dtype} {tuple(x_test.shape[1:])} per sample, x_train "
                f"{x_train.dtype} {tuple(x_train.shape[1:])}"
            )
        labels["y_test"] = _npz_labels(path, "y_test", arrays["y_test"], len(x_test))
    classes = _check_labels(path, labels, cfg.classes)
    if "x_test" in arrays:
        return x_train, labels["y_train"], x_test, labels["y_test"], classes, False
    return (*_stratified_split(x_train, labels["y_train"], cfg), classes, False)


def _load_image_folder(cfg: DataConfig):
    """``cfg.path/train/<class>/*`` and ``cfg.path/test/<class>/*`` through torchvision's ``ImageFolder``, as uint8
    NCHW, resized to ``image_size`` when it is set (all images must share one size otherwise)."""
    from torchvision import datasets, transforms

    root = Path(cfg.path)
    steps = [transforms.Grayscale()] if cfg.image_mode == "grayscale" else []
    if cfg.image_size:
        steps.append(transforms.Resize((cfg.image_size, cfg.image_size)))
    steps.append(transforms.PILToTensor())
    transform = transforms.Compose(steps)
    loaded, names = {}, {}
    for split in ("train", "test"):
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"data.path: {folder}: folder not found (image_folder needs {root}/train and {root}/test)")
        try:
            ds = datasets.ImageFolder(str(folder), transform=transform)
        except (FileNotFoundError, RuntimeError) as err:  # no class folders, or no images in them
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DataError(f"data.path: {folder}: no images ({first})") from None
        images, targets = [], []
        for (file, _), (image, target) in zip(ds.samples, ds):
            if images and image.shape != images[0].shape:
                raise DataError(
                    f"{file}: image of {tuple(image.shape)} (C, H, W) where the first was {tuple(images[0].shape)}; "
                    "set data.image_size to resize all"
                )
            images.append(image)
            targets.append(target)
        loaded[split] = (torch.stack(images).contiguous(), torch.tensor(targets, dtype=torch.int64))
        names[split] = ds.classes
    if names["test"] != names["train"]:
        raise DataError(
            f"data.path: {root}/test has classes {', '.join(names['test'])}; {root}/train has "
            f"{', '.join(names['train'])} (the same class folders in both)"
        )
    if loaded["train"][0].shape[1:] != loaded["test"][0].shape[1:]:
        raise DataError(
            f"data.path: {root}: train images are {tuple(loaded['train'][0].shape[1:])}, test images "
            f"{tuple(loaded['test'][0].shape[1:])}; set data.image_size to resize all"
        )
    if len(names["train"]) < 2:
        raise DataError(f"data.path: {root}/train: need at least 2 class folders, found {names['train']}")
    return (*loaded["train"], *loaded["test"], len(names["train"]), False)


# ------------------------------------------------------------------------------------------------------------------
# Subset, statistics, probe
# ------------------------------------------------------------------------------------------------------------------


def _stratified_subset(y: Tensor, n: int, seed: int) -> Tensor:
    """Sorted indices of n samples whose class counts are the proportional quotas rounded by largest remainder."""
    classes, counts = torch.unique(y, return_counts=True)
    quota = counts.double() * n / len(y)
    take = quota.floor().long()
    extra = torch.argsort(quota - take, descending=True, stable=True)[: n - int(take.sum())]
    take[extra] += 1  # so each class is within one sample of its exact share
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c, k in zip(classes.tolist(), take.tolist()):
        members = torch.nonzero(y == c).flatten()
        chosen.append(members[torch.randperm(len(members), generator=g)[:k]])
    return torch.cat(chosen).sort().values


def _moments(x: Tensor, per_pixel: bool, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Mean and population std over the samples (and pixels unless per_pixel), in float64 chunks -> float32."""
    dims = (0,) if per_pixel else (0, 2, 3)
    count = x.shape[0] * (1 if per_pixel else x.shape[2] * x.shape[3])
    total = sum(x[i : i + chunk].double().sum(dims, keepdim=True) for i in range(0, len(x), chunk))
    mean = total / count  # [1, C, H, W] or [1, C, 1, 1]
    sq = sum(((x[i : i + chunk].double() - mean) ** 2).sum(dims, keepdim=True) for i in range(0, len(x), chunk))
    std = (sq / count).sqrt()
    std[std == 0] = 1.0  # constant pixels (digits borders) pass through unscaled
    return mean[0].float(), std[0].float()


def known_shape(cfg: DataConfig) -> tuple[tuple[int, int, int], int] | None:
    """``(input_shape, num_classes)`` the dataset of ``cfg`` will have, without loading it; ``None`` when only the
    files can tell (``landscape check`` then reads the prepared data's meta instead)."""
    shapes = {"digits": ((1, 8, 8), 10), "cifar10": ((3, 32, 32), 10), "mnist": ((1, 28, 28), 10)}
    shapes["fashion_mnist"] = shapes["mnist"]
    if cfg.dataset == "synthetic":
        return (cfg.synthetic_channels, cfg.synthetic_size, cfg.synthetic_size), cfg.synthetic_classes
    return shapes.get(cfg.dataset)


def prepare_dataset(cfg: DataConfig) -> PreparedData:
    """Load, split, subset and standardise the dataset named by ``cfg.dataset`` and fix its probe subset.

    Args:
        cfg: the ``data`` section.
    Returns:
        The prepared data; identical (bitwise) for identical configs.
    Raises:
        DataError: missing files, a subset or probe larger than the train split, or an impossible split.
    """
    loaders = {
        "digits": _load_digits,
        "synthetic": _make_synthetic,
        "npz": _load_npz,
        "image_folder": _load_image_folder,
    }
    loader = loaders.get(cfg.dataset, _load_torchvision)
    x_train, y_train, x_test, y_test, num_classes, per_pixel = loader(cfg)
    if cfg.train_samples > 0:
        if cfg.train_samples > len(y_train):
            raise DataError(
                f"data.train_samples: {cfg.train_samples} requested but the train split of "
                f"{cfg.dataset} has only {len(y_train)} samples; use <= {len(y_train)} or 0 for all"
            )
        keep = _stratified_subset(y_train, cfg.train_samples, cfg.seed)
        x_train, y_train = x_train[keep], y_train[keep]
    if cfg.probe_size > len(y_train):
        raise DataError(
            f"data.probe_size: {cfg.probe_size} requested but the train split of {cfg.dataset} has "
            f"only {len(y_train)} samples; use <= {len(y_train)}"
        )
    mean, std = _moments(x_train, per_pixel)
    g = torch.Generator().manual_seed(cfg.seed)
    probe_index = torch.randperm(len(y_train), generator=g)[: cfg.probe_size].sort().values
    return PreparedData(
        cfg.dataset,
        x_train.contiguous(),
        y_train,
        x_test.contiguous(),
        y_test,
        mean,
        std,
        probe_index,
        int(num_classes),
        cfg,
    )


# ------------------------------------------------------------------------------------------------------------------
# Persistence
# ------------------------------------------------------------------------------------------------------------------


def save_prepared(data: PreparedData, folder: str | Path) -> None:
    """Write ``folder/data.pt`` (tensors) and ``folder/meta.json`` (summary, fingerprint, config) atomically.

    Args:
        data: the prepared data.
        folder: created if needed.
    """
    config = dataclasses.asdict(data.config) if data.config is not None else None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "name": data.name,
        "num_classes": data.num_classes,
        "config": config,  # plain types: weights_only
        **{name: getattr(data, name) for name in _TENSOR_FIELDS},
    }
    save_torch(folder / "data.pt", payload)
    meta = {
        "name": data.name,
        "num_classes": data.num_classes,
        "input_shape": list(data.input_shape),
        "n_train": len(data.y_train),
        "n_test": len(data.y_test),
        "probe_size": len(data.probe_index),
        "fingerprint": data.fingerprint(),
        "config": config,
    }
    write_json(folder / "meta.json", meta)


def require_prepared(folder: str | Path) -> Path:
    """Path of ``folder/data.pt``, checked to exist (cheap: a stage calls it before starting its flow).

    Raises:
        DataError: naming the missing file.
    """
    path = Path(folder) / "data.pt"
    if not path.is_file():
        raise DataError(f"{path}: file not found; run the data preparation stage first")
    return path


def load_prepared(folder: str | Path) -> PreparedData:
    """Read data written by :func:`save_prepared` (tensors only: ``torch.load(weights_only=True)``).

    Raises:
        DataError: data.pt is missing or unreadable, or it does not match the fingerprint in meta.json.
    """
    path = require_prepared(folder)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        config = DataConfig(**payload["config"]) if payload.get("config") is not None else None
        data = PreparedData(**{k: payload[k] for k in ("name", "num_classes", *_TENSOR_FIELDS)}, config=config)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"{path}: unreadable ({first}); delete it and rerun the data preparation stage") from None
    meta_path = path.with_name("meta.json")
    if meta_path.is_file():
        expected = json.loads(meta_path.read_text()).get("fingerprint")
        if expected is not None and expected != data.fingerprint():
            raise DataError(f"{path}: does not match the fingerprint in {meta_path}; rerun the data preparation stage")
    return data
