"""Tests for pipeline.data: splits, statistics, probe, determinism, persistence and the torchvision loaders.

The CIFAR-10 and MNIST tests write tiny files in the real on-disk formats, so no download is ever needed.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import DataConfig
from pipeline.data import DataError, PreparedData, load_prepared, prepare_dataset, save_prepared

REPO = Path(__file__).resolve().parents[1]
TENSORS = ("x_train", "y_train", "x_test", "y_test", "mean", "std", "probe_index")


def assert_same(a: PreparedData, b: PreparedData) -> None:
    assert a.name == b.name and a.num_classes == b.num_classes
    for name in TENSORS:
        ta, tb = getattr(a, name), getattr(b, name)
        assert ta.dtype == tb.dtype and ta.shape == tb.shape and torch.equal(ta, tb), name
    assert a.fingerprint() == b.fingerprint()


@pytest.fixture(scope="module", autouse=True)
def fresh_process():
    """Fingerprint of the default config computed in a fresh interpreter, started first to overlap the imports."""
    code = (
        "from pipeline.config import DataConfig; from pipeline.data import prepare_dataset; "
        "print(prepare_dataset(DataConfig()).fingerprint())"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def digits() -> PreparedData:
    return prepare_dataset(DataConfig())


# ------------------------------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------------------------------


def test_digits_shapes_dtypes_and_split(digits):
    assert digits.name == "digits" and digits.num_classes == 10 and digits.input_shape == (1, 8, 8)
    n_train, n_test = len(digits.y_train), len(digits.y_test)
    assert n_train + n_test == 1797 and n_test == 450  # ceil(0.25 * 1797), sklearn's rounding
    assert digits.x_train.shape == (n_train, 1, 8, 8) and digits.x_test.shape == (n_test, 1, 8, 8)
    assert digits.x_train.dtype == torch.uint8 and digits.y_train.dtype == torch.int64
    assert int(digits.x_train.max()) == 16 and int(digits.x_train.min()) == 0
    assert digits.mean.shape == digits.std.shape == (1, 8, 8)
    assert digits.mean.dtype == digits.std.dtype == torch.float32


def test_digits_split_is_stratified(digits):
    all_y = torch.cat([digits.y_train, digits.y_test])
    overall = torch.bincount(all_y, minlength=10).double()
    train = torch.bincount(digits.y_train, minlength=10).double()
    expected = overall * len(digits.y_train) / len(all_y)
    assert (train - expected).abs().max() <= 1.0


def test_digits_standardised_train_split(digits):
    x, y = digits.train_tensors()
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == digits.x_train.shape
    constant = digits.x_train.float().std(0) == 0  # e.g. the left border pixel is always 0
    assert constant.any() and torch.all(digits.std[constant] == 1.0)
    assert x.mean(0).abs().max() < 1e-5
    assert (x.std(0, correction=0)[~constant] - 1).abs().max() < 1e-5
    # per-pixel stats come from the train split only
    assert torch.allclose(digits.mean, digits.x_train.double().mean(0).float())
    x_test, _ = digits.test_tensors()
    assert torch.allclose(x_test, (digits.x_test.float() - digits.mean) / digits.std)


def test_digits_probe(digits):
    p = digits.probe_index
    assert p.dtype == torch.int64 and len(p) == 512
    assert torch.all(p[1:] > p[:-1])  # sorted and distinct
    assert int(p.min()) >= 0 and int(p.max()) < len(digits.y_train)
    xp, yp = digits.probe_tensors()
    x, y = digits.train_tensors()
    assert torch.equal(xp, x[p]) and torch.equal(yp, y[p])


# ------------------------------------------------------------------------------------------------------------------
# determinism and persistence
# ------------------------------------------------------------------------------------------------------------------


def test_deterministic_and_seed_dependent(digits):
    assert_same(digits, prepare_dataset(DataConfig()))
    other = prepare_dataset(DataConfig(seed=1))
    assert not torch.equal(other.y_train, digits.y_train) or not torch.equal(other.x_train, digits.x_train)
    assert not torch.equal(other.probe_index, digits.probe_index)
    assert other.fingerprint() != digits.fingerprint()


def test_save_load_round_trip(digits, tmp_path):
    folder = tmp_path / "nested" / "prepared"  # created by save_prepared
    save_prepared(digits, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["data.pt", "meta.json"]  # no temp files left
    loaded = load_prepared(folder)
    assert_same(digits, loaded)
    assert loaded.config == DataConfig()
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["name"] == "digits" and meta["num_classes"] == 10 and meta["input_shape"] == [1, 8, 8]
    assert (meta["n_train"], meta["n_test"], meta["probe_size"]) == (1347, 450, 512)
    assert meta["fingerprint"] == digits.fingerprint() and meta["config"]["dataset"] == "digits"
    raw = torch.load(folder / "data.pt", weights_only=True)  # loadable without unpickling arbitrary objects
    assert torch.equal(raw["x_train"], digits.x_train)


def test_load_errors(digits, tmp_path):
    with pytest.raises(DataError, match="data.pt: file not found"):
        load_prepared(tmp_path / "missing")
    save_prepared(digits, tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "fingerprint": "0" * 64}))
    with pytest.raises(DataError, match="fingerprint"):
        load_prepared(tmp_path)
    (tmp_path / "data.pt").write_bytes(b"not a torch file")
    with pytest.raises(DataError, match="unreadable"):
        load_prepared(tmp_path)


# ------------------------------------------------------------------------------------------------------------------
# synthetic, subsets and config errors
# ------------------------------------------------------------------------------------------------------------------


def test_synthetic():
    cfg = DataConfig(
        dataset="synthetic",
        synthetic_samples=300,
        synthetic_classes=3,
        synthetic_size=4,
        synthetic_channels=2,
        probe_size=20,
        seed=3,
    )
    d = prepare_dataset(cfg)
    assert d.x_train.dtype == torch.float32 and d.input_shape == (2, 4, 4) and d.num_classes == 3
    assert (len(d.y_train), len(d.y_test)) == (225, 75)
    assert torch.bincount(d.y_train).tolist() == [75, 75, 75] and torch.bincount(d.y_test).tolist() == [25, 25, 25]
    assert d.mean.shape == (2, 1, 1)
    x, _ = d.train_tensors()
    assert x.mean((0, 2, 3)).abs().max() < 1e-5 and (x.std((0, 2, 3), correction=0) - 1).abs().max() < 1e-5
    assert_same(d, prepare_dataset(cfg))


def test_train_samples_subset():
    full = prepare_dataset(DataConfig(probe_size=10))
    d = prepare_dataset(DataConfig(train_samples=100, probe_size=30))
    assert len(d.y_train) == 100 and torch.equal(d.x_test, full.x_test)
    share = torch.bincount(full.y_train, minlength=10).double() * 100 / len(full.y_train)
    assert (torch.bincount(d.y_train, minlength=10).double() - share).abs().max() < 1.0
    assert torch.allclose(d.mean, d.x_train.double().mean(0).float())  # stats after subsetting
    assert len(d.probe_index) == 30 and int(d.probe_index.max()) < 100
    assert_same(d, prepare_dataset(DataConfig(train_samples=100, probe_size=30)))


def test_size_errors():
    with pytest.raises(DataError, match=r"data\.probe_size: 2000 .* only 1347"):
        prepare_dataset(DataConfig(probe_size=2000))
    with pytest.raises(DataError, match=r"data\.train_samples: 5000 .* only 1347"):
        prepare_dataset(DataConfig(train_samples=5000))
    with pytest.raises(DataError, match=r"data\.probe_size: 60 .* only 50"):
        prepare_dataset(DataConfig(train_samples=50, probe_size=60))


# ------------------------------------------------------------------------------------------------------------------
# torchvision datasets on tiny real-format files
# ------------------------------------------------------------------------------------------------------------------


class Py2Pickler(pickle._Pickler):
    """Pickles bytes as Python 2 ``str`` (SHORT_BINSTRING/BINSTRING), as in the real CIFAR-10 files.

    Those files were written by Python 2: ``pickle.load(f, encoding="bytes")`` gives ``b"data"`` keys, while
    torchvision's ``encoding="latin1"`` gives ``"data"``. Python 3's own protocol-2 bytes would stay bytes either way.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def write_cifar(root: Path, per_batch: int = 3, n_test: int = 4) -> tuple[np.ndarray, list, np.ndarray, list]:
    """Write the six batch pickles and batches.meta as in cifar-10-python.tar.gz (Python 2 str keys, rows R|G|B)."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_rows, train_labels = [], []
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(folder / name, "wb") as f:
            Py2Pickler(f, protocol=2).dump({b"batch_label": name.encode(), b"labels": labels, b"data": rows})
        if name != "test_batch":
            train_rows.append(rows)
            train_labels += labels
    with open(folder / "batches.meta", "wb") as f:
        Py2Pickler(f, protocol=2).dump({b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072})
    return np.concatenate(train_rows), train_labels, rows, labels


def test_cifar10_tiny(tmp_path):
    train_rows, train_labels, test_rows, test_labels = write_cifar(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:  # same key types as the real files
        assert b"data" in pickle.load(f, encoding="bytes")
    d = prepare_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), probe_size=5, test_fraction=0.5))
    assert d.num_classes == 10 and d.input_shape == (3, 32, 32) and d.x_train.dtype == torch.uint8
    assert (len(d.y_train), len(d.y_test)) == (15, 4)  # official split, test_fraction ignored
    # row layout: 1024 R, 1024 G, 1024 B values, each a row-major 32x32 image
    assert torch.equal(d.x_train, torch.from_numpy(train_rows.reshape(15, 3, 32, 32)))
    assert int(d.x_train[2, 1, 0, 5]) == int(train_rows[2, 1024 + 5])  # channel G, row 0, column 5
    assert int(d.x_test[3, 2, 4, 7]) == int(test_rows[3, 2048 + 4 * 32 + 7])  # channel B, row 4, column 7
    assert d.y_train.tolist() == train_labels and d.y_test.tolist() == test_labels
    assert d.mean.shape == (3, 1, 1)
    expected_mean = train_rows.reshape(15, 3, 1024).astype(np.float64).mean(axis=(0, 2))
    assert np.allclose(d.mean.flatten().numpy(), expected_mean, atol=1e-4)
    assert np.allclose(d.std.flatten().numpy(), train_rows.reshape(15, 3, 1024).std(axis=(0, 2)), atol=1e-4)


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """idx3 images (magic 2051, count, rows, cols) and idx1 labels (magic 2049, count), big-endian headers."""
    folder.mkdir(parents=True, exist_ok=True)
    n, rows, cols = images.shape
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, rows, cols) + images.tobytes())
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


@pytest.mark.parametrize("dataset, folder_name", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_likes_tiny(tmp_path, dataset, folder_name):
    rng = np.random.default_rng(1)
    tr_x, te_x = (rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8) for n in (12, 5))
    tr_y, te_y = (rng.integers(0, 10, size=n).astype(np.uint8) for n in (12, 5))
    write_idx(tmp_path / folder_name / "raw", "train", tr_x, tr_y)
    write_idx(tmp_path / folder_name / "raw", "t10k", te_x, te_y)
    d = prepare_dataset(DataConfig(dataset=dataset, root=str(tmp_path), probe_size=4))
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10 and d.x_train.dtype == torch.uint8
    assert torch.equal(d.x_train, torch.from_numpy(tr_x).unsqueeze(1))
    assert torch.equal(d.x_test, torch.from_numpy(te_x).unsqueeze(1))
    assert d.y_train.tolist() == tr_y.tolist() and d.y_test.tolist() == te_y.tolist()
    assert d.y_train.dtype == torch.int64 and d.mean.shape == (1, 1, 1)
    assert abs(float(d.mean) - tr_x.astype(np.float64).mean()) < 1e-3


@pytest.mark.parametrize(
    "dataset, expected",
    [
        ("cifar10", "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}"),
        (
            "mnist",
            "MNIST/raw/{train-images-idx3-ubyte,train-labels-idx1-ubyte,t10k-images-idx3-ubyte,t10k-labels-idx1-ubyte}",
        ),
        ("fashion_mnist", "FashionMNIST/raw/{train-images-idx3-ubyte,"),
    ],
)
def test_missing_files_without_download(tmp_path, dataset, expected):
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        prepare_dataset(DataConfig(dataset=dataset, root=str(root)))
    message = str(info.value)
    assert "\n" not in message and message.startswith("data.root: ")
    assert f"{root}/{expected}" in message and "data.download: true" in message
    assert not root.exists()  # nothing created, nothing downloaded


def test_partial_cifar_is_reported(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match="CIFAR-10 not found"):
        prepare_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), probe_size=5))


# last, so that the subprocess started by the fixture has finished meanwhile
def test_fingerprint_same_in_fresh_process(digits, fresh_process):
    out, err = fresh_process.communicate(timeout=120)
    assert fresh_process.returncode == 0, err
    assert out.strip() == digits.fingerprint()


def test_a_crafted_cifar_batch_cannot_run_code(tmp_path):
    """CIFAR-10's batches are pickles: read by the restricted unpickler, a file whose pickle calls a function (here
    os.system) fails with one line naming the file, and the function never runs."""
    write_cifar(tmp_path)
    marker = tmp_path / "PWNED"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({"data": Exploit(), "labels": []}, f, protocol=2)
    with pytest.raises(DataError) as err:
        prepare_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), probe_size=5))
    assert not marker.exists()
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "cifar-10-batches-py" / "data_batch_1"))
    assert "refused global posix.system" in message or "refused global os.system" in message


def test_cifar_checksums_are_torchvisions_and_a_full_batch_must_match(tmp_path, monkeypatch):
    from torchvision import datasets

    from pipeline import data as data_module

    official = dict(datasets.CIFAR10.train_list + datasets.CIFAR10.test_list)
    official["batches.meta"] = datasets.CIFAR10.meta["md5"]
    assert data_module._CIFAR_MD5 == official
    write_cifar(tmp_path)
    monkeypatch.setattr(data_module, "_CIFAR_BATCH_IMAGES", 3)  # the tiny batches stand in for full ones
    with pytest.raises(DataError, match=r"data_batch_1: md5 differs from the official CIFAR-10 batch"):
        prepare_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), probe_size=5))


def test_a_cifar_batch_of_the_wrong_shape_is_one_line(tmp_path):
    write_cifar(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        Py2Pickler(f, protocol=2).dump({b"data": np.zeros((4, 100), dtype=np.uint8), b"labels": [0, 1, 2, 3]})
    with pytest.raises(
        DataError,
        match=r"test_batch: 'data' must be a uint8 array of shape \[N, 3072\], found uint8 "
        r"\(4, 100\)",
    ):
        prepare_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), probe_size=5))
