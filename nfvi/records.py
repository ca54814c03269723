"""Run records in the repository: ``results/<experiment>/<run>/`` holds what a finished run's numbers stand on.

A record is a copy of a finished run folder's small files (:data:`RECORD_FILES`: ``results.json``,
``metrics.csv``, ``run.json`` / ``run_config.json``, ``evaluations/*.json``, the command's log, Hydra's
``overrides.yaml`` and an energy run's ``density.npz`` on a coarser float32 grid, :func:`figure_density`), never
its checkpoints (``*.pt``). ``nfvi report`` reads a record like any run folder, so the tables and figures in
``docs/results/`` are redrawn from the committed records (:func:`redraw`, ``make figures``), and a test checks that
the committed tables equal what the report writes.

Absolute paths of the machine that ran it (the run folder, the data folder, the working directory, the home folder)
are replaced in the copied text by ``<run_dir>``, ``$NFVI_DATA``, ``.`` and ``~``, so a record names no machine.

    python -m nfvi.records outputs/multirun/train/mnist_long/planar_K10_seed0   # -> results/mnist_long/planar_K10_seed0
    python -m nfvi.records --figures                                            # results/ -> docs/results/
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from nfvi.errors import NfviError
from nfvi.runs import new_folder_mode

__all__ = ["RECORD_FILES", "MAX_FILE_BYTES", "export_record", "record_files", "experiment_of", "figure_density"]
__all__ += ["redraw"]

#: the files of a run folder that go into its record (glob patterns relative to the folder); nothing else, so never
#: a checkpoint (``checkpoint.pt``, ``best.pt``, ``model.pt``) or a tracker's folder
RECORD_FILES = (
    "results.json",
    "metrics.csv",
    "run.json",
    "run_config.json",
    "evaluations/*.json",
    "*.log",
    ".hydra/overrides.yaml",
    "density.npz",
)
#: a whitelisted file larger than this stays out of the record (named in a warning line): a record is small
MAX_FILE_BYTES = 1 << 20
#: an energy run's density.npz goes into its record on at most this many grid points a side (Figure 3's panels)
FIGURE_GRID = 200
#: the tables the report writes (compared with the committed ones by tests/test_results_records.py) and its figures
TABLE_SUFFIXES = (".md", ".csv", ".tex")
FIGURE_SUFFIXES = (".png",)


def record_files(run_dir: str | Path) -> list[Path]:
    """The files of ``run_dir`` (relative paths, sorted) that :func:`export_record` copies: :data:`RECORD_FILES`
    that are regular files of at most :data:`MAX_FILE_BYTES` (a larger one is named on stderr and left out)."""
    run_dir = Path(run_dir)
    found = set()
    for pattern in RECORD_FILES:
        for path in run_dir.glob(pattern):
            if not path.is_file() or path.is_symlink() or path.suffix == ".pt":
                continue
            if path.stat().st_size > MAX_FILE_BYTES and path.name != "density.npz":  # that one is shrunk
                print(f"nfvi records: leaving out {path} ({path.stat().st_size:,} bytes > {MAX_FILE_BYTES:,})",
                      file=sys.stderr)  # fmt: skip
                continue
            found.add(path.relative_to(run_dir))
    return sorted(found)


def figure_density(data: bytes) -> bytes:
    """An energy run's ``density.npz`` for its record: the grids (``centres`` (G,), ``log_q``/``log_p`` (G, G)) in
    float32 and on at most :data:`FIGURE_GRID` points a side (every s-th point, s = ceil(G / FIGURE_GRID);
    ``downsampled_from`` = G), which is all Figure 3's panels can show; the KL and the bound are in results.json.
    Written with fixed zip timestamps, so the same run gives the same bytes."""
    import io
    import zipfile

    import numpy as np

    with np.load(io.BytesIO(data)) as npz:
        arrays = {k: npz[k] for k in npz.files}
    size = len(arrays.get("centres", ()))
    step = -(-size // FIGURE_GRID) if size > FIGURE_GRID else 1
    for key in ("centres", "log_q", "log_p"):
        if key in arrays:
            grid = arrays[key][(slice(None, None, step),) * arrays[key].ndim]
            arrays[key] = grid.astype(np.float32)
    if step > 1:
        arrays["downsampled_from"] = np.int64(size)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for key, value in arrays.items():
            with archive.open(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w") as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
    return out.getvalue()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise NfviError(f"cannot read {path} ({' '.join(str(exc).split())}); export a finished run folder") from None
    if not isinstance(data, dict):
        raise NfviError(f"{path} does not hold a JSON object; export a finished run folder")
    return data


def experiment_of(run_dir: str | Path) -> str | None:
    """The ``experiment=`` a run was launched with (Hydra's record in ``.hydra/``), or None when it had none."""
    hydra = Path(run_dir) / ".hydra"
    try:
        from omegaconf import OmegaConf

        choice = OmegaConf.select(OmegaConf.load(hydra / "hydra.yaml"), "hydra.runtime.choices.experiment")
        if choice:
            return str(choice)
    except Exception:  # no or an unreadable hydra.yaml: try the overrides
        pass
    try:
        lines = (hydra / "overrides.yaml").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.removeprefix("- ").strip().partition("=")
        if key.lstrip("+~") == "experiment" and value:
            return value.strip("'\"")
    return None


def _unfinished(results: dict) -> str:
    """Why the run whose ``results.json`` is ``results`` cannot be a record (``""`` when it can)."""
    import pandas as pd

    from nfvi.reports.common import unfinished_notes
    from nfvi.reports.task import check_record

    row = pd.json_normalize(results, sep="/").iloc[0].to_dict() if results else {}
    why = check_record(row)
    if why:
        return f"its results.json cannot be reported ({why})"
    if row["task"] == "cde":
        seeds, done = row.get("seeds"), row.get("n_seeds")
        if isinstance(seeds, list) and isinstance(done, int) and done < len(seeds):
            return f"it fitted {done}/{len(seeds)} seeds"
        return ""
    if row.get("finished") is False:
        return "it is unfinished (its results.json says finished: false)"
    note = unfinished_notes(pd.DataFrame([row])).iloc[0]
    return f"it is unfinished ({note})" if note else ""


def _scrubbed(data: bytes, replacements: list[tuple[str, str]]) -> bytes:
    """``data`` with each absolute path of ``replacements`` replaced (text files; binary ones as they are)."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return data
    for old, new in replacements:
        text = text.replace(old, new)
    return text.encode()


def _replacements(run_dir: Path) -> list[tuple[str, str]]:
    """Absolute paths of this machine -> their neutral names, longest first (a run folder inside the working
    directory is replaced as a whole; the folder a renamed run was written in is ``<run_dir>`` too)."""
    runs = [str(run_dir.absolute()), str(run_dir.resolve())]
    data = [os.environ.get("NFVI_DATA") or ""]
    # the run's saved config names the folder it was written in (run_dir: a folder renamed since is <run_dir> too)
    # and the data folder it read (paths.data_dir)
    for record in ("run_config.json", "run.json"):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            saved = json.loads((run_dir / record).read_text())
            config = saved.get("config", saved) or {}
            runs.append(str(config.get("run_dir") or ""))
            data.append(str(config.get("paths", {}).get("data_dir") or ""))
    pairs = {path.rstrip("/"): "<run_dir>" for path in runs if os.path.isabs(path)}
    for path in (p for p in data if os.path.isabs(p)):
        pairs.setdefault(path.rstrip("/"), "$NFVI_DATA")
        pairs.setdefault(os.path.realpath(path), "$NFVI_DATA")
    pairs.setdefault(os.getcwd(), ".")
    pairs.setdefault(os.path.expanduser("~"), "~")
    pairs = {k: v for k, v in pairs.items() if k not in ("", "/")}
    return sorted(pairs.items(), key=lambda kv: -len(kv[0]))


def _same(folder: Path, files: dict[Path, bytes]) -> bool:
    """Whether ``folder`` holds exactly ``files`` (relative path -> bytes)."""
    held = {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()}
    return held == set(files) and all((folder / rel).read_bytes() == data for rel, data in files.items())


def export_record(
    run_dir: str | Path, results_root: str | Path = "results", experiment: str | None = None, name: str | None = None
) -> Path:
    """Copy the record of the finished run in ``run_dir`` into ``<results_root>/<experiment>/<name>/``; return it.

    ``experiment``: the run's ``experiment=`` (read from its ``.hydra/``) by default; required for a run launched
    without one, refused when it names another. ``name``: the run folder's name by default. Only
    :func:`record_files` are copied (never ``*.pt``), with this machine's absolute paths replaced; the record is
    written into a temporary folder beside the target and renamed into place, so it is whole or absent. Refused in
    one line (:class:`~nfvi.errors.NfviError`) when ``run_dir`` has no ``results.json``, the run is unfinished (a
    command holds it, ``finished: false``, fewer updates or seeds than configured) or its results cannot be
    reported, or when the target exists and holds another record. Exporting the same record again changes nothing.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "results.json").is_file():
        raise NfviError(f"{run_dir} holds no results.json: not a finished run folder; export a finished run")
    if (run_dir / ".nfvi.lock").exists():
        raise NfviError(f"{run_dir} is in use (.nfvi.lock): a command is running in it; export it when it has ended")
    why = _unfinished(_read_json(run_dir / "results.json"))
    if why:
        raise NfviError(f"cannot export {run_dir}: {why}; export a finished run")
    saved = experiment_of(run_dir)
    if saved and experiment and experiment != saved:
        raise NfviError(f"experiment={experiment} but {run_dir} was launched with experiment={saved}; omit experiment")
    experiment = saved or experiment
    if not experiment:
        raise NfviError(f"{run_dir} was launched without experiment=; name one (--experiment NAME)")
    name = name or run_dir.resolve().name
    for what, value in (("experiment", experiment), ("name", name)):
        if not value or value in (".", "..") or "/" in value or value.startswith("."):
            raise NfviError(f"{what}={value!r} is not a folder name; use letters, digits, '_', '-' or '.' inside")
    replacements = _replacements(run_dir)
    files = {}
    for rel in record_files(run_dir):
        data = (run_dir / rel).read_bytes()
        files[rel] = figure_density(data) if rel.name == "density.npz" else _scrubbed(data, replacements)
    target = Path(results_root) / experiment / name
    if target.exists():
        if target.is_dir() and _same(target, files):
            return target
        raise NfviError(f"{target} already holds another record; remove it or export under another name (--name)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}.", suffix=".tmp"))
    try:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        os.chmod(tmp, new_folder_mode())
        os.rename(tmp, target)  # fails if target appeared meanwhile (a non-empty folder)
    except OSError as exc:
        raise NfviError(f"cannot write the record {target}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _outputs(folder: Path) -> list[Path]:
    suffixes = TABLE_SUFFIXES + FIGURE_SUFFIXES
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in suffixes) if folder.is_dir() else []


