"""Hydra callbacks of the ``nfvi`` commands (``hydra.callbacks`` in ``nfvi/conf/shared/hydra_defaults.yaml``).

:class:`SweepFailures` surfaces the jobs of a sweep that failed, on every launcher: jobs under joblib or submitit
run in other processes, so each failed job leaves ``error.txt`` (its one-line error, then the traceback) in its
folder, and the callback, which runs in the launching process once the sweep is done, reads them back.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from nfvi.runs import ERROR_FILE

__all__ = ["SweepFailures", "error_files"]


def error_files(sweep_dir: Path) -> dict[Path, int]:
    """Every ``error.txt`` below ``sweep_dir`` -> its modification time in ns."""
    return {path: path.stat().st_mtime_ns for path in sorted(sweep_dir.rglob(ERROR_FILE))}


class SweepFailures(Callback):
    """After a sweep, print each failed job's one-line error and a summary on stderr; ``nfvi`` then exits 1.

    A job counts as failed in this sweep if its ``error.txt`` is new or was rewritten since the sweep started
    (a sweep folder may be reused, e.g. with ``resume=true``). :attr:`failed` lists those one-line errors,
    each naming its job folder (relative to the sweep folder).
    """

    #: One-line errors of the failed jobs of the last sweep in this process (read by :func:`nfvi.cli.main`).
    failed: list[str] = []

    def __init__(self) -> None:
        self.before: dict[Path, int] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SweepFailures.failed = []
        self.before = error_files(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        prefix = f"nfvi {config.hydra.job.name}: error: "
        failed = [path for path, mtime in error_files(sweep_dir).items() if self.before.get(path) != mtime]
        lines = []
        for path in failed:
            line = next(iter(path.read_text().splitlines()), "").removeprefix(prefix)
            line = line.removesuffix(f" (traceback saved in {path})")
            lines.append(f"{prefix}job {path.parent.relative_to(sweep_dir)}: {line}")
        SweepFailures.failed = lines
        if lines:
            print(*lines, sep="\n", file=sys.stderr)
            print(f"{prefix}{len(lines)} job(s) of the sweep failed (error.txt in each job's folder)", file=sys.stderr)
