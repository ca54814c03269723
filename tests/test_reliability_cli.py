"""A task runs once, and every failure ends in one line, ``error.txt`` and a non-zero exit (``nfvi.cli``).

The failing tasks here stand in for a command's task: ``COMMANDS["energy"]`` is pointed at a function of this module
(the energy config composes fast and needs no data), either in-process or in a child process.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import hydra
import pytest
from omegaconf import OmegaConf

import nfvi.cli
import nfvi.energy.task  # noqa: F401  (registers the energy and paths schemas)
from nfvi.errors import NfviError
from nfvi.hydra_callbacks import SweepFailures
from nfvi.runs import run_dir
from tests.conftest import REPO

CALLS: list[str] = []
QUIET = ["hydra/job_logging=none", "hydra/hydra_logging=none"]


def boom(cfg):
    """An unexpected failure after writing a file of its own."""
    CALLS.append(cfg.target)
    (run_dir() / "partial.csv").write_text("step\n1\n")
    raise RuntimeError("boom\nsecond line")


def refuse(cfg):
    """A user error before anything of its own was written (a bad value, a missing data file)."""
    CALLS.append(cfg.target)
    raise NfviError("target=U1 is refused here")


def fail_on_u2(cfg):
    """A sweep job that fails for target=U2 only."""
    CALLS.append(cfg.target)
    if cfg.target == "U2":
        raise ValueError("U2 job failed")
    (run_dir() / "done.txt").write_text("ok\n")


def disk_full(cfg):
    CALLS.append(cfg.target)
    raise OSError(errno.ENOSPC, "No space left on device", str(run_dir() / "model.pt"))


@pytest.fixture
def fake_energy(monkeypatch, tmp_path):
    """``run(name, *overrides)``: ``nfvi energy`` running the task ``name`` of this module in-process; exit code."""
    CALLS.clear()
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() sets sys.argv for Hydra

    def run(name: str, *overrides: str) -> int:
        monkeypatch.setitem(nfvi.cli.COMMANDS, "energy", (__name__, name, "a failing stand-in"))
        with pytest.raises(SystemExit) as info:
            nfvi.cli.main(["energy", *overrides, f"paths.output_dir={tmp_path / 'out'}", *QUIET])
            raise SystemExit(0)
        return info.value.code

    return run


def run_folders(tmp_path, command="energy"):
    return sorted(p for p in (tmp_path / "out" / command).glob("*") if p.is_dir())


def stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_unexpected_error_runs_once_one_line_and_error_txt(fake_energy, tmp_path, capsys):
    assert fake_energy("boom") == 1
    assert len(CALLS) == 1  # never started again
    (folder,) = run_folders(tmp_path)
    error = (folder / "error.txt").read_text()
    line = f"nfvi energy: error: RuntimeError: boom (traceback saved in {folder / 'error.txt'})"
    assert stderr_lines(capsys) == [line]
    assert error.startswith(line + "\nTraceback (most recent call last):\n") and error.count("Traceback") == 1
    assert error.rstrip().endswith("RuntimeError: boom\nsecond line")
    assert (folder / "partial.csv").exists()  # what the run wrote is kept


def test_user_error_before_writing_leaves_nothing_behind(fake_energy, tmp_path, capsys):
    assert fake_energy("refuse") == 2
    assert len(CALLS) == 1
    assert stderr_lines(capsys) == ["nfvi energy: error: target=U1 is refused here"]
    assert not (tmp_path / "out" / "energy").exists()  # the run folder and the empty folder above it


def test_user_error_in_a_reused_folder_keeps_it(fake_energy, tmp_path, capsys):
    folder = tmp_path / "out" / "kept"
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text("step\n")  # an earlier run's files
    assert fake_energy("refuse", f"hydra.run.dir={folder}") == 2
    assert (folder / "metrics.csv").exists()
    assert (folder / "error.txt").read_text().startswith("nfvi energy: error: target=U1 is refused here\nTraceback")


def test_full_disk_error_is_not_hidden(fake_energy, tmp_path, capsys, monkeypatch):
    def no_space(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("nfvi.runs.atomic_write_text", no_space)
    assert fake_energy("disk_full") == 1
    assert len(CALLS) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("nfvi energy: error: OSError: [Errno 28] No space left on device") and "model.pt" in last
    assert "could not save" in last and "Traceback" in err  # the traceback went to the console instead


def test_sweep_runs_each_job_once_and_reports_the_failed_one(fake_energy, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    args = ["-m", "target=U1,U2", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}"]
    assert fake_energy("fail_on_u2", *args) == 1
    assert sorted(CALLS) == ["U1", "U2"]  # each job once, the sweep once
    ok, bad = sweep / "0", sweep / "1"
    assert (ok / "done.txt").exists() and not (ok / "error.txt").exists()
    assert (bad / "error.txt").read_text().count("ValueError: U2 job failed") == 2  # the one line, the traceback
    err = capsys.readouterr().err
    assert "nfvi energy: error: job 1: ValueError: U2 job failed\n" in err  # the summary names the job folder
    assert "nfvi energy: error: 1 job(s) of the sweep failed" in err
    assert SweepFailures.failed and len(SweepFailures.failed) == 1


def test_composition_error_is_one_line_exit_2_and_restores_hydra_full_error(fake_energy, tmp_path, capsys):
    assert "HYDRA_FULL_ERROR" not in os.environ
    assert fake_energy("boom", "paths=nope") == 2
    assert CALLS == [] and "HYDRA_FULL_ERROR" not in os.environ
    (line,) = stderr_lines(capsys)
    assert line.startswith("nfvi energy: error: In 'energy': Could not find 'paths/nope'")
    assert not (tmp_path / "out").exists()


def test_sweep_failures_ignores_the_failures_of_an_earlier_sweep(tmp_path, capsys):
    import json

    records = tmp_path / ".nfvi_failures"
    records.mkdir()
    (records / "0.json").write_text(json.dumps({"folder": str(tmp_path / "0_a=1"), "error": "old failure"}))
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}, "job": {"name": "energy"}}})
    callback = SweepFailures()
    callback.on_multirun_start(config)
    (records / "1.json").write_text(json.dumps({"folder": str(tmp_path / "1_a=2"), "error": "new failure"}))
    callback.on_multirun_end(config)
    assert SweepFailures.failed == ["nfvi energy: error: job 1_a=2: new failure"]
    assert "old failure" not in capsys.readouterr().err


def test_supported_hydra_range():
    """The one-line composition errors rely on ``HYDRA_FULL_ERROR=1`` re-raising out of ``hydra.main``: so on 1.3.x
    and on 1.4 (the suite passes on 1.4.0rc3, docs/usage.md#supported-versions), pyproject.toml's pin."""
    from packaging.version import Version

    assert Version("1.3.2") <= Version(hydra.__version__) < Version("1.5"), hydra.__version__


def child(task: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``nfvi energy ...`` in a fresh process with ``COMMANDS["energy"]`` pointing at ``task`` of this module."""
    code = (
        "import sys, nfvi.cli as c; "
        f"c.COMMANDS['energy'] = ('tests.test_reliability_cli', {task!r}, ''); c.main(sys.argv[1:])"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code, "energy", *QUIET, *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_unexpected_error_in_a_process_exits_1_with_one_line(tmp_path):
    result = child("boom", f"paths.output_dir={tmp_path}")
    assert result.returncode == 1
    (folder,) = (tmp_path / "energy").iterdir()
    assert result.stderr.strip().splitlines() == [
        f"nfvi energy: error: RuntimeError: boom (traceback saved in {folder / 'error.txt'})"
    ]
    assert (folder / "error.txt").read_text().count("Traceback") == 1


def test_hydra_full_error_still_shows_the_traceback(tmp_path):
    result = child("boom", f"paths.output_dir={tmp_path}", env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "RuntimeError: boom" in result.stderr
    assert len(list((tmp_path / "energy").iterdir())) == 1  # still one run


def test_train_failure_makes_one_run_folder_and_one_line(tmp_path):
    """``seed=-5`` once crashed in numpy's seeding and the task ran twice (two folders, two tracebacks)."""
    result = subprocess.run(
        [sys.executable, "-m", "nfvi", "train", "dataset=fake", "trainer.steps=5", "seed=-5"]
        + [f"paths.output_dir={tmp_path}", "hydra/job_logging=none", "hydra/hydra_logging=none"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode in (1, 2)  # unexpected today; a user error once seeds are validated
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nfvi train: error:") and "Traceback" not in result.stderr
    folders = list((tmp_path / "train").glob("*")) if (tmp_path / "train").exists() else []
    assert len(folders) == (1 if result.returncode == 1 else 0)
    if folders:
        assert (folders[0] / "error.txt").read_text().count("Traceback") == 1
