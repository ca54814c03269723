"""nfvi.download against a local HTTP server on 127.0.0.1: good, corrupted, truncated, missing, offline."""

from __future__ import annotations

import hashlib
import socket

import pytest

from nfvi.download import DownloadError, download, ensure_file, md5_of, sha256_of
from nfvi.errors import NfviError

BODY = bytes(range(256)) * 40


def closed_port_url(name: str = "file.bin") -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def test_download_good_file(http_server, tmp_path):
    url = http_server.add("/good.bin", BODY)
    out = download(url, tmp_path / "sub" / "good.bin", hashlib.sha256(BODY).hexdigest())
    assert out.read_bytes() == BODY
    assert sorted(p.name for p in out.parent.iterdir()) == ["good.bin"]  # no temporary file left
    assert sha256_of(out) == hashlib.sha256(BODY).hexdigest() and md5_of(out) == hashlib.md5(BODY).hexdigest()


def _reject(path):
    raise ValueError("cannot decode")


@pytest.mark.parametrize(
    "route, kwargs, fragment",
    [
        ((200, BODY[:-1] + b"x", None), {"sha256": hashlib.sha256(BODY).hexdigest()}, "checksum mismatch"),
        ((200, BODY, None), {"md5": "0" * 32}, "md5"),
        ((200, BODY[:1000], len(BODY)), {}, "truncated: 1000 of 10240 bytes"),
        ((404, b"nope", None), {}, "Not Found"),
        ((200, BODY, None), {"verify": _reject}, "ValueError: cannot decode"),
    ],
    ids=["corrupted", "md5-mismatch", "truncated", "http-404", "verify-rejects"],
)
def test_download_failures_leave_nothing(http_server, tmp_path, route, kwargs, fragment):
    http_server.routes["/f.bin"] = route  # (status, body, declared length)
    url = http_server.url("/f.bin")
    target = tmp_path / "f.bin"
    with pytest.raises(DownloadError) as info:
        download(url, target, **kwargs)
    message = str(info.value)
    assert "\n" not in message and fragment in message
    assert "f.bin" in message and url in message and str(target) in message
    assert list(tmp_path.iterdir()) == []  # neither the file nor a partial one


def test_download_offline_names_file_location_and_source(tmp_path):
    url = closed_port_url("mnist.npz")
    target = tmp_path / "mnist.npz"
    with pytest.raises(NfviError) as info:
        download(url, target)
    message = str(info.value)
    assert "\n" not in message
    assert "mnist.npz" in message and str(target) in message and url in message
    assert info.value.reason and info.value.url == url
    assert list(tmp_path.iterdir()) == []


def test_ensure_file_trusts_a_present_file_with_the_right_checksum(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(BODY)
    # the URL is unreachable: a present, correct file must not trigger any download
    assert ensure_file(path, closed_port_url(), hashlib.sha256(BODY).hexdigest()) == path
    assert ensure_file(path, None, None, md5=hashlib.md5(BODY).hexdigest()) == path


@pytest.mark.parametrize("algorithm", ["sha256", "md5"])
def test_ensure_file_rejects_a_present_file_with_a_wrong_checksum(tmp_path, algorithm):
    path = tmp_path / "data.bin"
    path.write_bytes(BODY)
    wrong = "0" * (64 if algorithm == "sha256" else 32)
    kwargs = {"sha256": wrong} if algorithm == "sha256" else {"sha256": None, "md5": wrong}
    with pytest.raises(NfviError, match=f"its {algorithm} is .* expected 0+; delete it"):
        ensure_file(path, "http://127.0.0.1:9/x", **kwargs)
    assert path.read_bytes() == BODY  # left alone


def test_ensure_file_downloads_a_missing_file(http_server, tmp_path):
    url = http_server.add("/d.bin", BODY)
    path = ensure_file(tmp_path / "d.bin", url, hashlib.sha256(BODY).hexdigest())
    assert path.read_bytes() == BODY


def test_ensure_file_without_source(tmp_path):
    with pytest.raises(NfviError, match="no public download source"):
        ensure_file(tmp_path / "x.bin", None, None)
