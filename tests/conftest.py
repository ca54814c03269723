"""Shared fixtures: the config roots in nfvi/conf/, a composed-config helper, a seeded float64 mode and a local HTTP
server for download tests, and :func:`table_cells` to read a Markdown table's cells."""

from __future__ import annotations

import http.server
import os
import re
import threading
from pathlib import Path

import pytest
import torch

from nfvi.config import hydra_version_base

REPO = Path(__file__).resolve().parents[1]
CONF_ROOT = REPO / "nfvi" / "conf"
#: nfvi train's config root (its dataset/, model/, experiment/ groups; the shared groups are on its search path)
CONF_DIR = CONF_ROOT / "train"
SHARED_DATA = Path(os.environ.get("NFVI_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def float64():
    """Run the test in float64 with a fixed seed; restore the default dtype afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield
    torch.set_default_dtype(old)


def compose(config_name: str, overrides: list[str] | None = None):
    """Compose ``nfvi/conf/<command>/<command>.yaml`` with ``overrides`` exactly as the CLI would (registers schemas).

    ``config_name`` is a command (its own root) or, for other names, a config under nfvi train's root."""
    import importlib

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from nfvi.cli import COMMANDS, conf_dir

    root = CONF_DIR
    if config_name in COMMANDS:
        importlib.import_module(COMMANDS[config_name][0])
        root = conf_dir(config_name)
    with initialize_config_dir(config_dir=str(root), **hydra_version_base()):
        return hydra_compose(config_name=config_name, overrides=overrides or [])


class _RouteHandler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, bytes, int | None]] = {}  # set per server by LocalHTTPServer

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path not in self.routes:
            self.send_error(404)
            return
        status, body, length = self.routes[self.path]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class LocalHTTPServer:
    """A threaded HTTP server on 127.0.0.1 (a free port) for download tests.

    ``routes`` maps a path such as ``"/a/b.bin"`` to (status, body, declared Content-Length or None = ``len(body)``);
    any other path gets a 404. Routes may be added while it runs. Use ``start()``/``stop()`` or ``with``.
    """

    def __init__(self, routes: dict[str, tuple[int, bytes, int | None]] | None = None):
        self.routes: dict[str, tuple[int, bytes, int | None]] = dict(routes or {})
        handler = type("Handler", (_RouteHandler,), {"routes": self.routes})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def url(self, path: str) -> str:
        """The URL of ``path`` (with or without its leading slash)."""
        return f"{self.base}/{path.lstrip('/')}"

    def add(self, path: str, body: bytes, *, status: int = 200, length: int | None = None) -> str:
        """Serve ``body`` at ``path`` with ``status`` and a declared Content-Length ``length``; returns its URL."""
        self.routes["/" + path.lstrip("/")] = (status, body, length)
        return self.url(path)

    def start(self) -> LocalHTTPServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() would wait forever for a loop that never started
            self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> LocalHTTPServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture
def http_server():
    """A started :class:`LocalHTTPServer` with no routes; shut down after the test."""
    with LocalHTTPServer() as server:
        yield server


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test (small tensors on a shared 2-core machine: faster and kinder)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def needs_cxx() -> None:
    """Skip the calling test where torch.compile cannot build its CPU kernels: no C++ compiler on PATH."""
    import shutil

    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("torch.compile on the CPU needs a C++ compiler")


def one_line_error(fn, *args, **kwargs) -> str:
    """Call ``fn``, which must raise :class:`~nfvi.errors.NfviError` with a one-line message; return the message."""
    from nfvi.errors import NfviError

    with pytest.raises(NfviError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def table_cells(markdown: str) -> str:
    """``markdown`` with each table row's padding removed (``"| a    |  1.0 |"`` -> ``"| a | 1.0 |"``, an empty cell
    as ``"|  |"``, rules as ``"|:---|---:|"``), so a test matches a report's cells, not tabulate's column widths."""
    out = []
    for line in markdown.splitlines():
        if line.startswith("|"):
            line = re.sub(r" *\| *", " | ", line).strip()
            if set(line) <= set("|:- "):
                line = re.sub("-+", "---", line.replace(" ", ""))
        out.append(line)
    return "\n".join(out)
