"""A small reader for numeric arrays in MATLAB level-5 MAT-files (v5/v6/v7, zlib-compressed or not).

Enough to read Burda et al.'s ``chardata.mat`` without SciPy: numeric and logical matrices are
returned as NumPy arrays in MATLAB's (column-major) layout; cells, structs, chars, sparse and object
arrays are skipped. ``scipy.io.loadmat`` is not needed, and v7.3 files (HDF5) are not supported.
Format: "MAT-File Format", MathWorks, Level 5 (128-byte header, tagged data elements).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from nfvi.errors import NfviError

__all__ = ["read_mat"]

# data types of data elements (miINT8 ... miUTF32)
MI_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
MI_MATRIX, MI_COMPRESSED = 14, 15
# array classes (mxDOUBLE_CLASS ... mxUINT64_CLASS) and the NumPy dtype each becomes
MX_DTYPES = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}
LOGICAL_FLAG, COMPLEX_FLAG = 0x200, 0x800


class _Reader:
    def __init__(self, buf: bytes | memoryview, endian: str, where: str):
        self.buf, self.pos, self.endian, self.where = memoryview(buf), 0, endian, where

    def error(self, what: str) -> NfviError:
        return NfviError(f"{self.where} is not a readable MAT-file: {what}")

    def tag(self) -> tuple[int, int, int]:
        """(type, nbytes, start of data); handles the small-element format (data in the tag's second word)."""
        if self.pos + 8 > len(self.buf):
            raise self.error(f"truncated data element at byte {self.pos}")
        first = int(np.frombuffer(self.buf[self.pos : self.pos + 4], self.endian + "u4")[0])
        if first >> 16:  # small data element: nbytes in the high half, type in the low half
            return first & 0xFFFF, first >> 16, self.pos + 4
        nbytes = int(np.frombuffer(self.buf[self.pos + 4 : self.pos + 8], self.endian + "u4")[0])
        return first, nbytes, self.pos + 8

    def element(self) -> tuple[int, memoryview]:
        """Read one (sub)element at ``pos``: its type and its bytes; ``pos`` moves to the next (8-aligned)."""
        mtype, nbytes, start = self.tag()
        end = start + nbytes
        if end > len(self.buf):
            raise self.error(f"data element at byte {self.pos} runs past the end")
        self.pos = self.pos + 8 if start == self.pos + 4 else start + nbytes + (-nbytes % 8)
        return mtype, self.buf[start:end]

    def numeric(self) -> np.ndarray:
        mtype, data = self.element()
        if mtype not in MI_DTYPES:
            raise self.error(f"unsupported numeric data type {mtype}")
        return np.frombuffer(data, self.endian + MI_DTYPES[mtype])


def _matrix(body: memoryview, endian: str, where: str, wanted) -> tuple[str, np.ndarray | None]:
    """Parse the contents of a miMATRIX element; returns (name, array or None when skipped)."""
    if len(body) == 0:
        return "", None
    r = _Reader(body, endian, where)
    flags = r.numeric()
    word = int(flags[0])
    mx_class, is_complex, is_logical = word & 0xFF, bool(word & COMPLEX_FLAG), bool(word & LOGICAL_FLAG)
    dims = tuple(int(d) for d in r.numeric())
    _, raw_name = r.element()
    name = bytes(raw_name).decode("ascii", "replace")
    if mx_class not in MX_DTYPES or (wanted is not None and name not in wanted):
        return name, None
    real = r.numeric().astype(MX_DTYPES[mx_class])  # MATLAB may store e.g. a double array as uint8
    if real.size != int(np.prod(dims)):
        raise r.error(f"variable {name!r} has {real.size} values for dimensions {dims}")
    array = real.reshape(dims, order="F")
    if is_complex:
        array = array + 1j * r.numeric().astype(MX_DTYPES[mx_class]).reshape(dims, order="F")
    return name, array.astype(bool) if is_logical else array


def read_mat(path: str | Path, names: list[str] | tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Numeric variables of a level-5 MAT-file, as ``{name: array}`` (only ``names`` if given).

    Arrays keep MATLAB's shape (2-D at least) and class (double -> float64). Raises a one-line
    :class:`NfviError` for files that are not level-5 MAT-files (v4, v7.3/HDF5) or are damaged.
    """
    path = Path(path)
    data = path.read_bytes()
    where = str(path)
    if len(data) < 128:
        raise NfviError(f"{where} is not a readable MAT-file: only {len(data)} bytes")
    header = data[:116].decode("latin-1")
    if header.startswith("MATLAB 7.3") or data[:8] == b"\x89HDF\r\n\x1a\n" or data[512:520] == b"\x89HDF\r\n\x1a\n":
        raise NfviError(f"{where} is a MATLAB v7.3 (HDF5) file; save it with -v7 (or -v6) to read it here")
    endian = {b"IM": "<", b"MI": ">"}.get(data[126:128])
    if not header.startswith("MATLAB 5.0") or endian is None:
        raise NfviError(f"{where} is not a level-5 MAT-file (header {header[:20]!r})")
    wanted = None if names is None else set(names)
    out: dict[str, np.ndarray] = {}
    top = _Reader(memoryview(data)[128:], endian, where)
    while top.pos < len(top.buf) and (wanted is None or wanted - set(out)):
        mtype, nbytes, start = top.tag()
        body = top.buf[start : start + nbytes]
        if len(body) < nbytes:
            raise top.error(f"variable at byte {128 + top.pos} runs past the end")
        if mtype == MI_COMPRESSED:
            top.pos = start + nbytes  # compressed elements are not padded
            try:
                inner = zlib.decompress(body)
            except zlib.error as exc:
                raise top.error(f"bad compressed variable at byte {128 + start - 8} ({exc})") from None
            r = _Reader(inner, endian, where)
            mtype, body = r.element()
        else:
            top.pos = start + nbytes + (-nbytes % 8)
        if mtype != MI_MATRIX:
            continue
        name, array = _matrix(body, endian, where, wanted)
        if array is not None:
            out[name] = array
    return out
