"""``nfvi report``: read every ``results.json`` under ``outputs/`` into tables and figures.

Each run's ``results.json`` carries a ``task`` field (``energy``, ``vae``, ``cde``). The rows of
each task go to its writer, ``nfvi.reports.<task>.write(frame, out_dir) -> list[Path]``, which
writes markdown, CSV (and LaTeX) tables and PNG figures into ``report.out_dir``.

A file that cannot be used (unreadable, not a JSON object, no or an unknown ``task``, a field of
:data:`FIELDS` missing, of the wrong type or not finite) is skipped with one warning line naming it
and why (logger ``nfvi.report``, on stderr by default); the others are reported. So is a file that is not a
regular file (a FIFO, a device, a symlink to ``/dev/zero``: never opened), one larger than :data:`MAX_BYTES`,
or one nested deeper than Python's parser can follow. Symlinked run folders are followed (each file is read once,
a link that loops is named and skipped). When the tasks asked for (``tasks=``) have no usable run, the command
says so and fails instead of writing nothing.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from nfvi.config import PathsConfig, store
from nfvi.errors import NfviError

TASKS = ("energy", "vae", "cde")
#: a results.json larger than this is skipped unread (the largest real ones hold a few kB)
MAX_BYTES = 16 * 2**20


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


#: per task, the fields a writer relies on: name -> (kind, required). ``num`` = a finite int or float; a
#: required field must be present and valid; an optional one may be absent or null (a NaN/inf there counts
#: as absent). The required numbers are the headline metrics: a run without them is skipped, never shown.
FIELDS: dict[str, dict[str, tuple[str, bool]]] = {
    "vae": {
        "dataset": ("str", True),
        "flow": ("str", True),
        "flow_length": ("int", True),
        "test_nll": ("num", True),
        "test_neg_elbo": ("num", True),
        "test_kl": ("num", False),
        "seed": ("int", False),
        "steps": ("int", False),
        "num_importance_samples": ("int", False),
        "num_test_images": ("int", False),
        "finished": ("bool", False),
    },
    "energy": {
        "target": ("str", True),
        "flow": ("str", True),
        "flow_length": ("int", True),
        "steps": ("int", True),
        "bound": ("num", True),
        "kl": ("num", True),
        "seed": ("int", False),
        "wall": ("num", False),
    },
    "cde": {
        "dataset": ("str", True),
        "model_name": ("str", True),
        "test_nll_mean": ("num", True),
        "test_nll_std": ("num", False),
        "test_nll_standardized_mean": ("num", False),
        "test_nll_standardized_std": ("num", False),
        "y_dim": ("int", False),
        "n_seeds": ("int", False),
    },
}

log = logging.getLogger("nfvi.report")


def collect(roots: list[str | Path]) -> pd.DataFrame:
    """One row per ``results.json`` found under ``roots`` and per other evaluation of its run; dicts flattened.

    Beside a run's ``results.json``, each ``evaluations/<name>.json`` (written by ``nfvi evaluate`` with other
    settings, e.g. ``eval.num_samples=5000``) that differs from it is a row of its own; the report then shows it
    as a separate setting. The ``run_dir`` column holds the run's folder; with several ``roots``, the ``source``
    column the root it was found under (runs of two roots are then never merged into one table row, even with the
    same config and seed: e.g. the repository's records in ``results/`` beside a user's ``outputs/``). Unreadable
    files and files that do not hold a JSON object are skipped with a one-line warning (logger ``nfvi.report``).
    """
    return pd.DataFrame(read_results(roots))


def _constant(token: str) -> float:
    """``NaN``/``Infinity``/``-Infinity`` in old files parse as floats; :func:`check_record` treats them as missing."""
    return float(token)


def _oddity(path: Path) -> str:
    """Why ``path`` is not read at all (``""`` when it may be): not a regular file, or too large."""
    try:
        info = path.stat()  # follows symlinks: a link to /dev/zero is a device
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if not stat.S_ISREG(info.st_mode):
        kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
                 stat.S_ISSOCK: "a socket", stat.S_ISDIR: "a folder"}  # fmt: skip
        kind = next((name for test, name in kinds.items() if test(info.st_mode)), "a special file")
        return f"not a regular file ({kind}{' via a symlink' if path.is_symlink() else ''})"
    if info.st_size > MAX_BYTES:
        return f"too large ({info.st_size:,} bytes; a results.json holds a few kB, at most {MAX_BYTES:,})"
    return ""


def _read_object(path: Path) -> dict | None:
    why = _oddity(path)
    if why:
        log.warning("nfvi report: skipping %s: %s", path, why)
        return None
    try:
        with path.open("rb") as f:
            text = f.read(MAX_BYTES + 1).decode()  # bounded, even if the file grew since the check
        data = json.loads(text, parse_constant=_constant)
    except RecursionError:
        log.warning("nfvi report: skipping %s: nested too deeply to parse", path)
        return None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        log.warning("nfvi report: skipping %s: unreadable (%s)", path, " ".join(str(exc).split()))
        return None
    if not isinstance(data, dict):
        log.warning("nfvi report: skipping %s: not a JSON object (a %s)", path, type(data).__name__)
        return None
    return data


def find_results(root: str | Path) -> list[Path]:
    """Every ``results.json`` below ``root``, sorted, following symlinked folders (a run folder that is a link is
    reported like any other); a link that leads back into a folder already walked is named in a warning and
    skipped, and a file reached twice (through two links) is listed once."""
    found: dict[str, Path] = {}
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            log.warning("nfvi report: skipping %s: a symlink to %s, already searched", folder, real)
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        if "results.json" in files:
            path = Path(folder) / "results.json"
            found.setdefault(os.path.realpath(path), path)
    return sorted(found.values())


def read_results(roots: list[str | Path]) -> list[dict]:
    """The flattened rows of :func:`collect`, as dicts (whole numbers stay ``int``)."""
    rows = []
    for root in roots:
        for path in find_results(root):
            headline = _read_object(path)
            if headline is None:
                continue
            others = (_read_object(p) for p in sorted((path.parent / "evaluations").glob("*.json")))
            for data in [headline, *(d for d in others if d is not None and d != headline)]:
                try:
                    row = pd.json_normalize(data, sep="/").iloc[0].to_dict() if data else {}
                except RecursionError:
                    log.warning("nfvi report: skipping %s: nested too deeply to read", path)
                    continue
                row["run_dir"] = str(path.parent)
                if len(roots) > 1:  # which search folder: runs of ours and a user's never merge (common.varying_config)
                    row["source"] = str(root)
                rows.append(row)
    return rows


def _problem(value, kind: str, required: bool) -> str:
    """Why ``value`` is not a valid ``kind`` field (``""`` when it is; missing = None or NaN)."""
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    if missing:
        return "missing or null" if required else ""
    if kind == "str":
        return "" if isinstance(value, str) else f"not a string ({value!r})"
    if kind == "bool":
        return "" if isinstance(value, bool) else f"not true/false ({value!r})"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"not a number ({value!r})"
    if not math.isfinite(value):
        return f"not finite ({value!r})" if required else ""
    if kind == "int" and not float(value).is_integer():
        return f"not a whole number ({value!r})"
    return ""


def check_record(row: dict) -> str:
    """Why the flattened ``results.json`` ``row`` cannot go into the report (``""`` when it can).

    Non-finite optional numbers are set to None in ``row`` (treated as missing).
    """
    task = row.get("task")
    if task is None:
        return "no 'task' field"
    if not isinstance(task, str) or task not in FIELDS:
        return f"unknown task {task!r} (known: {', '.join(TASKS)})"
    for name, (kind, required) in FIELDS[task].items():
        why = _problem(row.get(name), kind, required)
        if why:
            return f"field {name!r} is {why}"
    for name, value in row.items():  # NaN/inf anywhere else (e.g. test_kl_se): missing
        if isinstance(value, float) and not math.isfinite(value):
            row[name] = None
    return ""


def usable_records(rows: list[dict]) -> list[dict]:
    """The rows that pass :func:`check_record`; each other one is skipped with a one-line warning."""
    keep = []
    for row in rows:
        why = check_record(row)
        if why:
            log.warning("nfvi report: skipping %s: %s", Path(str(row.get("run_dir", "?"))) / "results.json", why)
        else:
            keep.append(row)
    return keep


def run(cfg) -> dict:
    roots = list(cfg.search) or [cfg.paths.output_dir]
    out_dir = Path(cfg.out_dir or Path(cfg.paths.output_dir) / "tables")
    tasks = list(cfg.tasks) or list(TASKS)
    found = read_results(roots)
    records = usable_records(found)
    if not records:
        seen = any(find_results(r) for r in roots)
        what = "no usable results.json (see the warnings above)" if seen else "no results.json"
        raise NfviError(f"{what} found under {', '.join(map(str, roots))}; run an experiment first")
    if not any(r["task"] in tasks for r in records):
        found_tasks = sorted({r["task"] for r in records})
        raise NfviError(
            f"nothing to write: no usable results.json of tasks={tasks} under {', '.join(map(str, roots))} (the "
            f"usable runs there are of {', '.join(found_tasks)}); run one first, or choose tasks among those"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file of that name, a parent that is a file, a read-only folder
        why = "it is a file, not a folder" if out_dir.is_file() else (exc.strerror or str(exc))
        raise NfviError(f"cannot write the report into out_dir={out_dir}: {why}; choose another out_dir") from None
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
