"""CIFAR-10 for the VAE experiments: ``dataset=cifar10``, ``dataset=cifar10_patches``, and ``dataset=fake_cifar10``.

Files under the data root (``paths.data_dir``), in torchvision's layout:

- ``cifar-10-batches-py/``: the extracted batches, read by ``torchvision.datasets.CIFAR10``, which
  checks the md5 of every batch file (and of ``batches.meta``) before reading;
- ``cifar-10-python.tar.gz``: the archive (md5 ``CIFAR10.tgz_md5``), used when the folder is missing.

When neither is there the archive is downloaded from the standard source (``sources.URLS["cifar10"]``,
torchvision's URL; the environment variable ``NFVI_CIFAR10_URL`` names a mirror instead) by
:func:`nfvi.download.ensure_file`: into a temporary file in the root, checked against torchvision's
md5, then renamed, so a partial download never looks complete. The archive is
extracted into a temporary folder in the root, checked by torchvision, and only then renamed to
``cifar-10-batches-py/``. Every failure is one line (:class:`~nfvi.errors.NfviError`) and leaves nothing.

``python -m nfvi.data.cifar [ROOT]`` makes sure the data are there (downloading if needed) and says
so in one line; exit status 0 when ready, 1 when not (``scripts/reproduce_cifar10.sh`` uses it).

Images come out as ``(N, 3, 32, 32)`` uint8 arrays (0..255, channel-major, the order of the batch files).
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

from nfvi.data import sources
from nfvi.download import DownloadError, ensure_file
from nfvi.errors import NfviError

__all__ = [
    "ARCHIVE",
    "FOLDER",
    "MIRROR_ENV",
    "cifar10_present",
    "ensure_cifar10",
    "read_cifar10",
    "random_patches",
    "fake_color_images",
    "main",
]


def _cifar_class():
    from torchvision.datasets import CIFAR10

    return CIFAR10


ARCHIVE, FOLDER = "cifar-10-python.tar.gz", "cifar-10-batches-py"  # torchvision's CIFAR10.filename, .base_folder
MIRROR_ENV = "NFVI_CIFAR10_URL"  # a mirror of cifar-10-python.tar.gz (same md5)


def _bad_files(folder: Path) -> list[str]:
    """Names of the batch files (and batches.meta) under ``folder`` that are missing or fail torchvision's md5."""
    from torchvision.datasets.utils import check_integrity

    cls = _cifar_class()
    files = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]
    return [name for name, md5 in files if not check_integrity(str(folder / name), md5)]


def cifar10_present(root: str | Path) -> bool:
    """True when the extracted folder or the archive is in ``root`` (no check, no network)."""
    root = Path(root).expanduser()
    return (root / FOLDER).is_dir() or (root / ARCHIVE).is_file()


def _extract(archive: Path, root: Path) -> None:
    """Extract ``archive`` into a temporary folder in ``root``, check it, rename its folder into place."""
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{FOLDER}."))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                try:
                    tar.extractall(tmp, filter="data")
                except TypeError:  # Python without extraction filters
                    tar.extractall(tmp)  # noqa: S202
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise NfviError(
                f"{archive} cannot be extracted ({' '.join(str(exc).split()) or type(exc).__name__}); "
                f"delete it to download it again (nothing was written)"
            ) from None
        bad = _bad_files(tmp / FOLDER)
        if bad:
            raise NfviError(
                f"{archive} does not hold a valid {FOLDER}/ ({', '.join(bad)} missing or failing torchvision's md5 "
                f"check); delete it to download it again (nothing was written)"
            )
        try:
            os.rename(tmp / FOLDER, root / FOLDER)
        except OSError:
            if not (root / FOLDER).is_dir():  # lost a race with another process only if the folder is now there
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_cifar10(root: str | Path) -> Path:
    """The checked ``cifar-10-batches-py/`` folder under ``root``, downloading and extracting it if needed."""
    root = Path(root).expanduser()
    folder = root / FOLDER
    if folder.is_dir():
        bad = _bad_files(folder)
        if bad:
            raise NfviError(
                f"{folder} is incomplete or corrupted ({', '.join(bad)} missing or failing torchvision's md5 check); "
                f"delete it to extract or download it again"
            )
        return folder
    cls = _cifar_class()
    archive = root / ARCHIVE
    root.mkdir(parents=True, exist_ok=True)
    url = os.environ.get(MIRROR_ENV) or sources.URLS["cifar10"][ARCHIVE]
    try:
        ensure_file(archive, url, None, md5=cls.tgz_md5)
    except DownloadError as exc:
        raise NfviError(
            f"CIFAR-10 is not in {root} ({FOLDER}/ or {ARCHIVE}); fetching {ARCHIVE} from {exc.url} failed: "
            f"{exc.reason}; put a copy there or set NFVI_DATA / paths.data_dir (nothing was written)"
        ) from None
    _extract(archive, root)
    return folder


