"""Fetch a data file once: download from its standard source, check its sha256, write atomically.

Used by every dataset loader (images and UCI). A file already present is trusted only if its
checksum matches; offline, or on a mismatch, the error is one line naming the file, where it was
expected and the source, and no partial file is left behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from nfvi.errors import NfviError

__all__ = ["sha256_of", "ensure_file", "download"]

CHUNK = 1 << 20


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, path: str | Path, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``path`` through a temporary file; verify ``sha256`` before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    expected_len = response.headers.get("Content-Length")
                    n = 0
                    for block in iter(lambda: response.read(CHUNK), b""):
                        out.write(block)
                        digest.update(block)
                        n += len(block)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                raise NfviError(
                    f"{path.name} is missing at {path} and could not be downloaded from {url} ({reason}); "
                    f"put a copy there or set NFVI_DATA / paths.data_dir"
                ) from None
            if expected_len is not None and n != int(expected_len):
                raise NfviError(f"download of {path.name} from {url} was truncated ({n} of {expected_len} bytes)")
        if sha256 is not None and digest.hexdigest() != sha256:
            raise NfviError(
                f"checksum mismatch for {path.name} downloaded from {url}: sha256 {digest.hexdigest()}, "
                f"expected {sha256}; nothing was written to {path}"
            )
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def ensure_file(path: str | Path, url: str | None, sha256: str | None) -> Path:
    """Return ``path`` after making sure it exists with the right checksum (downloading if needed).

    A present file with a wrong checksum is an error (not silently replaced): the user may have
    put a different version there on purpose.
    """
    path = Path(path)
    if path.exists():
        if sha256 is not None and sha256_of(path) != sha256:
            raise NfviError(
                f"{path} exists but its sha256 is {sha256_of(path)}, expected {sha256}; "
                f"delete it to re-download from {url}" if url else f"{path} has the wrong sha256; expected {sha256}"
            )
        return path
    if url is None:
        raise NfviError(f"{path.name} is missing at {path} and has no public download source; put a copy there")
    return download(url, path, sha256)