def redraw(results_root: str | Path = "results", out_dir: str | Path = "docs/results") -> list[Path]:
    """``nfvi report`` over the records in ``results_root`` into ``out_dir`` (``make figures``); return the files.

    The tables and figures replace ``out_dir``'s previous ones (a table no record makes any more disappears); they
    are written into a temporary folder first, so a failed report leaves ``out_dir`` as it was. With no record
    under ``results_root``, ``out_dir`` is left without tables or figures. Run from the repository root with a
    relative ``results_root``, so the tables name each record by its path in the repository.
    """
    from nfvi.reports.task import ReportConfig, find_results, run

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        if Path(results_root).is_dir() and find_results(results_root):
            run(ReportConfig(search=[str(results_root)], out_dir=str(tmp)))
        out_dir.mkdir(exist_ok=True)
        for old in _outputs(out_dir):
            old.unlink()
        for new in _outputs(tmp):
            os.replace(new, out_dir / new.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _outputs(out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nfvi.records",
        description="Export finished run folders as records into results/<experiment>/<run>/ (no checkpoints), "
        "or (--figures) redraw docs/results/ from the records.",
    )
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="finished run folders to export")
    parser.add_argument("--results", default="results", help="the records' root (default: results)")
    parser.add_argument("--experiment", help="experiment name, for a run launched without experiment=")
    parser.add_argument("--name", help="the record's folder name (default: the run folder's name; one RUN_DIR)")
    parser.add_argument("--figures", action="store_true", help="redraw the tables and figures from the records")
    parser.add_argument("--out", default="docs/results", help="where --figures writes (default: docs/results)")
    args = parser.parse_args(argv)
    if not args.run_dirs and not args.figures:
        parser.error("name a RUN_DIR to export, or --figures")
    if args.name and len(args.run_dirs) > 1:
        parser.error("--name names one record: give one RUN_DIR")
    try:
        for run_dir in args.run_dirs:
            print(f"nfvi records: {run_dir} -> {export_record(run_dir, args.results, args.experiment, args.name)}")
        if args.figures:
            n = len(redraw(args.results, args.out))
            print(f"nfvi records: {args.out} holds {n} tables and figures from the records in {args.results}")
    except NfviError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