def read_cifar10(root: str | Path) -> tuple[np.ndarray, np.ndarray, str]:
    """``(train (50000, 3, 32, 32), test (10000, 3, 32, 32), source)`` uint8, via torchvision's loader."""
    folder = ensure_cifar10(root)
    cls = _cifar_class()
    out = []
    for train in (True, False):
        try:
            data = cls(str(folder.parent), train=train, download=False).data  # (N, 32, 32, 3) HWC
        except (RuntimeError, OSError, ValueError, EOFError) as exc:
            raise NfviError(f"{folder} cannot be read by torchvision ({' '.join(str(exc).split())})") from None
        out.append(np.ascontiguousarray(np.asarray(data, dtype=np.uint8).transpose(0, 3, 1, 2)))
    return out[0], out[1], str(folder)


def random_patches(images: np.ndarray, size: int, per_image: int, generator: torch.Generator) -> np.ndarray:
    """``per_image`` random ``size x size`` crops of each image ``(N, C, H, W)``: ``(N * per_image, C, size, size)``.

    Crop corners are uniform over all positions, drawn from ``generator``; the crops of image ``i``
    are rows ``i * per_image ... (i + 1) * per_image - 1``.
    """
    n, c, height, width = images.shape
    if not 0 < size <= min(height, width):
        raise NfviError(f"dataset.patch_size={size} is not allowed; use a whole number in [1, {min(height, width)}]")
    rows = torch.randint(0, height - size + 1, (n, per_image), generator=generator).numpy()
    cols = torch.randint(0, width - size + 1, (n, per_image), generator=generator).numpy()
    offsets = np.arange(size)
    idx = np.arange(n)[:, None, None, None, None]
    ch = np.arange(c)[None, None, :, None, None]
    r = (rows[:, :, None, None, None] + offsets[None, None, None, :, None]).astype(np.intp)
    q = (cols[:, :, None, None, None] + offsets[None, None, None, None, :]).astype(np.intp)
    return np.ascontiguousarray(images[idx, ch, r, q].reshape(n * per_image, c, size, size))


def fake_color_images(n: int, generator: torch.Generator, side: int = 32) -> torch.Tensor:
    """``n`` generated ``(3, side, side)`` uint8 images: a colour gradient and 1-3 soft coloured blobs.

    Seeded by ``generator``; there is smooth spatial and colour structure for a VAE to learn
    (for ``dataset=fake_cifar10``, tests and offline smoke runs; not CIFAR-10).
    """
    g = generator
    ticks = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    yy, xx = ticks[:, None].expand(side, side), ticks[None, :].expand(side, side)
    base = torch.rand(n, 3, 1, 1, generator=g)
    slope = (torch.rand(n, 3, 2, generator=g) - 0.5) * 0.6
    img = base + slope[..., 0, None, None] * (xx - 0.5) + slope[..., 1, None, None] * (yy - 0.5)
    count = torch.randint(1, 4, (n,), generator=g)
    for k in range(3):
        centre = torch.rand(n, 2, 1, 1, generator=g)
        radius = 0.08 + 0.2 * torch.rand(n, 1, 1, generator=g)
        colour = torch.rand(n, 3, 1, 1, generator=g)
        d2 = (xx - centre[:, 0]).square() + (yy - centre[:, 1]).square()
        alpha = torch.exp(-d2 / (2 * radius.square()))[:, None] * (count > k).float()[:, None, None, None]
        img = img * (1 - alpha) + colour * alpha
    noise = torch.rand(img.shape, generator=g) - 0.5
    return (img * 255 + noise * 6).round_().clamp_(0, 255).to(torch.uint8)


def main(argv: list[str] | None = None) -> int:
    """``python -m nfvi.data.cifar [ROOT]``: make CIFAR-10 ready under ROOT (default ``$NFVI_DATA`` or ``./data``)."""
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0] if argv else os.environ.get("NFVI_DATA", "./data")).expanduser()
    try:
        folder = ensure_cifar10(root)
    except NfviError as exc:
        print(str(exc))
        return 1
    print(f"CIFAR-10 is ready in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
