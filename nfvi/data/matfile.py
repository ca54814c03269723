"""Numeric arrays of MATLAB MAT-files (level 5: v5/v6/v7), read by ``scipy.io.loadmat``.

Used for Burda et al.'s ``chardata.mat`` (Omniglot). Numeric and logical matrices are returned as NumPy arrays in
MATLAB's shape (2-D at least) and class; chars, cells, structs and sparse arrays are left out. v7.3 files (HDF5)
and damaged files end in a one-line :class:`~nfvi.errors.NfviError`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nfvi.errors import NfviError

__all__ = ["read_mat"]

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def read_mat(path: str | Path, names: list[str] | tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Numeric variables of a level-5 MAT-file, as ``{name: array}`` (only ``names`` if given).

    Arrays keep MATLAB's shape (2-D at least) and class (double -> float64, logical -> bool), whatever type they
    were stored in. Raises a one-line :class:`NfviError` for files that are not level-5 MAT-files (v4, v7.3/HDF5)
    or are damaged.
    """
    import scipy.io
    from scipy.io.matlab import MatReadError

    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(528)
    if len(head) < 128:
        raise NfviError(f"{path} is not a readable MAT-file: only {len(head)} bytes")
    if head.startswith(b"MATLAB 7.3") or HDF5_SIGNATURE in (head[:8], head[512:520]):
        raise NfviError(f"{path} is a MATLAB v7.3 (HDF5) file; save it with -v7 (or -v6) to read it here")
    if not head.startswith(b"MATLAB 5.0") or head[126:128] not in (b"IM", b"MI"):
        raise NfviError(f"{path} is not a level-5 MAT-file (header {head[:20].decode('latin-1')!r})")
    try:
        raw = scipy.io.loadmat(path, variable_names=None if names is None else list(names), mat_dtype=True)
    except (MatReadError, ValueError, TypeError, OSError, EOFError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise NfviError(f"{path} is a damaged MAT-file: {reason}") from None
    return {
        name: value.astype(value.dtype.newbyteorder("="), copy=False)  # native byte order (torch needs it)
        for name, value in raw.items()
        if not name.startswith("__") and isinstance(value, np.ndarray) and value.dtype.kind in "biuf"
    }
