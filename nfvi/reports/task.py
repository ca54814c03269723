"""``nfvi report``: read every ``results.json`` under ``outputs/`` into tables and figures.

Each run's ``results.json`` carries a ``task`` field (``energy``, ``vae``, ``cde``). The rows of
each task go to its writer, ``nfvi.reports.<task>.write(frame, out_dir) -> list[Path]``, which
writes markdown, CSV (and LaTeX) tables and PNG figures into ``report.out_dir``.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from nfvi.config import PathsConfig, store
from nfvi.errors import NfviError

TASKS = ("energy", "vae", "cde")


@dataclass
class ReportConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    #: folders searched (recursively) for results.json; default: paths.output_dir
    search: list[str] = field(default_factory=list)
    #: where tables and figures go; default: <paths.output_dir>/tables
    out_dir: str = ""
    #: restrict to these tasks (empty: all)
    tasks: list[str] = field(default_factory=list)

    def __post_init__(self):
        for t in self.tasks:
            if t not in TASKS:
                raise NfviError(f"report.tasks contains {t!r}; choose from: {', '.join(TASKS)}")


store("base_report", ReportConfig)


def collect(roots: list[str | Path]) -> pd.DataFrame:
    """One row per ``results.json`` found under ``roots``; nested dicts flattened with ``/``.

    The ``run_dir`` column holds the folder of each file.
    """
    return pd.DataFrame(read_results(roots))


def read_results(roots: list[str | Path]) -> list[dict]:
    """The flattened ``results.json`` rows of :func:`collect`, as dicts (whole numbers stay ``int``)."""
    rows = []
    for root in roots:
        for path in sorted(Path(root).rglob("results.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                print(f"nfvi report: skipping unreadable {path} ({exc})")
                continue
            row = pd.json_normalize(data, sep="/").iloc[0].to_dict()
            row["run_dir"] = str(path.parent)
            rows.append(row)
    return rows


def run(cfg) -> dict:
    roots = list(cfg.search) or [cfg.paths.output_dir]
    out_dir = Path(cfg.out_dir or Path(cfg.paths.output_dir) / "tables")
    tasks = list(cfg.tasks) or list(TASKS)
    records = [r for r in read_results(roots) if "task" in r]
    if not records:
        raise NfviError(f"no results.json found under {', '.join(map(str, roots))}; run an experiment first")
    written = {}
    for task in tasks:
        # one frame per task, so that a key only some tasks have does not turn another task's whole numbers into floats
        rows = pd.DataFrame([r for r in records if r["task"] == task])
        if rows.empty:
            continue
        writer = importlib.import_module(f"nfvi.reports.{task}")
        paths = writer.write(rows, out_dir)
        written[task] = [str(p) for p in paths]
        for p in paths:
            print(f"nfvi report: wrote {p}")
    return written
