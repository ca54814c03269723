"""nfvi.data: the dataset= group (configs, validation), generated and small local datasets, fetching from a
local HTTP server (good / corrupted / truncated / offline), the MAT-file reader, and the real files (marked data)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import logging
import os
import socket
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from nfvi.config import hydra_version_base
from nfvi.data import DATASETS, DatasetConfig, ImageData, binarize, load_dataset, sources, split_generator
from nfvi.data.fake import fake_images
from nfvi.data.matfile import read_mat
from tests.conftest import CONF_DIR, SHARED_DATA, LocalHTTPServer, one_line_error

SCIPY_MAT_V5 = (
    "TUFUTEFCIDUuMCBNQVQtZmlsZSBQbGF0Zm9ybTogcG9zaXgsIENyZWF0ZWQgb246IE1vbiBOb3YgMjMgMjE6MjE6MzQgMjAyNgAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABSU0OAAAA8AAAAAYAAAAIAAAABgAAAAAA"
    "AAAFAAAACAAAAAYAAAAEAAAAAQAEAGRhdGEJAAAAwAAAAPyp8dJNYuQ/arx0kxgE6j+cxCCwcmjhPwaBlUOLbOs/BFYOLbKd6z95"
    "6SYxCKycP0jhehSuR9E/nu+nxks37T/sUbgehevtP5zEILByaKE/HVpkO99P4T9YObTIdr6/P8uhRbbz/aQ/BoGVQ4ts4z/pJjEI"
    "rBzqP1yPwvUoXOc/MzMzMzMz0z9GtvP91HjlP5zEILByaJE/hxbZzvdT5z/6fmq8dJNoP7pJDAIrh8Y/30+Nl24S2z9OYhBYObTk"
    "Pw4AAABAAAAABgAAAAgAAAAJAAAAAAAAAAUAAAAIAAAAAwAAAAIAAAABAAAACAAAAHRlc3RkYXRhAgAAAAYAAAAAAgQBAwUAAA4A"
    "AABAAAAABgAAAAgAAAAKAAAAAAAAAAUAAAAIAAAAAgAAAAIAAAABAAAABgAAAHRhcmdldAAAAwAAAAgAAAABAAAAAAABAA4AAAA4"
    "AAAABgAAAAgAAAAJAgAAAAAAAAUAAAAIAAAAAQAAAAMAAAABAAAABQAAAGZsYWdzAAAAAgADAAEAAQAOAAAAQAAAAAYAAAAIAAAA"
    "BAAAAAAAAAAFAAAACAAAAAEAAAAFAAAAAQAAAAUAAABsYWJlbAAAABAAAAAFAAAAaGVsbG8AAAAOAAAAqAAAAAYAAAAIAAAAAQAA"
    "AAAAAAAFAAAACAAAAAEAAAACAAAAAQAAAAUAAABjZWxscwAAAA4AAAA4AAAABgAAAAgAAAAGAAAAAAAAAAUAAAAIAAAAAQAAAAEA"
    "AAABAAAAAAAAAAkAAAAIAAAAAAAAAAAA8D8OAAAAMAAAAAYAAAAIAAAABAAAAAAAAAAFAAAACAAAAAEAAAABAAAAAQAAAAAAAAAQ"
    "AAEAeAAAAA4AAABAAAAABgAAAAgAAAAHAAAAAAAAAAUAAAAIAAAAAQAAAAMAAAABAAMAdmVjAAcAAAAMAAAAAADAPwAAEMAAAEBA"
    "AAAAAA=="
)
SCIPY_MAT_V5_COMPRESSED = (
    "TUFUTEFCIDUuMCBNQVQtZmlsZSBQbGF0Zm9ybTogcG9zaXgsIENyZWF0ZWQgb246IE1vbiBOb3YgMjMgMjE6MjE6MzQgMjAyNgAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABSU0PAAAA1gAAAHic42NgYPgAxGxAzAGl"
    "QYAVic8CxIxAMiWxJJETyD4AxH9Wfrzkm/TEPmtPyWQJllf2c44obCjKeGjP1jjVuTvntT1LGJ/uprmv7StfqhlyrJlj7/GwSmSd"
    "+0X7ee+XH/M2f2v/JnCHXOvrt1B9C+1lo1Ks7/s/tI+w3HKibN9++9MLXbd9/rsEat5je7AxMq/sY/oPfdWIeW5vDAaX7d2Aqq5U"
    "PIWaM9G+Xezmue/Bz+1/1YFclmG/y5OHSbv9mP19/97peUK37f2SBIBWPLEHAMzhYWsPAAAAMwAAAHic42NgYHAAYjYg5gBiTgYI"
    "YIXymYGYCYgZofyS1OKSlMSSRCaoHgYmFkZmoGIAZEMD8g8AAAAvAAAAeJzjY2BgcABiNiDmAGIuBghghfKZoJgRqqYksSg9tYSB"
    "gRkqzwhWzcgAAFVoAxMPAAAALQAAAHic42NgYLAAYjYg5gBiTiYGMGCF8hmBmBlKg8TSchLTi4E0E1CUEQgBNX8Ciw8AAAAuAAAA"
    "eJzjY2BgcABiNiDmAGIWBghghfIZoWwYnZOYlJoDpAWg/IzUnJx8IA0AVusEow8AAABFAAAAeJzjY2BgWAHEbEDMAcSMDBDAisRn"
    "gtIgseTUnJxiIM0HxBZI+tiw6GNEMo8TKg4BH+xB+g2Q9LMQ0C8AZFUAaQAhygWCDwAAADQAAAB4nONjYGBwAGI2IOYAYnYGCGCF"
    "8hmBmBlMMzOUpSaD5XnAKg7YMzAIHADqBmlnAABYhgQZ"
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(autouse=True)
def no_internet(monkeypatch):
    """Every upstream URL points at a closed local port unless a test serves the files itself."""
    port = closed_port()
    for dataset, urls in sources.URLS.items():
        monkeypatch.setitem(sources.URLS, dataset, {n: f"http://127.0.0.1:{port}/{dataset}/{n}" for n in urls})


DEFAULTS = {"fake": {"fake_size": 64}, "mnist_static": {"binarize": "static"}}


def cfg(name: str = "fake", **kw) -> DatasetConfig:
    return DatasetConfig(name=name, **{**DEFAULTS.get(name, {}), **kw})


# ---------------------------------------------------------------- configs and validation


@pytest.mark.parametrize("name", DATASETS)
def test_each_dataset_yaml_composes_with_the_schema(name):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), **hydra_version_base()):
        composed = compose(config_name=None, overrides=[f"+dataset={name}"]).dataset
    assert composed.name == name
    assert set(composed) == set(DatasetConfig.__dataclass_fields__)
    assert composed.binarize == ("static" if name == "mnist_static" else "dynamic")
    assert (composed.fake_size > 0) == (name == "fake")
    assert composed.valid_size == {"omniglot": 1345}.get(name, 10000)


@pytest.mark.parametrize(
    "override", ["dataset.valid_sise=3", "dataset.valid_size=many", "dataset.split_seed=1.5"], ids=str
)
def test_typo_or_wrong_type_fails_at_composition(override):
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    with initialize_config_dir(config_dir=str(CONF_DIR), **hydra_version_base()):
        with pytest.raises(ConfigCompositionException):
            compose(config_name=None, overrides=["+dataset=mnist", override])


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"name": "svhn"}, "dataset='svhn' is not allowed; choose one of: mnist, mnist_static, omniglot"),
        ({"name": "mnist_static", "binarize": "dynamic"}, "choose one of: static"),
        ({"name": "fake", "binarize": "threshold"}, "'threshold' is not allowed; choose one of: dynamic, static"),
        ({"name": "fake", "fake_size": 0}, "dataset.fake_size=0 is not allowed"),
        ({"name": "mnist", "fake_size": 5}, "dataset.fake_size=5 applies to dataset=fake only"),
        ({"name": "mnist_static", "valid_size": 5000}, "validation split is fixed at 10000"),
        ({"name": "fake", "split_seed": -1}, "dataset.split_seed=-1 is not allowed"),
    ],
    ids=["name", "static-dynamic", "binarize", "fake-size", "fake-size-elsewhere", "static-valid", "seed"],
)
def test_bad_values_give_one_line_errors(tmp_path, kwargs, fragment):
    assert fragment in one_line_error(cfg, **kwargs)  # DatasetConfig.__post_init__: before any file access
    bad = OmegaConf.structured(DatasetConfig)
    for key, value in {**DEFAULTS.get(kwargs["name"], {}), **kwargs}.items():
        setattr(bad, key, value)
    assert fragment in one_line_error(load_dataset, bad, tmp_path)  # a DictConfig is checked by load_dataset
    assert list(tmp_path.iterdir()) == []


def test_a_dictconfig_is_accepted():
    from omegaconf import OmegaConf

    data = load_dataset(OmegaConf.structured(cfg("fake", fake_size=8)), "unused")
    assert isinstance(data, ImageData) and len(data.train) == 8 and "8/8/8" in repr(data)


# ---------------------------------------------------------------- binarize and the fake dataset


def test_binarize_draws_float32_zeros_and_ones_reproducibly():
    probs = torch.rand(400, 784, generator=torch.Generator().manual_seed(1))
    a = binarize(probs, torch.Generator().manual_seed(7))
    b = binarize(probs, torch.Generator().manual_seed(7))
    c = binarize(probs, torch.Generator().manual_seed(8))
    assert a.dtype == torch.float32 and a.shape == probs.shape
    assert set(a.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(a.mean().item() - probs.mean().item()) < 0.01
    assert torch.equal(binarize(torch.tensor([0.0, 1.0, 1.0, 0.0])), torch.tensor([0.0, 1.0, 1.0, 0.0]))


def test_split_generators_are_independent_streams():
    x = torch.rand(5, generator=split_generator(0, "valid"))
    assert torch.equal(x, torch.rand(5, generator=split_generator(0, "valid")))
    assert not torch.equal(x, torch.rand(5, generator=split_generator(0, "test")))
    assert not torch.equal(x, torch.rand(5, generator=split_generator(1, "valid")))


def test_fake_dataset_shapes_values_and_determinism():
    a = load_dataset(cfg("fake", fake_size=300), "unused")
    b = load_dataset(cfg("fake", fake_size=300), "unused")
    assert a.name == "fake" and a.dynamic and a.image_shape == (1, 28, 28) and a.source == "generated"
    for x in (a.train, a.valid, a.test):
        assert x.shape == (300, 784) and x.dtype == torch.float32
    assert a.train.min() >= 0 and a.train.max() <= 1 and ((a.train > 0.05) & (a.train < 0.95)).any()  # grey
    for x in (a.valid, a.test):
        assert set(x.unique().tolist()) == {0.0, 1.0}
    assert 0.05 < a.train.mean() < 0.3  # sparse strokes, MNIST-like ink fraction
    for x, y in zip((a.train, a.valid, a.test), (b.train, b.valid, b.test), strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a.train, a.test)
    other = load_dataset(cfg("fake", fake_size=300, split_seed=1), "unused")
    assert not torch.equal(a.test, other.test)


def test_fake_images_have_learnable_class_structure():
    x, labels = fake_images(2000, torch.Generator().manual_seed(0))
    assert set(labels.tolist()) == set(range(10))
    means = torch.stack([x[labels == c].mean(0) for c in range(10)])
    within = torch.stack([(x[labels == c] - means[c]).pow(2).sum(1).mean() for c in range(10)]).mean()
    between = torch.cdist(means, means).pow(2).sum() / 90
    assert between > 0.5 * within  # classes differ as much as images within a class vary


def test_static_binarization_fixes_the_training_images():
    a = load_dataset(cfg("fake", binarize="static"), "unused")
    b = load_dataset(cfg("fake", binarize="static"), "unused")
    grey = load_dataset(cfg("fake"), "unused")
    assert not a.dynamic and set(a.train.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(a.train, b.train) and torch.equal(a.test, grey.test)
    assert ((a.train == 1) <= (grey.train > 0)).all()  # ink only where the grey image has some


# ---------------------------------------------------------------- small files in the real layouts


def small_mnist(n_train: int = 120, n_test: int = 30, seed: int = 0) -> dict[str, np.ndarray]:
    """MNIST-shaped uint8 arrays; pixel (0, 0) of training image i holds i + 1 (an id to follow the carve)."""
    g = torch.Generator().manual_seed(seed)
    x, y = fake_images(n_train + n_test, g)
    x = (x * 255).round().to(torch.uint8).reshape(-1, 28, 28).numpy()
    x[:n_train, 0, 0] = np.arange(1, n_train + 1)
    y = y.to(torch.uint8).numpy()
    return {"x_train": x[:n_train], "y_train": y[:n_train], "x_test": x[n_train:], "y_test": y[n_train:]}


def static_arrays(seed: int, sizes: tuple[int, int, int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        s: (rng.random((n, 784)) < 0.13).astype(np.uint8)
        for s, n in zip(("train", "valid", "test"), sizes, strict=True)
    }


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.fixture
def recorded(monkeypatch):
    """Record the content digest of small arrays as the expected one for ``filename`` (as the code does for real)."""

    def record(filename: str, arrays: dict[str, np.ndarray]) -> None:
        monkeypatch.setitem(sources.CONTENT_SHA256, filename, sources.array_digest(arrays))

    return record


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_grey_dataset_carves_validation_and_binarizes_valid_test_once(tmp_path, recorded, name):
    arrays = small_mnist()
    filename = sources.NPZ_FILES[name].filename
    (tmp_path / filename).write_bytes(npz_bytes(arrays))
    recorded(filename, {k: arrays[k] for k in sources.NPZ_FILES[name].keys})
    a = load_dataset(cfg(name, valid_size=20), tmp_path)
    b = load_dataset(cfg(name, valid_size=20), tmp_path)
    assert (len(a.train), len(a.valid), len(a.test)) == (100, 20, 30) and a.dynamic
    ids = (a.train[:, 0] * 255).round().long()
    assert (ids.diff() > 0).all()  # a subset of the training images, in their original order
    rows = ids - 1
    assert torch.equal(a.train, torch.from_numpy(arrays["x_train"][rows.numpy()]).reshape(100, 784).float() / 255)
    for x in (a.valid, a.test):
        assert set(x.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(a.valid, b.valid) and torch.equal(a.test, b.test) and torch.equal(a.train, b.train)
    test_grey = torch.from_numpy(arrays["x_test"]).reshape(30, 784).float() / 255
    assert ((a.test == 1) <= (test_grey > 0)).all() and ((a.test == 1) >= (test_grey == 1)).all()
    moved = load_dataset(cfg(name, valid_size=20, split_seed=3), tmp_path)
    assert not torch.equal(moved.train[:, 0], a.train[:, 0])  # another seed carves other images
    everything = load_dataset(cfg(name, valid_size=0), tmp_path)
    assert everything.train.shape == (120, 784) and everything.valid.shape == (0, 784)
    message = one_line_error(load_dataset, cfg(name, valid_size=120), tmp_path)
    assert "dataset.valid_size=120" in message and "has 120" in message


def test_mnist_static_loads_the_fixed_binarization(tmp_path, recorded):
    rng = np.random.default_rng(0)
    arrays = {
        s: (rng.random((n, 784)) < 0.13).astype(np.uint8) for s, n in [("train", 50), ("valid", 20), ("test", 10)]
    }
    (tmp_path / "binarized_mnist.npz").write_bytes(npz_bytes(arrays))
    recorded("binarized_mnist.npz", arrays)
    data = load_dataset(cfg("mnist_static"), tmp_path)
    assert not data.dynamic and data.source == str(tmp_path / "binarized_mnist.npz")
    for split in ("train", "valid", "test"):
        assert torch.equal(getattr(data, split), torch.from_numpy(arrays[split]).float())


def test_a_present_file_with_other_contents_is_rejected(tmp_path):
    arrays = small_mnist()
    (tmp_path / "mnist.npz").write_bytes(npz_bytes(arrays))  # not the recorded MNIST
    message = one_line_error(load_dataset, cfg("mnist"), tmp_path)
    assert str(tmp_path / "mnist.npz") in message and "expected" in message
    assert sources.URLS["mnist"]["mnist.npz"] in message and "delete it" in message
    (tmp_path / "mnist.npz").write_bytes(b"not a zip")
    assert "not a readable .npz" in one_line_error(load_dataset, cfg("mnist"), tmp_path)
    (tmp_path / "mnist.npz").write_bytes(npz_bytes({"images": arrays["x_train"]}))
    assert "has no array 'x_train'" in one_line_error(load_dataset, cfg("mnist"), tmp_path)


# ---------------------------------------------------------------- MAT-files and Omniglot


def write_mat(path: Path, variables: dict[str, np.ndarray], compress=False, endian="<", storage=None) -> None:
    """A minimal level-5 MAT-file writer (numeric matrices), independent of the reader under test."""
    classes = {"f8": 6, "f4": 7, "i1": 8, "u1": 9, "i2": 10, "u2": 11, "i4": 12, "u4": 13}
    types = {"i1": 1, "u1": 2, "i2": 3, "u2": 4, "i4": 5, "u4": 6, "f4": 7, "f8": 9}

    def element(mtype: int, payload: bytes) -> bytes:
        return struct.pack(endian + "II", mtype, len(payload)) + payload + b"\0" * (-len(payload) % 8)

    out = b"MATLAB 5.0 MAT-file, written by nfvi's tests".ljust(116) + b"\0" * 8
    out += struct.pack(endian + "HH", 0x0100, 0x4D49)
    for name, a in variables.items():
        a = np.atleast_2d(a)
        kind = a.dtype.str[1:]
        stored = storage or kind
        body = element(6, struct.pack(endian + "II", classes[kind], 0))
        body += element(5, np.array(a.shape, endian + "i4").tobytes())
        body += element(1, name.encode())
        body += element(types[stored], a.astype(endian + stored).ravel(order="F").tobytes())
        matrix = element(14, body)
        if compress:
            z = zlib.compress(matrix)
            out += struct.pack(endian + "II", 15, len(z)) + z
        else:
            out += matrix
    path.write_bytes(out)


SCIPY_EXPECTED = {
    "data": np.round(np.random.default_rng(0).random((6, 4)), 3),
    "testdata": np.arange(6, dtype=np.uint8).reshape(3, 2),
    "target": np.array([[1, 0], [0, 1]], dtype=np.int16),
    "flags": np.array([[True, False, True]]),
    "vec": np.array([[1.5, -2.25, 3.0]], dtype=np.float32),
}


@pytest.mark.parametrize("blob", [SCIPY_MAT_V5, SCIPY_MAT_V5_COMPRESSED], ids=["plain", "compressed"])
def test_read_mat_matches_scipy_savemat(tmp_path, blob):
    """Files written by scipy.io.savemat (v5; with a char and a cell variable, which are skipped)."""
    path = tmp_path / "x.mat"
    path.write_bytes(base64.b64decode(blob))
    got = read_mat(path)
    assert set(got) == set(SCIPY_EXPECTED)
    for name, want in SCIPY_EXPECTED.items():
        assert got[name].dtype == want.dtype and np.array_equal(got[name], want), name
    assert set(read_mat(path, names=["data"])) == {"data"}


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "compressed"])
@pytest.mark.parametrize("endian", ["<", ">"], ids=["little", "big"])
def test_read_mat_storage_types_and_byte_orders(tmp_path, compress, endian):
    a = np.arange(12, dtype=np.float64).reshape(3, 4) * 17  # doubles that MATLAB may store as uint8
    write_mat(tmp_path / "a.mat", {"a": a, "b": a[:2] / 255}, compress, endian, storage=None)
    write_mat(tmp_path / "s.mat", {"a": a}, compress, endian, storage="u1")
    got = read_mat(tmp_path / "a.mat")
    assert np.array_equal(got["a"], a) and np.array_equal(got["b"], a[:2] / 255)
    stored = read_mat(tmp_path / "s.mat")["a"]
    assert stored.dtype == np.float64 and np.array_equal(stored, a)


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"MATLAB 7.3 MAT-file".ljust(128) + b"\x89HDF\r\n\x1a\n" + b"\0" * 600, "v7.3 (HDF5)"),
        (b"MATLAB 4".ljust(200), "not a level-5 MAT-file"),
        (b"short", "only 5 bytes"),
    ],
    ids=["v73", "v4", "tiny"],
)
def test_read_mat_unsupported_files(tmp_path, content, fragment):
    (tmp_path / "x.mat").write_bytes(content)
    assert fragment in one_line_error(read_mat, tmp_path / "x.mat")


def test_read_mat_truncated_file(tmp_path):
    write_mat(tmp_path / "a.mat", {"a": np.ones((28, 28))})
    data = (tmp_path / "a.mat").read_bytes()
    (tmp_path / "a.mat").write_bytes(data[: len(data) - 100])
    assert "damaged MAT-file" in one_line_error(read_mat, tmp_path / "a.mat")


def small_omniglot(n_train=40, n_test=12) -> tuple[np.ndarray, np.ndarray]:
    x, _ = fake_images(n_train + n_test, torch.Generator().manual_seed(5))
    x = x.reshape(-1, 28, 28).double().numpy()
    return x[:n_train], x[n_train:]


def write_chardata(path: Path, train: np.ndarray, test: np.ndarray, compress=True) -> None:
    """Like Burda's file: 784 x N doubles, each image stored column-major (MATLAB's layout)."""
    as_columns = lambda x: x.transpose(0, 2, 1).reshape(len(x), 784).T  # noqa: E731
    write_mat(path, {"data": as_columns(train), "testdata": as_columns(test)}, compress=compress)


@pytest.fixture
def small_chardata(monkeypatch):
    monkeypatch.setitem(sources.CHARDATA_COLUMNS, "data", 40)
    monkeypatch.setitem(sources.CHARDATA_COLUMNS, "testdata", 12)
    return small_omniglot()


def test_omniglot_prefers_chardata_and_keeps_images_upright(tmp_path, small_chardata, caplog):
    train, test = small_chardata
    write_chardata(tmp_path / "chardata.mat", train, test)
    (tmp_path / "omniglot28_rawresize.npz").write_bytes(b"ignored when chardata.mat is there")
    with caplog.at_level(logging.WARNING):
        data = load_dataset(cfg("omniglot", valid_size=10), tmp_path)
    assert not caplog.records and data.note == "" and data.source.endswith("chardata.mat")
    assert (len(data.train), len(data.valid), len(data.test)) == (30, 10, 12) and data.dynamic
    grey = torch.from_numpy(train).reshape(40, 784).float()
    assert all((grey == row).all(1).any() for row in data.train)  # upright images, values kept
    assert ((data.test == 1) <= (torch.from_numpy(test).reshape(12, 784) > 0)).all()


def test_omniglot_chardata_with_wrong_shape_is_rejected(tmp_path, small_chardata):
    train, test = small_chardata
    write_chardata(tmp_path / "chardata.mat", train[:39], test)
    assert "has shape (784, 39), expected (784, 40)" in one_line_error(load_dataset, cfg("omniglot"), tmp_path)


def test_omniglot_falls_back_to_rawresize_with_a_one_line_warning(tmp_path, recorded, caplog):
    arrays = small_mnist(n_train=60, n_test=20)
    (tmp_path / "omniglot28_rawresize.npz").write_bytes(npz_bytes(arrays))
    recorded("omniglot28_rawresize.npz", {"x_train": arrays["x_train"], "x_test": arrays["x_test"]})
    with caplog.at_level(logging.WARNING):
        data = load_dataset(cfg("omniglot", valid_size=15), tmp_path)
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "\n" not in record.getMessage() and "NOT comparable" in record.getMessage()
    assert data.note == record.getMessage() and data.source.endswith("omniglot28_rawresize.npz")
    assert (len(data.train), len(data.valid), len(data.test)) == (45, 15, 20)


# ---------------------------------------------------------------- fetching from a (local) public source


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(monkeypatch, server: LocalHTTPServer, dataset: str, files: dict[str, bytes], lengths=None) -> None:
    """Serve ``files`` (upstream name -> bytes) and point :data:`sources.URLS` of ``dataset`` at them."""
    urls = {}
    for name, body in files.items():
        urls[name] = server.add(f"/{dataset}/{name}", body, length=(lengths or {}).get(name))
    monkeypatch.setitem(sources.URLS, dataset, urls)


def idx_bytes(a: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 8, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def upstream_files(dataset: str, arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    """The small arrays in the upstream formats: Keras npz, Larochelle amat, Zalando IDX gz, Burda chardata."""
    if dataset == "mnist":
        return {"mnist.npz": npz_bytes(arrays)}
    if dataset == "mnist_static":
        amat = lambda x: "".join(" ".join(map(str, row)) + "\n" for row in x).encode()  # noqa: E731
        return {f"binarized_mnist_{s}.amat": amat(arrays[s]) for s in ("train", "valid", "test")}
    if dataset == "fashion_mnist":
        names = {"x_train": "train-images-idx3", "y_train": "train-labels-idx1"}
        names |= {"x_test": "t10k-images-idx3", "y_test": "t10k-labels-idx1"}
        return {f"{names[k]}-ubyte.gz": gzip.compress(idx_bytes(a), mtime=0) for k, a in arrays.items()}
    raise ValueError(dataset)


def small_arrays(dataset: str) -> dict[str, np.ndarray]:
    if dataset == "mnist_static":
        rng = np.random.default_rng(1)
        return {
            s: (rng.random((n, 784)) < 0.13).astype(np.uint8) for s, n in [("train", 30), ("valid", 12), ("test", 9)]
        }
    return small_mnist()


@pytest.fixture
def upstream(monkeypatch, http_server, recorded):
    """Serve a small dataset in its upstream format and record its checksums; returns (arrays, files)."""

    def setup(dataset: str, lengths=None):
        arrays = small_arrays(dataset)
        files = upstream_files(dataset, arrays)
        serve(monkeypatch, http_server, dataset, files, lengths)
        recorded(sources.NPZ_FILES[dataset].filename, arrays)
        if dataset == "fashion_mnist":
            for name, body in files.items():
                monkeypatch.setitem(sources.IDX_MD5, name, hashlib.md5(gzip.decompress(body)).hexdigest())
        return arrays, files

    return setup


@pytest.mark.parametrize("dataset", ["mnist", "mnist_static", "fashion_mnist"])
def test_missing_file_is_fetched_converted_and_then_read_locally(tmp_path, monkeypatch, upstream, dataset):
    arrays, files = upstream(dataset)
    root = tmp_path / "data"
    kwargs = {"valid_size": 20} if dataset != "mnist_static" else {}
    first = load_dataset(cfg(dataset, **kwargs), root)
    filename = sources.NPZ_FILES[dataset].filename
    assert [p.name for p in root.iterdir()] == [filename]  # the dataset file only: no raw or temporary files
    with np.load(root / filename) as f:
        assert all(np.array_equal(f[k], a) for k, a in arrays.items())
    if dataset == "mnist":
        assert (root / filename).read_bytes() == files["mnist.npz"]  # Keras's file is kept byte for byte
    offline = {name: f"http://127.0.0.1:{closed_port()}/{name}" for name in files}
    monkeypatch.setitem(sources.URLS, dataset, offline)
    again = load_dataset(cfg(dataset, **kwargs), root)  # no network needed any more
    assert torch.equal(first.train, again.train) and torch.equal(first.test, again.test)


def corrupt(dataset: str, files: dict[str, bytes]) -> dict[str, bytes]:
    name = next(iter(files))
    body = files[name]
    if dataset == "mnist":
        arrays = small_mnist(seed=1)  # a valid npz with other images
        return {name: npz_bytes(arrays)}
    if dataset == "fashion_mnist":
        raw = bytearray(gzip.decompress(body))
        raw[-1] ^= 0xFF
        return {**files, name: gzip.compress(bytes(raw))}
    return {**files, name: body.replace(b"1", b"0", 50)}  # flip some pixels of the amat


@pytest.mark.parametrize("dataset", ["mnist", "mnist_static", "fashion_mnist"])
@pytest.mark.parametrize("failure", ["corrupted", "truncated", "offline"])
def test_failed_fetch_gives_one_line_and_leaves_nothing(tmp_path, monkeypatch, upstream, http_server, dataset, failure):
    arrays, files = upstream(dataset)
    if failure == "corrupted":
        serve(monkeypatch, http_server, dataset, corrupt(dataset, files))
    elif failure == "truncated":
        name = next(iter(files))
        serve(monkeypatch, http_server, dataset, files, lengths={name: len(files[name]) + 500})
    else:
        port = closed_port()
        monkeypatch.setitem(sources.URLS, dataset, {n: f"http://127.0.0.1:{port}/{n}" for n in files})
    root = tmp_path / "data"
    message = one_line_error(load_dataset, cfg(dataset), root)
    filename = sources.NPZ_FILES[dataset].filename
    assert filename in message and str(root / filename) in message
    folder = os.path.commonprefix(list(sources.URLS[dataset].values())).rpartition("/")[0]
    assert folder in message  # the source: the file's URL, or the folder of a several-file source
    assert {"corrupted": "expected", "truncated": "truncated", "offline": "Connection refused"}[failure] in message
    assert list(root.iterdir()) == []


def test_omniglot_chardata_is_fetched_and_checked(tmp_path, monkeypatch, http_server, small_chardata):
    write_chardata(tmp_path / "upstream.mat", *small_chardata)
    body = (tmp_path / "upstream.mat").read_bytes()
    serve(monkeypatch, http_server, "omniglot", {"chardata.mat": body})
    root = tmp_path / "data"
    monkeypatch.setattr(sources, "CHARDATA_MD5", "0" * 32)
    message = one_line_error(load_dataset, cfg("omniglot", valid_size=10), root)
    assert "chardata.mat" in message and str(root) in message and "md5" in message and http_server.base in message
    assert list(root.iterdir()) == []
    monkeypatch.setattr(sources, "CHARDATA_MD5", hashlib.md5(body).hexdigest())
    data = load_dataset(cfg("omniglot", valid_size=10), root)
    assert (root / "chardata.mat").read_bytes() == body and len(data.test) == 12 and data.note == ""


def test_omniglot_offline_without_any_file_names_both_files(tmp_path, monkeypatch):
    url = f"http://127.0.0.1:{closed_port()}/chardata.mat"
    monkeypatch.setitem(sources.URLS, "omniglot", {"chardata.mat": url})
    message = one_line_error(load_dataset, cfg("omniglot"), tmp_path)
    assert "chardata.mat" in message and "omniglot28_rawresize.npz" in message and str(tmp_path) in message
    assert url in message and list(tmp_path.iterdir()) == []


def test_rawresize_has_no_public_source(tmp_path, monkeypatch):
    message = one_line_error(sources.load_npz, tmp_path, sources.NPZ_FILES["omniglot_rawresize"])
    assert "omniglot28_rawresize.npz is missing at" in message and "no public source" in message


@pytest.mark.parametrize(
    "text",
    [b"0 1 1\n1 0 0\n", b"0 1 1\r\n1 0 0\r\n", b"0.0 1.0 1\n1 0 0"],
    ids=["plain", "crlf", "floats-no-final-newline"],
)
def test_parse_amat(text):
    assert np.array_equal(sources.parse_amat(text, width=3), [[0, 1, 1], [1, 0, 0]])


def test_parse_amat_and_idx_reject_bad_input():
    with pytest.raises(ValueError):
        sources.parse_amat(b"0 1\n1 0 1\n", width=3)
    with pytest.raises(ValueError):
        sources.parse_idx(b"\0\0\x0d\x01" + b"\0" * 8)
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(sources.parse_idx(idx_bytes(a)), a)


# ---------------------------------------------------------------- the real files (shared/data)


def is_binary(x: torch.Tensor) -> bool:
    """Only 0s and 1s, and both present (cheaper than ``unique`` on 40M values)."""
    return bool(((x == 0) | (x == 1)).all()) and 0 < x.sum() < x.numel()


def real(filename: str) -> Path:
    path = SHARED_DATA / filename
    if not path.exists():
        pytest.skip(f"{path} is absent (set NFVI_DATA)")
    return SHARED_DATA


@pytest.mark.data
def test_real_mnist_dynamic():
    root = real("mnist.npz")
    start = time.perf_counter()
    data = load_dataset(cfg("mnist"), root)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"loading MNIST took {elapsed:.1f} s"  # about 0.6 s on an idle 2-core machine
    assert (data.train.shape, data.valid.shape, data.test.shape) == ((50000, 784), (10000, 784), (10000, 784))
    assert data.dynamic and data.train.dtype == torch.float32 and data.image_shape == (1, 28, 28)
    assert is_binary(data.valid) and is_binary(data.test)
    grey = data.train[:2000]
    assert torch.equal((grey * 255).round() / 255, grey) and ((grey > 0) & (grey < 1)).any()  # grey levels k / 255
    assert abs(data.test.mean().item() - 33.791 / 255) < 0.002  # README: test mean 33.791
    draws = [binarize(data.train[:1000]) for _ in range(2)]
    assert not torch.equal(*draws)  # a fresh sample each epoch
    full = load_dataset(cfg("mnist", valid_size=0), root)
    assert abs(full.train.mean().item() - 33.3184 / 255) < 1e-5  # README: training-pixel mean 33.3184
    assert torch.equal(full.test, data.test)  # the test set is binarized once, the same at every load


@pytest.mark.data
def test_real_mnist_static_and_its_class_ordered_test_set():
    root = real("binarized_mnist.npz")
    data = load_dataset(cfg("mnist_static"), root)
    assert (len(data.train), len(data.valid), len(data.test)) == (50000, 10000, 10000) and not data.dynamic
    for x, mean in ((data.train, 0.13056), (data.valid, 0.13113), (data.test, 0.13251)):
        assert is_binary(x) and abs(x.mean().item() - mean) < 1e-5
    real("mnist.npz")
    mnist, _ = sources.load_npz(root, sources.NPZ_FILES["mnist"])
    order = np.argsort(mnist["y_test"], kind="stable")  # the test set is MNIST's, sorted stably by class
    grey = torch.from_numpy(mnist["x_test"][order].reshape(10000, 784))
    assert ((data.test == 1) <= (grey > 0)).all() and ((data.test == 1) >= (grey == 255)).all()


@pytest.mark.data
def test_real_fashion_mnist():
    data = load_dataset(cfg("fashion_mnist", valid_size=0), real("fashion_mnist.npz"))
    assert (len(data.train), len(data.valid), len(data.test)) == (60000, 0, 10000)
    assert abs(data.train.mean().item() - 72.94 / 255) < 0.0005
    assert abs(data.test.mean().item() - 73.15 / 255) < 0.002


@pytest.mark.data
def test_real_omniglot_stand_in(caplog):
    root = real("omniglot28_rawresize.npz")
    if (root / "chardata.mat").exists():
        pytest.skip("chardata.mat is present: the stand-in is not used")
    with caplog.at_level(logging.WARNING):
        data = load_dataset(cfg("omniglot", valid_size=0), root)
    assert "NOT comparable" in caplog.text and data.note
    assert (len(data.train), len(data.test)) == (24345, 8115) and data.dynamic
    assert abs(data.train.mean().item() - 0.0808) < 0.0005 and abs(data.test.mean().item() - 0.0798) < 0.002
