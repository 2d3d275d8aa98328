"""Your own data: ``dataset: npz`` (arrays in an .npz file) and ``dataset: image_folder`` (torchvision's ImageFolder
layout), written here as tiny files in the real formats; every bad input is one line naming the file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image
from ruamel.yaml import YAML

from pipeline.config import ConfigError, DataConfig
from pipeline.data import DataError, prepare_dataset

STAGES = REPO / "stages"


def _npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def _images(n: int, shape=(1, 6, 6), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def test_an_npz_with_both_splits_is_used_as_it_is(tmp_path):
    x_train, x_test = _images(40), _images(12, seed=1)
    y_train, y_test = np.arange(40) % 4, np.arange(12) % 4
    path = _npz(tmp_path / "d.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    data = prepare_dataset(DataConfig(dataset="npz", path=path, probe_size=8))
    assert data.num_classes == 4 and data.input_shape == (1, 6, 6)
    assert torch.equal(data.x_train, torch.from_numpy(x_train)) and torch.equal(data.y_test, torch.from_numpy(y_test))
    assert len(data.probe_index) == 8


def test_an_npz_without_a_test_split_is_split_like_digits_and_may_be_nhwc_or_float(tmp_path):
    nhwc = np.random.default_rng(0).normal(size=(60, 5, 5, 3)).astype(np.float32)
    y = np.arange(60) % 3
    path = _npz(tmp_path / "d.npz", x_train=nhwc, y_train=y.astype(np.int32))
    data = prepare_dataset(DataConfig(dataset="npz", path=path, npz_layout="nhwc", probe_size=8, test_fraction=0.25))
    assert data.input_shape == (3, 5, 5) and len(data.y_test) == 15 and len(data.y_train) == 45
    assert torch.bincount(data.y_test).tolist() == [5, 5, 5]  # stratified
    first = int(np.flatnonzero((nhwc.transpose(0, 3, 1, 2) == data.x_train[0].numpy()).all(axis=(1, 2, 3)))[0])
    assert np.array_equal(nhwc[first].transpose(2, 0, 1), data.x_train[0].numpy())  # the same image, channels first
    grey = _npz(tmp_path / "g.npz", x_train=_images(30)[:, 0], y_train=np.arange(30) % 2)  # (N, H, W): 1 channel
    assert prepare_dataset(DataConfig(dataset="npz", path=grey, probe_size=4)).input_shape == (1, 6, 6)


@pytest.mark.parametrize(
    "arrays, config, needle",
    [
        ({"x": _images(10), "y_train": np.arange(10) % 2}, {}, "missing x_train; found keys x, y_train"),
        (
            {"x_train": _images(10), "y_train": np.arange(10) % 2, "x_test": _images(4)},
            {},
            "missing y_test; found keys x_test, x_train, y_train",
        ),
        ({"x_train": _images(10), "y_train": np.arange(10) - 1}, {}, "y_train has labels outside [0, 9) (e.g. -1 at"),
        ({"x_train": _images(10), "y_train": np.arange(10) % 5}, {"classes": 3}, "labels outside [0, 3) (e.g. 3 at"),
        ({"x_train": _images(10), "y_train": np.arange(9) % 2}, {}, "y_train must be 10 integer labels"),
        ({"x_train": _images(10), "y_train": (np.arange(10) % 2) * 0.5}, {}, "y_train must be 10 integer labels"),
        ({"x_train": np.zeros((10, 4), np.uint8), "y_train": np.arange(10) % 2}, {}, "x_train must be images"),
        ({"x_train": _images(10).astype(np.int16), "y_train": np.arange(10) % 2}, {}, "must be uint8 or floating"),
        (
            {"x_train": np.full((10, 1, 2, 2), np.nan, np.float32), "y_train": np.arange(10) % 2},
            {},
            "x_train holds NaN or infinite values",
        ),
        (
            {
                "x_train": _images(10),
                "y_train": np.arange(10) % 2,
                "x_test": _images(4, (1, 5, 5)),
                "y_test": [0, 1] * 2,
            },
            {},
            "x_test is torch.uint8 (1, 5, 5) per sample, x_train torch.uint8 (1, 6, 6)",
        ),
    ],
    ids=[
        "wrong-keys",
        "half-a-test-split",
        "negative",
        "above-classes",
        "count",
        "float-labels",
        "not-images",
        "int16",
        "nan",
        "test-shape",
    ],
)
def test_a_bad_npz_is_one_line_naming_the_file(tmp_path, arrays, config, needle):
    path = _npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError) as info:
        prepare_dataset(DataConfig(dataset="npz", path=path, probe_size=2, **config))
    message = str(info.value)
    assert message.startswith(f"{path}: ") and needle in message and "\n" not in message, message


def test_a_missing_or_unreadable_npz_and_a_missing_path(tmp_path):
    with pytest.raises(DataError, match=r"^data.path: .*absent.npz: file not found"):
        prepare_dataset(DataConfig(dataset="npz", path=str(tmp_path / "absent.npz")))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"junk.npz: not a readable .npz file"):
        prepare_dataset(DataConfig(dataset="npz", path=str(tmp_path / "junk.npz")))
    np.savez(tmp_path / "objects.npz", x_train=np.array([{"a": 1}] * 4, dtype=object), y_train=np.arange(4))
    with pytest.raises(DataError, match=r"objects.npz: cannot read the arrays without pickle"):
        prepare_dataset(DataConfig(dataset="npz", path=str(tmp_path / "objects.npz")))
    with pytest.raises(ConfigError, match=r"^data.path: dataset image_folder needs a path"):
        DataConfig(dataset="image_folder")


def _folder(root: Path, split: str, counts: dict[str, int], size=(6, 6), mode="RGB", seed=0) -> None:
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(
                root / split / name / f"{i}.png"
            )


def test_an_image_folder_gives_uint8_images_with_the_folder_classes(tmp_path):
    _folder(tmp_path, "train", {"cat": 6, "dog": 5})
    _folder(tmp_path, "test", {"cat": 2, "dog": 2}, seed=1)
    data = prepare_dataset(DataConfig(dataset="image_folder", path=str(tmp_path), probe_size=4))
    assert data.num_classes == 2 and data.input_shape == (3, 6, 6) and data.x_train.dtype == torch.uint8
    assert data.y_train.tolist() == [0] * 6 + [1] * 5  # classes in sorted folder order
    first = np.asarray(Image.open(tmp_path / "train" / "cat" / "0.png")).transpose(2, 0, 1)
    assert np.array_equal(data.x_train[0].numpy(), first)
    small = prepare_dataset(
        DataConfig(dataset="image_folder", path=str(tmp_path), probe_size=4, image_size=4, image_mode="grayscale")
    )
    assert small.input_shape == (1, 4, 4)


def test_a_bad_image_folder_is_one_line(tmp_path):
    cfg = lambda root, **kw: DataConfig(dataset="image_folder", path=str(root), probe_size=2, **kw)  # noqa: E731
    with pytest.raises(DataError, match=r"^data.path: .*/train: folder not found"):
        prepare_dataset(cfg(tmp_path / "nothing"))
    empty = tmp_path / "empty"
    (empty / "train" / "cat").mkdir(parents=True)
    (empty / "test" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=r"^data.path: .*empty/train: no images \("):
        prepare_dataset(cfg(empty))
    mixed = tmp_path / "mixed"
    _folder(mixed, "train", {"a": 2})
    _folder(mixed, "train", {"b": 2}, size=(5, 5))
    _folder(mixed, "test", {"a": 1, "b": 1})
    with pytest.raises(DataError, match=r"b/0.png: image of \(3, 5, 5\) \(C, H, W\) where the first was \(3, 6, 6\)"):
        prepare_dataset(cfg(mixed))
    assert prepare_dataset(cfg(mixed, image_size=5)).input_shape == (3, 5, 5)  # resized, all alike
    other = tmp_path / "other"
    _folder(other, "train", {"a": 2, "b": 2})
    _folder(other, "test", {"a": 1, "c": 1})
    with pytest.raises(DataError, match=r"test has classes a, c; .*train has a, b"):
        prepare_dataset(cfg(other))


@pytest.mark.parametrize("case", ["labels", "empty-folder"])
def test_the_prepare_stage_ends_with_one_line_exit_2_and_writes_nothing(tmp_path, case):
    if case == "labels":
        data = {"dataset": "npz", "path": _npz(tmp_path / "d.npz", x_train=_images(10), y_train=np.arange(10) % 2 + 5)}
        data["classes"] = 3
        expected = f"error: {tmp_path / 'd.npz'}: y_train has labels outside [0, 3) (e.g. 5 at index 0)"
    else:
        (tmp_path / "imgs" / "train" / "a").mkdir(parents=True)
        (tmp_path / "imgs" / "test" / "a").mkdir(parents=True)
        data = {"dataset": "image_folder", "path": str(tmp_path / "imgs")}
        expected = f"error: data.path: {tmp_path / 'imgs' / 'train'}: no images ("
    YAML(typ="safe", pure=True).dump(
        {"data": {**data, "probe_size": 2}, "runs": {"a": {"model": "mlp"}}}, tmp_path / "params.yaml"
    )
    done = subprocess.run(
        [sys.executable, str(STAGES / "prepare.py"), "--params", "params.yaml", "--out", "out"],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "LANDSCAPE_DEBUG")},
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = done.stdout + done.stderr
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert done.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert len(errors) == 1 and errors[0].startswith(expected), errors
    assert not (tmp_path / "out").exists()
