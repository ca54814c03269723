"""nfvi.runs: atomic writes (nothing half-written, ordinary permissions), metrics.csv, the NaN check."""

from __future__ import annotations

import os

import pytest

from nfvi.errors import NonFiniteLossError
from nfvi.runs import MetricsLog, atomic_write_bytes, atomic_write_text, check_finite, new_file_mode


def test_atomic_write_replaces_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "results.json"
    atomic_write_text(path, "first")
    atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_atomic_write_gives_the_permissions_of_an_ordinary_new_file(tmp_path):
    """mkstemp creates 0o600 files; results, tables and figures must be as readable as files open() makes."""
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    with open(tmp_path / "b.bin", "wb") as f:
        f.write(b"x")
    mode = (tmp_path / "a.bin").stat().st_mode & 0o777
    assert mode == (tmp_path / "b.bin").stat().st_mode & 0o777 == new_file_mode()


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    atomic_write_bytes(path, b"good")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"good" and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_metrics_log_keeps_its_header_and_truncates_on_resume(tmp_path):
    log = MetricsLog(tmp_path / "metrics.csv")
    for step in (1, 2, 3):
        log.log(step=step, loss=float(step))
    MetricsLog(tmp_path / "metrics.csv").truncate_after(2)
    again = MetricsLog(tmp_path / "metrics.csv")
    again.log(step=3, loss=9.0)
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines == ["step,loss", "1,1.0", "2,2.0", "3,9.0"]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_names_the_step(value):
    with pytest.raises(NonFiniteLossError, match="at step 7"):
        check_finite(value, 7)
    check_finite(1.0, 7)
