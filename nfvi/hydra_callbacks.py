"""Hydra callbacks of the ``nfvi`` commands (``hydra.callbacks`` in ``nfvi/conf/shared/hydra_defaults.yaml``).

:class:`SweepFailures` surfaces the jobs of a sweep that failed, on every launcher: jobs under joblib or submitit
run in other processes, so each failed job records its one-line error in ``<sweep dir>/.nfvi_failures/`` (wherever
its own folder lies, e.g. ``hydra.sweep.subdir=../out_${hydra.job.num}``), and the callback, which runs in the
launching process once the sweep is done, reads them back.

:class:`RunFolder` notes which folders a single run's launch creates, so that only the process that created a run
folder removes it again (:func:`nfvi.cli._job`: a user error before the run wrote anything).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from nfvi.runs import ERROR_FILE, atomic_write_text

__all__ = ["FAILURES", "RunFolder", "SweepFailures", "error_files", "failure_records", "record_failure"]

#: the folder of a sweep (``hydra.sweep.dir``) where each failed job leaves ``<job num>.json``
FAILURES = ".nfvi_failures"


def error_files(sweep_dir: Path) -> dict[Path, int]:
    """Every ``error.txt`` below ``sweep_dir`` -> its modification time in ns."""
    return {path: path.stat().st_mtime_ns for path in sorted(sweep_dir.rglob(ERROR_FILE))}


def failure_records(sweep_dir: Path) -> dict[Path, int]:
    """Every failure record of the sweep in ``sweep_dir`` (:func:`record_failure`) -> its modification time in ns."""
    folder = Path(sweep_dir) / FAILURES
    return {path: path.stat().st_mtime_ns for path in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def record_failure(job_folder: Path, error: str, *, sweep_dir=None, num=None, command=None) -> None:
    """Record a failed sweep job: ``{"folder", "error"}`` in ``<hydra.sweep.dir>/.nfvi_failures/<hydra.job.num>.json``.

    Run in the job's process (the sweep folder, job number and command from Hydra's config), or by a launcher for a
    job that could not record itself (``sweep_dir``, ``num``, ``command`` given: e.g. a SLURM job killed hard).
    """
    if sweep_dir is None or num is None or command is None:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        sweep_dir, num, command = hydra_cfg.sweep.dir, hydra_cfg.job.num, hydra_cfg.job.name
    path = Path(str(sweep_dir)) / FAILURES / f"{num}.json"
    record = {"folder": os.path.abspath(job_folder), "error": error}
    try:
        atomic_write_text(path, json.dumps(record) + "\n")
    except OSError as exc:  # the job's own line is on stderr already; the sweep may then miss it
        print(f"nfvi {command}: warning: cannot record the failed job in {path}: {exc}", file=sys.stderr)


class SweepFailures(Callback):
    """After a sweep, print each failed job's one-line error and a summary on stderr; ``nfvi`` then exits 1.

    A job counts as failed in this sweep if its record (:func:`record_failure`) is new or was rewritten since the
    sweep started (a sweep folder may be reused, e.g. with ``resume=true``). :attr:`failed` lists those one-line
    errors, each naming its job folder (relative to the sweep folder).
    """

    #: One-line errors of the failed jobs of the last sweep in this process (read by :func:`nfvi.cli.main`).
    failed: list[str] = []

    def __init__(self) -> None:
        self.before: dict[Path, int] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SweepFailures.failed = []
        self.before = failure_records(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        prefix = f"nfvi {config.hydra.job.name}: error: "
        failed = [path for path, mtime in failure_records(sweep_dir).items() if self.before.get(path) != mtime]
        lines = []
        for path in sorted(failed, key=lambda p: (len(p.stem), p.stem)):
            try:
                record = json.loads(path.read_text())
                folder, error = Path(record["folder"]), str(record["error"])
            except (OSError, ValueError, TypeError, KeyError):
                folder, error = path, "failed (its record cannot be read)"
            where = os.path.relpath(folder, sweep_dir.resolve()) if folder.is_absolute() else str(folder)
            lines.append(f"{prefix}job {where}: {error}")
        SweepFailures.failed = lines
        if lines:
            print(*lines, sep="\n", file=sys.stderr)
            print(f"{prefix}{len(lines)} job(s) of the sweep failed (error.txt in the folder of each that ran)",
                  file=sys.stderr)  # fmt: skip


class RunFolder(Callback):
    """Before a single run, create its folder (``hydra.run.dir``) and the missing folders above it, noting in
    :attr:`created` those this process made (another process may make the same folder at the same instant: only
    one ``mkdir`` succeeds). Hydra then finds the folder made."""

    #: the folders the current launch created, outermost first (reset by :func:`nfvi.cli.main`)
    created: list[Path] = []

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        RunFolder.created = []
        folder = OmegaConf.select(config, "hydra.run.dir")
        if folder is None:
            return
        folder = Path(os.path.abspath(str(folder)))
        missing = [p for p in [*reversed(folder.parents), folder] if not p.exists()]
        for path in missing:
            try:
                path.mkdir()
            except FileExistsError:
                continue
            except OSError:
                return  # Hydra's own mkdir reports it
            RunFolder.created.append(path)
