"""Image datasets for the VAE experiments.

Binarized 28x28 images (``kind="binary"``): ``dataset=mnist|mnist_static|omniglot|fashion_mnist|fake``.
8-bit colour images (``kind="8bit"``, :mod:`nfvi.data.cifar`): ``dataset=cifar10|cifar10_patches|fake_cifar10``.

:func:`load_dataset` returns an :class:`ImageData` with flat ``(N, 784)`` float32 splits:

- ``train``: Bernoulli means in [0, 1] (grey / 255) when ``dynamic`` (the trainer draws a fresh
  :func:`binarize` sample every epoch), exactly 0/1 otherwise;
- ``valid`` and ``test``: exactly 0/1, binarized once with a generator seeded from ``split_seed``, so
  every run and every load sees the same validation and test images.

8-bit datasets are not binarized (``binarize: none``): their splits are flat ``(N, C*H*W)`` uint8
tensors of the values 0..255 (channel-major), which the model reads as ``k / 255``; ``image_shape``
gives ``(C, H, W)``. ``cifar10``: 50,000/10,000 images 3x32x32 with ``valid_size`` carved from the
training images; ``cifar10_patches``: ``patches_per_image`` random ``patch_size`` x ``patch_size`` crops
of every image of each split, drawn once with a generator seeded from ``split_seed`` (fixed patches);
``fake_cifar10``: ``fake_size`` generated 3x32x32 images per split (not CIFAR-10).

Where a dataset has no validation split, ``valid_size`` images are carved from the training images
by a permutation seeded with ``split_seed`` (both splits keep the original order). Files are read
from the data root (``paths.data_dir``, default ``$NFVI_DATA`` or ``./data``) and fetched from their
public source when missing (:mod:`nfvi.data.sources`).
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from nfvi.config import store
from nfvi.data import cifar, sources
from nfvi.data.fake import fake_images
from nfvi.download import DownloadError
from nfvi.errors import NfviError, check_choice, check_int_range, check_range, check_seed

__all__ = [
    "DATASETS",
    "COLOR_DATASETS",
    "ALL_DATASETS",
    "DatasetConfig",
    "ImageData",
    "load_dataset",
    "binarize",
    "split_generator",
]

log = logging.getLogger(__name__)

#: the binarized 28x28 datasets
DATASETS: tuple[str, ...] = ("mnist", "mnist_static", "omniglot", "fashion_mnist", "fake")
#: the 8-bit colour datasets (ImageData.kind == "8bit")
COLOR_DATASETS: tuple[str, ...] = ("cifar10", "cifar10_patches", "fake_cifar10")
ALL_DATASETS: tuple[str, ...] = DATASETS + COLOR_DATASETS
#: the ``binarize`` values each dataset allows (mnist_static has no grey levels to draw from; 8-bit data: none)
BINARIZE: dict[str, tuple[str, ...]] = (
    {name: ("dynamic", "static") for name in DATASETS}
    | {"mnist_static": ("static",)}
    | {name: ("none",) for name in COLOR_DATASETS}
)
KINDS = ("binary", "8bit")
CIFAR_SHAPE = (3, 32, 32)
STATIC_VALID_SIZE = 10000  # Larochelle's fixed validation split
IMAGE_SHAPE = (1, 28, 28)
OMNIGLOT_FALLBACK_NOTE = (
    "omniglot: chardata.mat (Burda et al.'s 28x28 split, 24,345/8,070) is not in the data root; using "
    "omniglot28_rawresize.npz (24,345/8,115, resized here from the raw images): numbers are NOT comparable "
    "to published Omniglot results"
)


@dataclass
class DatasetConfig:
    """``dataset=<name>`` picks the option; see ``docs/data.md``."""

    name: str = "mnist"  # mnist | mnist_static | omniglot | fashion_mnist | fake | cifar10 | cifar10_patches | ...
    binarize: str = "dynamic"  # dynamic: fresh Bernoulli draw of train each epoch | static: fixed 0/1 | none (8-bit)
    valid_size: int = 10000  # carved from train with split_seed (not mnist_static: fixed 10k; not fake*)
    split_seed: int = 0  # seed of that carve, of the one-time binarization of valid/test and of the patches
    fake_size: int = 0  # fake, fake_cifar10 only: generated images per split
    patch_size: int = 0  # cifar10_patches only: side of the square random crops (the reading: 8)
    patches_per_image: int = 1  # cifar10_patches only: random crops per image

    def __post_init__(self):
        """The checks that need no data (``valid_size`` against the training set waits for the data)."""
        name = self.name
        check_choice("dataset", name, ALL_DATASETS)
        check_choice(f"dataset.binarize (for dataset={name})", self.binarize, BINARIZE[name])
        check_seed("dataset.split_seed", self.split_seed)
        check_int_range("dataset.valid_size", self.valid_size, 0, kind="a whole number of images")
        if name in ("fake", "fake_cifar10"):
            check_int_range("dataset.fake_size", self.fake_size, 1, 10**6, kind="a positive integer (images per split)")
        elif self.fake_size != 0:
            raise NfviError(
                f"dataset.fake_size={self.fake_size!r} applies to dataset=fake only (and fake_cifar10); leave it at 0"
            )
        if name == "cifar10_patches":
            check_int_range("dataset.patch_size", self.patch_size, 1, 32, kind="a whole number of pixels")
            check_int_range("dataset.patches_per_image", self.patches_per_image, 1, 1024, kind="a whole number")
        elif self.patch_size != 0 or self.patches_per_image != 1:
            raise NfviError(
                f"dataset.patch_size={self.patch_size!r} / patches_per_image={self.patches_per_image!r} apply to "
                f"dataset=cifar10_patches only; leave them at 0 / 1"
            )
        if name == "mnist_static" and self.valid_size != STATIC_VALID_SIZE:
            raise NfviError(
                f"dataset.valid_size={self.valid_size!r} does not apply to mnist_static, whose validation split is "
                f"fixed at {STATIC_VALID_SIZE}; leave it at {STATIC_VALID_SIZE}"
            )


store("base_dataset", DatasetConfig, group="dataset")


@dataclass
class ImageData:
    """The three splits of a dataset, flat ``(N, 784)`` float32 (see the module docstring)."""

    name: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    dynamic: bool
    image_shape: tuple = IMAGE_SHAPE
    source: str = ""  # the file(s) the data came from ("generated" for fake)
    note: str = ""  # a caveat to carry into results (e.g. the Omniglot stand-in); empty when none
    kind: str = "binary"  # binary: float 0/1 (train: Bernoulli means when dynamic) | 8bit: uint8 0..255, not binarized

    def __repr__(self) -> str:
        sizes = "/".join(str(len(x)) for x in (self.train, self.valid, self.test))
        kind = "8-bit" if self.kind == "8bit" else "dynamic" if self.dynamic else "static"
        return f"ImageData(name={self.name!r}, train/valid/test={sizes}, {kind}, source={self.source!r})"

    @property
    def num_dims(self) -> int:
        """Values per image, C * H * W (the D of bits per dimension)."""
        return int(np.prod(self.image_shape))

    def pixel_mean(self, chunk: int = 4096) -> torch.Tensor:
        """Mean training image, flat ``(D,)`` float32 in [0, 1] (8-bit values divided by 255), in chunks."""
        total = torch.zeros(self.train.shape[1], dtype=torch.float64)
        for part in self.train.split(chunk):
            total += part.double().sum(0)
        mean = total / max(len(self.train), 1)
        return (mean / 255.0 if self.kind == "8bit" else mean).float()


def split_generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator for one named random stream of ``seed`` (streams are independent of each other)."""
    state = np.random.SeedSequence([int(seed), zlib.crc32(stream.encode())]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def binarize(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One Bernoulli draw per pixel (``torch.bernoulli``): a float32 tensor of 0s and 1s, shaped like ``probs``."""
    return torch.bernoulli(probs.float(), generator=generator)


def _flat_unit(x: np.ndarray) -> torch.Tensor:
    """(N, 28, 28) or (N, 784) uint8 grey levels (or floats in [0, 1]) -> (N, 784) float32 in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(x).reshape(len(x), 784))
    return t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()


def _from_grey(cfg, name: str, train: np.ndarray, test: np.ndarray, source: str, note: str = "") -> ImageData:
    """Carve the validation split, binarize valid/test once, and binarize train once if ``static``."""
    seed = int(cfg.split_seed)
    train, valid = _carve(train, int(cfg.valid_size), seed, name)
    train_t = _flat_unit(train)
    if cfg.binarize == "static":
        train_t = binarize(train_t, split_generator(seed, "train"))
    return ImageData(
        name=name,
        train=train_t,
        valid=binarize(_flat_unit(valid), split_generator(seed, "valid")),
        test=binarize(_flat_unit(test), split_generator(seed, "test")),
        dynamic=cfg.binarize == "dynamic",
        source=source,
        note=note,
    )


def _omniglot(cfg, root: Path) -> ImageData:
    chardata, rawresize = root / "chardata.mat", root / sources.NPZ_FILES["omniglot_rawresize"].filename
    if not chardata.exists() and rawresize.exists():
        arrays, path = sources.load_npz(root, sources.NPZ_FILES["omniglot_rawresize"])
        log.warning(OMNIGLOT_FALLBACK_NOTE)
        return _from_grey(cfg, "omniglot", arrays["x_train"], arrays["x_test"], str(path), OMNIGLOT_FALLBACK_NOTE)
    if not chardata.exists():
        try:
            sources.fetch_chardata(chardata)
        except DownloadError as exc:
            raise NfviError(
                f"dataset=omniglot needs chardata.mat (or the stand-in {rawresize.name}) in {root}; fetching "
                f"chardata.mat from {exc.url} failed: {exc.reason}; put a copy there or set NFVI_DATA / "
                f"paths.data_dir (nothing was written)"
            ) from None
    train, test = sources.read_chardata(chardata)
    return _from_grey(cfg, "omniglot", train, test, str(chardata))


def _field(cfg, key: str):
    return getattr(cfg, key, getattr(DatasetConfig, key))


def _carve(train: np.ndarray, valid_size: int, seed: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(train, valid)``: ``valid_size`` images chosen by a permutation seeded with ``seed`` (order kept)."""
    n = len(train)
    check_range(
        "dataset.valid_size", valid_size, low=0, high=n - 1, kind=f"an integer (the {name} training set has {n})"
    )
    if not valid_size:
        return train, train[:0]
    perm = torch.randperm(n, generator=split_generator(seed, "carve")).numpy()
    return train[np.sort(perm[valid_size:])], train[np.sort(perm[:valid_size])]


def _flat_uint8(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x.contiguous()
    return t.reshape(len(t), int(np.prod(t.shape[1:])))


def _color(cfg: DatasetConfig, root: Path) -> ImageData:
    """cifar10, cifar10_patches and fake_cifar10: 8-bit splits, see the module docstring."""
    name, seed = cfg.name, int(cfg.split_seed)
    if name == "fake_cifar10":
        splits = [
            cifar.fake_color_images(cfg.fake_size, split_generator(seed, f"fake_cifar10/{s}"))
            for s in ("train", "valid", "test")
        ]
        return ImageData(name, *map(_flat_uint8, splits), dynamic=False, image_shape=CIFAR_SHAPE,
                         source="generated", kind="8bit")  # fmt: skip
    train, test, source = cifar.read_cifar10(root)
    train, valid = _carve(train, int(cfg.valid_size), seed, name)
    shape, note = CIFAR_SHAPE, ""
    if name == "cifar10_patches":
        size, per = int(cfg.patch_size), int(cfg.patches_per_image)
        train, valid, test = (
            cifar.random_patches(x, size, per, split_generator(seed, f"patches/{s}"))
            for x, s in ((train, "train"), (valid, "valid"), (test, "test"))
        )
        shape = (3, size, size)
        note = (
            f"cifar10_patches: {per} fixed random {size}x{size} crop(s) per image (split_seed={seed}); the "
            f"reproductions' reading of the paper's CIFAR-10 setup, not confirmed from the paper"
        )
    return ImageData(name, *map(_flat_uint8, (train, valid, test)), dynamic=False, image_shape=shape,
                     source=source, note=note, kind="8bit")  # fmt: skip


def load_dataset(cfg: DatasetConfig | DictConfig, root: str | Path) -> ImageData:
    """Load (fetching if needed) the dataset ``cfg.name`` from the data root ``root``; see the module docstring."""
    cfg = DatasetConfig(**{k: _field(cfg, k) for k in DatasetConfig.__dataclass_fields__})
    name = cfg.name  # DatasetConfig(...) above checked the values (DatasetConfig.__post_init__)
    root = Path(root).expanduser()

    if name == "fake":
        seed = cfg.split_seed
        train, valid, test = (
            fake_images(cfg.fake_size, split_generator(seed, f"fake/{s}"))[0] for s in ("train", "valid", "test")
        )
        data = ImageData(
            name=name,
            train=binarize(train, split_generator(seed, "train")) if cfg.binarize == "static" else train,
            valid=binarize(valid, split_generator(seed, "valid")),
            test=binarize(test, split_generator(seed, "test")),
            dynamic=cfg.binarize == "dynamic",
            source="generated",
        )
    elif name == "mnist_static":
        arrays, path = sources.load_npz(root, sources.NPZ_FILES[name])
        splits = [torch.from_numpy(arrays[s]).reshape(len(arrays[s]), -1).float() for s in ("train", "valid", "test")]
        data = ImageData(name, *splits, dynamic=False, source=str(path))
    elif name == "omniglot":
        data = _omniglot(cfg, root)
    elif name in COLOR_DATASETS:
        data = _color(cfg, root)
    else:  # mnist, fashion_mnist
        arrays, path = sources.load_npz(root, sources.NPZ_FILES[name])
        data = _from_grey(cfg, name, arrays["x_train"], arrays["x_test"], str(path))
    log.info("%r", data)
    return data
