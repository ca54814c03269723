"""Fetch a data file once: download from its standard source, check it, write it atomically.

Used by every dataset loader (images and UCI). The bytes go to a temporary file in the target's
folder; the file is renamed into place only after the whole body arrived (``Content-Length``
honoured), its checksums (``sha256``, ``md5``) match and the optional ``verify`` callback accepted
it. Offline, truncated, or on a mismatch, the error is one line naming the file, where it was
expected and the source, and no partial file is left behind.

A file already present is trusted only if its checksum matches (:func:`ensure_file`).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from nfvi.errors import NfviError
from nfvi.runs import new_file_mode

__all__ = ["DownloadError", "sha256_of", "md5_of", "ensure_file", "download"]

CHUNK = 1 << 20
log = logging.getLogger(__name__)


class DownloadError(NfviError):
    """A download failed (unreachable, HTTP error, truncated, checksum mismatch, rejected by ``verify``).

    ``reason`` is the short cause alone, so callers can build their own one-line message.
    """

    def __init__(self, message: str, url: str, path: Path, reason: str):
        super().__init__(message)
        self.url = url
        self.path = path
        self.reason = reason


def _hash_file(path: str | Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_of(path: str | Path) -> str:
    return _hash_file(path, "sha256")


def md5_of(path: str | Path) -> str:
    return _hash_file(path, "md5")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def download(
    url: str,
    path: str | Path,
    sha256: str | None = None,
    timeout: float = 60.0,
    *,
    md5: str | None = None,
    verify: Callable[[Path], None] | None = None,
) -> Path:
    """Download ``url`` to ``path`` through a temporary file; check it before the rename.

    ``sha256`` / ``md5``: expected hex digests of the downloaded bytes (either may be None).
    ``verify(tmp_path)``: an extra check on the complete temporary file (e.g. decode it and compare
    a checksum of the arrays); it raises to reject the file. Raises :class:`DownloadError`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def fail(reason: str, what: str) -> DownloadError:
        reason = _one_line(reason)
        return DownloadError(f"{what} ({reason}); nothing was written to {path}", url, path, reason)

    log.info("downloading %s -> %s", url, path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.fchmod(fd, new_file_mode())
    sha, md = hashlib.sha256(), hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out:
            n, expected_len = 0, None
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    expected_len = response.headers.get("Content-Length")
                    for block in iter(lambda: response.read(CHUNK), b""):
                        out.write(block)
                        sha.update(block)
                        md.update(block)
                        n += len(block)
            except http.client.IncompleteRead as exc:
                raise fail(
                    f"truncated: {len(exc.partial) + n} of {expected_len or '?'} bytes",
                    f"the download of {path.name} from {url} was cut short",
                ) from None
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise fail(
                    str(reason) or type(exc).__name__,
                    f"{path.name} is missing at {path} and could not be downloaded from {url}; put a copy there "
                    f"or set NFVI_DATA / paths.data_dir",
                ) from None
            if expected_len is not None and expected_len.isdigit() and n != int(expected_len):
                raise fail(
                    f"truncated: {n} of {expected_len} bytes", f"the download of {path.name} from {url} was cut short"
                )
        for name, want, got in (("sha256", sha256, sha.hexdigest()), ("md5", md5, md.hexdigest())):
            if want is not None and got != want.lower():
                raise fail(
                    f"{name} {got}, expected {want}",
                    f"checksum mismatch for {path.name} downloaded from {url}",
                )
        if verify is not None:
            try:
                verify(Path(tmp))
            except NfviError as exc:
                raise fail(str(exc), f"{path.name} downloaded from {url} was rejected") from None
            except Exception as exc:  # a decoder choking on a bad file: report it, not a traceback
                raise fail(
                    f"{type(exc).__name__}: {exc}", f"{path.name} downloaded from {url} is not a valid file"
                ) from None
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def ensure_file(
    path: str | Path,
    url: str | None,
    sha256: str | None,
    *,
    md5: str | None = None,
    verify: Callable[[Path], None] | None = None,
) -> Path:
    """Return ``path`` after making sure it exists with the right checksum (downloading if needed).

    A present file with a wrong checksum is an error (not silently replaced): the user may have
    put a different version there on purpose.
    """
    path = Path(path)
    if path.exists():
        for name, want, digest in (("sha256", sha256, sha256_of), ("md5", md5, md5_of)):
            if want is not None and (got := digest(path)) != want.lower():
                where = f"delete it to re-download from {url}" if url else "replace it with the right file"
                raise NfviError(f"{path} exists but its {name} is {got}, expected {want}; {where}")
        return path
    if url is None:
        raise NfviError(f"{path.name} is missing at {path} and has no public download source; put a copy there")
    return download(url, path, sha256, md5=md5, verify=verify)
