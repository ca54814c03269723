"""Where the image data files come from, how they are checked, and how upstream files are converted.

Each dataset file under the data root (``paths.data_dir``) is a NumPy ``.npz`` with the layout of
the shared copies (see ``docs/data.md``). A present file is accepted when the sha256 of its decoded
arrays (:func:`array_digest`) equals the one recorded in :data:`CONTENT_SHA256`; those digests
were computed here from the shared copies, whose values the data README verifies against the
official MD5s (MNIST, Fashion-MNIST IDX files) or the original Larochelle files. A hash of the
arrays rather than of the file bytes accepts any faithful copy (Keras's ``mnist.npz`` and the shared
one differ as files but hold identical arrays) and rejects anything else.

A missing file is fetched from its standard public source (:data:`URLS`; tests point it at a local
server), converted where needed, checked, and written atomically; on any failure nothing is left.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nfvi.download import DownloadError, download
from nfvi.errors import NfviError
from nfvi.runs import atomic_write_bytes

__all__ = [
    "URLS",
    "CONTENT_SHA256",
    "IDX_MD5",
    "CHARDATA_MD5",
    "CHARDATA_COLUMNS",
    "NPZ_FILES",
    "NpzFile",
    "array_digest",
    "load_npz",
    "parse_idx",
    "parse_amat",
    "fetch_chardata",
    "read_chardata",
]

#: dataset -> {upstream file name: URL}; monkeypatch these in tests (they must not reach the internet)
URLS: dict[str, dict[str, str]] = {
    "mnist": {"mnist.npz": "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"},
    "mnist_static": {
        f"binarized_mnist_{split}.amat": "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
        f"binarized_mnist_{split}.amat"
        for split in ("train", "valid", "test")
    },
    "fashion_mnist": {
        name: f"http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{name}"
        for name in (
            "train-images-idx3-ubyte.gz",
            "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
        )
    },
    "omniglot": {"chardata.mat": "https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/chardata.mat"},
    # torchvision.datasets.CIFAR10.url; checked against CIFAR10.tgz_md5 (nfvi.data.cifar)
    "cifar10": {"cifar-10-python.tar.gz": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"},
}

#: file -> sha256 of its arrays (:func:`array_digest` over the keys in :data:`NPZ_FILES`), from the shared copies
CONTENT_SHA256: dict[str, str] = {
    "mnist.npz": "bd930a59a860c3d5915c6d67631a728a21bc7c535055bac61f9487e95b28eaa5",
    "binarized_mnist.npz": "809a892e5d12a1e3a11c6c07645728956bbde0965276a96e43bc3e7bde1bd22e",
    "fashion_mnist.npz": "88a0cb70ffe426e8e0cd39fae4f0e26704de80d25115b03948798eeadc3aead8",
    "omniglot28_rawresize.npz": "edfd830234bb081469352237073e6a1bf39ab6cedd2a695c118950a25acc2b94",
}

#: official MD5s of the *uncompressed* Fashion-MNIST IDX files (Zalando's README; the shared copy matches them)
IDX_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
}

#: MD5 of Burda's chardata.mat as recorded by a third-party loader; NOT verified here (no copy available)
CHARDATA_MD5: str | None = "21ecaf34373511aa7691cf2e0802aa3d"
#: variable -> number of images (columns of the 784 x N matrices) in chardata.mat
CHARDATA_COLUMNS: dict[str, int] = {"data": 24345, "testdata": 8070}


def array_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over the arrays in key order: each key, dtype and shape, then the C-order bytes."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
        digest.update(memoryview(a).cast("B"))
    return digest.hexdigest()


def parse_idx(data: bytes) -> np.ndarray:
    """Decode an (uncompressed) IDX file of unsigned bytes, e.g. ``train-images-idx3-ubyte``."""
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError("not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"IDX body has {body.size} bytes for shape {shape}")
    return body.reshape(shape)


def parse_amat(data: bytes, width: int = 784) -> np.ndarray:
    """Decode a Larochelle ``.amat`` file (one image per line, whitespace-separated 0/1) to uint8."""
    raw = np.frombuffer(data, np.uint8)
    digit = (raw == ord("0")) | (raw == ord("1"))
    space = (raw == ord(" ")) | (raw == ord("\n")) | (raw == ord("\r")) | (raw == ord("\t"))
    if not (digit | space).all():  # general case (e.g. "1.0"): slow but exact
        values = np.array(data.split(), dtype=np.float64)
        if not np.isin(values, (0.0, 1.0)).all():
            raise ValueError("amat values are not all 0 or 1")
        return values.astype(np.uint8).reshape(-1, width)
    values = raw[digit] - ord("0")
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    if values.size % width or values.size // width != lines:
        raise ValueError(f"amat has {values.size} values on {lines} lines, not {width} per line")
    return values.reshape(-1, width)


@dataclass(frozen=True)
class NpzFile:
    """One data file under the root: its arrays (``keys``, checked by digest) and how to fetch it."""

    filename: str
    keys: tuple[str, ...]
    dataset: str | None  # key of URLS; None: no public source
    build: Callable[[Path, str], dict[str, np.ndarray]] | None = None  # (tmp dir, dataset) -> arrays


class _Mismatch(NfviError):
    """Downloaded data that decode but are not the recorded ones."""


def _fetch_all(tmp: Path, dataset: str) -> dict[str, Path]:
    return {name: download(url, tmp / name) for name, url in URLS[dataset].items()}


def _build_fashion(tmp: Path, dataset: str) -> dict[str, np.ndarray]:
    arrays = {}
    for name, path in _fetch_all(tmp, dataset).items():
        data = gzip.decompress(path.read_bytes())
        if (got := hashlib.md5(data).hexdigest()) != IDX_MD5[name]:
            raise _Mismatch(f"{name} from {URLS[dataset][name]} decompresses to md5 {got}, expected {IDX_MD5[name]}")
        split = "train" if name.startswith("train") else "test"
        arrays[("x_" if "images" in name else "y_") + split] = parse_idx(data)
    return arrays


def _build_static(tmp: Path, dataset: str) -> dict[str, np.ndarray]:
    paths = _fetch_all(tmp, dataset)
    return {s: parse_amat(paths[f"binarized_mnist_{s}.amat"].read_bytes()) for s in ("train", "valid", "test")}


NPZ_FILES: dict[str, NpzFile] = {
    "mnist": NpzFile("mnist.npz", ("x_train", "y_train", "x_test", "y_test"), "mnist"),  # Keras's file, kept as is
    "mnist_static": NpzFile("binarized_mnist.npz", ("train", "valid", "test"), "mnist_static", _build_static),
    "fashion_mnist": NpzFile(
        "fashion_mnist.npz", ("x_train", "y_train", "x_test", "y_test"), "fashion_mnist", _build_fashion
    ),
    "omniglot_rawresize": NpzFile("omniglot28_rawresize.npz", ("x_train", "x_test"), None),
}


def _read_npz(path: Path, spec: NpzFile) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in spec.keys if k not in f.files]
            if missing:
                has = ", ".join(f.files)
                raise NfviError(f"{path} has no array {missing[0]!r} (it has {has}); is it {spec.filename}?")
            return {k: f[k] for k in spec.keys}
    except NfviError:  # a ValueError too: keep its own message
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise NfviError(f"{path} is not a readable .npz file ({' '.join(str(exc).split())})") from None


def _source(spec: NpzFile) -> str:
    """The URL of a one-file source, or the folder URL the files of a several-file source share."""
    if spec.dataset is None:
        return "no public source"
    urls = list(URLS[spec.dataset].values())
    return urls[0] if len(urls) == 1 else os.path.commonprefix(urls).rpartition("/")[0] + "/"


def _check_digest(arrays: Mapping[str, np.ndarray], spec: NpzFile) -> str | None:
    """None when the arrays are the recorded ones, else a description of the difference."""
    want = CONTENT_SHA256.get(spec.filename)
    got = array_digest(arrays)
    if want is not None and got != want:
        return f"arrays sha256 {got}, expected {want}"
    return None


def load_npz(root: str | Path, spec: NpzFile) -> tuple[dict[str, np.ndarray], Path]:
    """The checked arrays of ``spec`` under ``root`` (fetching the file first if it is missing), and its path."""
    path = Path(root) / spec.filename
    if not path.exists():
        _fetch_npz(path, spec)
    arrays = _read_npz(path, spec)
    if (problem := _check_digest(arrays, spec)) is not None:
        fix = f"delete it to re-download from {_source(spec)}" if spec.dataset else "replace it with the right file"
        raise NfviError(f"{path} does not hold the expected {spec.filename} data ({problem}); {fix}")
    return arrays, path


def _fetch_npz(path: Path, spec: NpzFile) -> None:
    """Download ``spec`` from its source, convert, check and write it to ``path`` atomically (or raise)."""
    where = f"{spec.filename} is missing at {path}"
    if spec.dataset is None:
        raise NfviError(f"{where} and has no public source; put a copy there or set NFVI_DATA / paths.data_dir")

    def verify(arrays: Mapping[str, np.ndarray], url: str) -> None:
        if (problem := _check_digest(arrays, spec)) is not None:
            raise _Mismatch(f"the data from {url} are not the recorded ones ({problem})")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{spec.filename}."))
    try:
        if spec.build is None:  # the upstream file is the .npz itself: check it, then rename it into place
            (url,) = URLS[spec.dataset].values()
            download(url, path, verify=lambda p: verify(_read_npz(p, spec), url))
        else:
            arrays = spec.build(tmp, spec.dataset)
            verify(arrays, _source(spec))
            buffer = io.BytesIO()
            np.savez_compressed(buffer, **arrays)
            atomic_write_bytes(path, buffer.getvalue())
    except (DownloadError, _Mismatch, ValueError, OSError, EOFError, NfviError) as exc:
        url, reason = (exc.url, exc.reason) if isinstance(exc, DownloadError) else (_source(spec), str(exc))
        raise NfviError(
            f"{where}; fetching it from {url} failed: {' '.join(reason.split())}; put a copy there or set "
            f"NFVI_DATA / paths.data_dir (nothing was written)"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_chardata(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Burda et al.'s chardata.mat as (train, test) arrays ``(N, 28, 28)`` float32 in [0, 1], upright.

    The matrices are 784 x N with each image stored column-major; the IWAE code (and Sylvester's)
    reads them with ``reshape((-1, 28, 28)).reshape((-1, 784), order='F')``, i.e. a transpose of
    each 28 x 28 image, which is what is done here.
    """
    from nfvi.data.matfile import read_mat

    path = Path(path)
    mats = read_mat(path, names=tuple(CHARDATA_COLUMNS))
    out = []
    for name, columns in CHARDATA_COLUMNS.items():
        if name not in mats:
            raise NfviError(f"{path} has no variable {name!r}; is it Burda et al.'s chardata.mat?")
        m = mats[name]
        if m.shape != (784, columns):
            raise NfviError(f"{path}: variable {name!r} has shape {m.shape}, expected (784, {columns})")
        x = m.T.reshape(-1, 28, 28).transpose(0, 2, 1).astype(np.float32)
        if not (x.min() >= 0.0 and x.max() <= 1.0):
            raise NfviError(f"{path}: variable {name!r} has values outside [0, 1]")
        out.append(np.ascontiguousarray(x))
    return out[0], out[1]


def fetch_chardata(path: str | Path) -> Path:
    """Download chardata.mat to ``path`` (md5 :data:`CHARDATA_MD5`, then decoded and shape-checked)."""
    url = URLS["omniglot"]["chardata.mat"]
    return download(url, path, md5=CHARDATA_MD5, verify=read_chardata)
