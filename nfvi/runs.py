"""Run folders: one lifecycle (:class:`Run`) for ``nfvi energy|train|evaluate|cde``, atomic writes, ``metrics.csv``,
``results.json`` with provenance.

Every command writes into Hydra's output directory (``hydra.job.chdir=false``; ``run_dir=`` for train):
``.hydra/`` (Hydra's record of the latest launch admitted into the folder, written by :mod:`nfvi.cli` through
:func:`on_admission`), ``run.json`` (``run_config.json`` for
train: the command and resolved config of the run's first launch, what later launches are compared
with), ``<command>.log``, ``metrics.csv`` (one row per logged step), ``results.json`` (final numbers,
each with its unit, plus :func:`run_metadata` and :func:`provenance`), and figures or checkpoints.

A folder belongs to one run. While a command runs, ``.nfvi.lock`` (pid, host, command, start time) keeps
other writers out (:func:`acquire_lock`: created whole and atomically); a lock that does not parse or names no live
process of this host is stale and taken over with a one-line notice, one from another host is refused. A launch
that is refused (:class:`~nfvi.errors.RunRefused`) changes nothing in the folder. A folder holding another
command's run, an unfinished run or a finished run is refused in one line unless ``resume=true`` (train:
continue the checkpoint; the others: a finished run with the same settings is returned as it is, an
unfinished one is run again) or ``overwrite=true`` (remove that run's files and start afresh).
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import errno
import functools
import io
import json
import logging
import math
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import torch

from nfvi import kernels
from nfvi.errors import NfviError, RunRefused
from nfvi.trackers import flatten_config

__all__ = [
    "DEFAULT_THREADS",
    "LOCK",
    "apply_threads",
    "retain_freed_memory",
    "acquire_lock",
    "release_lock",
    "read_lock",
    "claim_folder",
    "on_admission",
    "folder_owner",
    "RUN_RECORD",
    "RUN_FILES",
    "Run",
    "console_logging",
    "environment_fault",
    "finite_results",
    "provenance",
    "atomic_write_bytes",
    "new_file_mode",
    "new_folder_mode",
    "atomic_write_text",
    "atomic_torch_save",
    "write_json",
    "MetricsLog",
    "run_dir",
    "run_metadata",
    "check_finite",
    "seed_everything",
    "select_device",
]


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def new_file_mode() -> int:
    """The permissions ``open()`` gives a new file (0o666 less the umask); ``mkstemp``'s own 0o600 would hide runs."""
    return 0o666 & ~_umask()


def new_folder_mode() -> int:
    """The permissions ``mkdir()`` gives a new folder (0o777 less the umask); ``mkdtemp``'s own 0o700 would hide it."""
    return 0o777 & ~_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc  # name the file (ENOSPC names none)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj, path: str | Path) -> None:
    """``torch.save`` that never leaves a half-written file behind."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def write_json(path: str | Path, obj) -> None:
    """``obj`` as indented JSON, atomically. A NaN or inf raises ``ValueError`` (JSON has no such token; see
    :func:`finite_results`)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str, allow_nan=False) + "\n")


class MetricsLog:
    """Append-only ``metrics.csv``; the header is fixed by the first row. Resumable: ``truncate_after``.

    ``trackers`` (:class:`nfvi.trackers.Trackers`): each row also goes to them (TensorBoard, W&B, MLflow)."""

    def __init__(self, path: str | Path, trackers=None):
        self.path = Path(path)
        self.trackers = trackers
        self.fields: list[str] | None = None
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open() as f:
                self.fields = next(csv.reader(f), None)

    def log(self, **row) -> None:
        new = self.fields is None
        if new:
            self.fields = list(row)
        try:
            with self.path.open("a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow(row)
                f.flush()
        except OSError as exc:
            if exc.errno is not None and exc.filename is None:
                raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
            raise
        if self.trackers:
            self.trackers.log_row(row)

    def truncate_after(self, step: int, key: str = "step") -> None:
        """Drop rows logged after ``step`` (used when resuming from an older checkpoint); trackers are told
        (:meth:`nfvi.trackers.Trackers.rewind`)."""
        if not self.path.exists():
            return
        with self.path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            return
        kept = [r for r in rows if int(float(r[key])) <= step]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_text(self.path, out.getvalue())
        if self.trackers and step > 0:  # a resumed run: the trackers drop (or keep) what follows ``step`` likewise
            self.trackers.rewind(step)


def run_dir() -> Path:
    """This job's output directory (Hydra's, or the current directory outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ValueError, ImportError):
        return Path.cwd()


def run_metadata(device: torch.device | str | None = None, started: float | None = None) -> dict:
    """Facts about where and how a run happened, for ``results.json``."""
    meta = {
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": str(device) if device is not None else None,
        "cpu_threads": torch.get_num_threads(),
        "host": platform.node(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if started is not None:
        meta["wall_time_s"] = round(time.time() - started, 3)
    return meta


def check_finite(loss: torch.Tensor | float, step: int, run_path: str | Path | None = None) -> None:
    """Raise ``NonFiniteLossError`` naming the step if ``loss`` is NaN or inf (:func:`nfvi.training.check_finite`)."""
    from nfvi.training import check_finite as guard

    guard(loss, step, f"what the run wrote so far is kept in {run_path}" if run_path else None)


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch (CPU and CUDA) and Python's ``random``; return a seeded CPU generator."""
    import random

    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def select_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` or a ``torch.device`` force one.

    A name torch does not know, a CUDA device where there is none, or ``cuda:N`` past the last GPU: one-line
    :class:`NfviError`; neither a string nor a ``torch.device``: ``TypeError``.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str):
        raise TypeError(f"device must be a string (auto, cpu, cuda, cuda:N) or torch.device, got {type(name).__name__}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise NfviError(f"device={name!r} is not allowed; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise NfviError(f"device={name!r} is not allowed; use auto, cpu, cuda or cuda:N")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise NfviError(f"device={name!r} was asked for but MPS is not available here; use device=auto or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NfviError(f"device={name!r} was asked for but CUDA is not available here; use device=auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise NfviError(
            f"device={name!r} is not allowed; this machine has {count} GPU(s): use cuda:0 to cuda:{count - 1}"
        )
    return device


# ---------------------------------------------------------------------------------------------------------------------
# Provenance and finite results


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def provenance() -> dict:
    """What produced a result: nfvi's version, its git commit (``"unknown"`` outside a checkout), library versions."""
    import hydra
    import numpy
    import omegaconf

    import nfvi

    commit = _git("rev-parse", "HEAD") if (Path(nfvi.__file__).resolve().parent.parent / ".git").exists() else None
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "nfvi_version": nfvi.__version__,
        "git_commit": commit or "unknown",
        "git_dirty": None if status is None else bool(status),
        "torch_version": torch.__version__,
        "hydra_version": hydra.__version__,
        "omegaconf_version": omegaconf.__version__,
        "numpy_version": numpy.__version__,
        "python_version": platform.python_version(),
    }


def finite_results(results: dict, required: tuple[str, ...] = ()) -> dict:
    """``results`` ready for JSON: a non-finite value of a ``required`` key is an error naming it; any other
    non-finite float (at the top level) becomes ``null`` with a ``<key>_reason`` note."""
    from nfvi.errors import NonFiniteLossError

    out = dict(results)
    for key, value in results.items():
        if isinstance(value, float) and not math.isfinite(value):
            if key in required:
                raise NonFiniteLossError(f"the reported {key} is {value} (not finite); results.json is not written")
            out[key] = None
            out[f"{key}_reason"] = f"not finite ({value})"
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Environment faults


def environment_fault(exc: BaseException, folder: str | Path | None = None) -> str | None:
    """One line for an :class:`OSError` of the file system (in ``exc`` or its causes), or None for other errors."""
    while exc is not None and not (isinstance(exc, OSError) and exc.errno is not None):
        exc = exc.__cause__ or exc.__context__
    if exc is None:
        return None
    path = Path(exc.filename or folder or ".")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        problem = _path_problem(path, "run folder" if folder is None or path == Path(folder) else "folder")
        if problem is not None:
            return problem
    causes = {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied (a read-only folder?)",
        errno.EPERM: "operation not permitted (a read-only folder?)",
        errno.ENAMETOOLONG: "the name is too long",
    }
    cause = causes.get(exc.errno, exc.strerror or str(exc))
    kept = ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        kept = "; what was saved before is kept: free some space, then resume=true continues the run"
    return f"cannot write {path}: {cause}{kept}"


def _path_problem(path: Path, what: str = "run folder") -> str | None:
    """Why ``what`` (a run folder, or another folder such as the data root) cannot be made at ``path``: it is a
    file, or a parent is not a folder."""
    if path.exists() and not path.is_dir():
        return f"{what} {path} is a file, not a folder; choose another {what}"
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        return f"cannot create {what} {path}: {parent} is not a folder"
    return None


def _folder_error(out: Path, exc: OSError) -> NfviError:
    return NfviError(_path_problem(out) or environment_fault(exc, out) or f"cannot create run folder {out}: {exc}")


# ---------------------------------------------------------------------------------------------------------------------
# The run lifecycle

LOCK = ".nfvi.lock"
#: a failed job's one-line error, then its traceback (written by :mod:`nfvi.cli`, read by :mod:`nfvi.hydra_callbacks`)
ERROR_FILE = "error.txt"
RUN_RECORD = "run.json"
#: the files a run may own; ``overwrite=true`` removes these (and nothing else) before starting afresh
RUN_FILES = (
    "run.json",
    "run_config.json",
    "results.json",
    "metrics.csv",
    "checkpoint.pt",
    "best.pt",
    "model.pt",
    "density.npz",
    "density.png",
    "evaluations",
)
RUN_FILES += ("tensorboard", "wandb", "mlruns")  # the trackers' folders (nfvi.trackers), where they are by default
#: config keys that may differ between launches into one run folder (they do not change the numbers)
FREE_KEYS = ("resume", "overwrite", "run_dir", "device", "threads", "paths.", "trainer.progress", "eval.progress")
FREE_KEYS += ("logger",)  # the trackers (nfvi.trackers) see the numbers, they do not change them
_TASK_COMMAND = {"vae": "train", "energy": "energy", "cde": "cde"}
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def config_changes(saved: dict, current: dict, free=FREE_KEYS) -> list[str]:
    """Dotted keys whose values differ between two resolved configs, ``free`` keys (prefixes) aside."""
    a, b = flatten_config(saved), flatten_config(current)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not any(k == f or k.startswith(f) for f in free if f)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


# ---------------------------------------------------------------------------------------------------------------------
# The lock of a run folder

#: the locks this process holds: real path of the folder -> [token, depth] (a Run inside nfvi.cli's claim re-enters)
_HELD: dict[str, list] = {}


def _key(folder: str | Path) -> str:
    return os.path.realpath(folder)


def _slurm_job() -> tuple[str | None, int]:
    """This process's SLURM job id and restart count (``SLURM_JOB_ID``, ``SLURM_RESTART_COUNT``), or ``(None, 0)``."""
    try:
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        restart = 0
    return os.environ.get("SLURM_JOB_ID") or None, restart


def _slurm_restart_of(info: dict) -> str | None:
    """Why a lock taken by an earlier attempt of this very SLURM job is stale (a requeued job may run again on
    another node, after its first attempt was killed without releasing the lock); None otherwise. SLURM runs a job
    once at a time, so a lock of the same job id and a lower restart count belongs to an attempt that is over."""
    job, restart = _slurm_job()
    held = info.get("slurm_job")
    held_restart = info.get("slurm_restart", 0)
    if job is None or held != job or not isinstance(held_restart, int) or held_restart >= restart:
        return None
    return f"it was taken by attempt {held_restart} of SLURM job {job}, now at attempt {restart}"


def read_lock(folder: str | Path) -> tuple[dict | None, str | None]:
    """``folder``'s lock as ``(holder, why_stale)``, read defensively.

    ``(None, None)``: no lock. ``(holder, None)``: held, by a live process of this host or by a process of another
    host (``holder["host"]``). ``(holder, why)``: stale, with the reason: the file does not parse as a JSON object
    (garbage, empty: a kill between create and write, ``[]``), names no process id, names a process of this host
    that is gone, or was taken by an earlier attempt of this process's SLURM job (a requeued job, on any node).
    A lock that cannot be read at all (permissions) is an :class:`~nfvi.errors.NfviError`.
    """
    path = Path(folder) / LOCK
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        raise NfviError(f"cannot read the lock {path} ({exc.strerror or exc}); remove it if no nfvi process uses "
                        f"{folder}") from None  # fmt: skip
    try:
        info = json.loads(text)
    except ValueError:
        info = None
    if not isinstance(info, dict):
        return {}, "it does not parse" if text.strip() else "it is empty"
    pid = info.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return info, f"it names no process id (pid {pid!r})"
    restarted = _slurm_restart_of(info)
    if restarted:
        return info, restarted
    host = info.get("host")
    if isinstance(host, str) and host and host != socket.gethostname():
        return info, None
    if not _pid_alive(pid):
        return info, f"its process {pid} is gone"
    return info, None


def _held_message(folder: Path, holder: dict) -> str:
    pid, host = holder.get("pid", "?"), holder.get("host", "?")
    what = f"nfvi {holder.get('command', '?')}, since {holder.get('started_at', '?')}"
    if isinstance(host, str) and host and host != socket.gethostname():
        return (
            f"{folder} is locked by pid {pid} on host {host} ({what}); if no nfvi process on {host} uses it any "
            f"more, remove {folder / LOCK} and launch again"
        )
    return f"{folder} is in use by another run (pid {pid} on {host}, {what}); wait for it to end or use another folder"


@contextlib.contextmanager
def _guard(folder: Path):
    """Serialise the taking of ``folder``'s lock among this host's processes: an exclusive ``flock`` on the folder
    itself (no file is created); a no-op where ``flock`` is not available."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        fd = None
    try:
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock


def _create_lock(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text``, whole and atomically: a temporary file hard-linked to ``path`` (refused
    if ``path`` exists). False if it exists. Where hard links are not supported, an exclusive create."""
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, new_file_mode())
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS):
            raise
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, new_file_mode())
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def acquire_lock(folder: str | Path, command: str) -> str | None:
    """Take ``folder``'s lock for ``command`` (re-entrant within this process); returns the one-line notice of a
    stale lock taken over, or None.

    A live holder of this host or a holder on another host: :class:`~nfvi.errors.RunRefused` naming it (and, for
    another host, how to clear the lock after checking). File-system errors: one-line :class:`NfviError`.
    """
    folder = Path(folder)
    key = _key(folder)
    if key in _HELD:
        _HELD[key][1] += 1
        return None
    path = folder / LOCK
    token = secrets.token_hex(8)
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "token": token,
    }
    job, restart = _slurm_job()
    if job is not None:  # a requeued attempt of the same job takes the lock over (:func:`_slurm_restart_of`)
        info.update(slurm_job=job, slurm_restart=restart)
    notice = None
    try:
        with _guard(folder):
            for _ in range(3):
                holder, stale = read_lock(folder)
                if holder is not None and stale is None:
                    raise RunRefused(_held_message(folder, holder))
                if stale is not None:
                    path.unlink(missing_ok=True)
                    notice = f"taking over the stale lock {path} ({stale})"
                if _create_lock(path, json.dumps(info) + "\n"):
                    _HELD[key] = [token, 1]
                    return notice
    except OSError as exc:
        raise NfviError(environment_fault(exc, folder) or str(exc)) from None
    raise RunRefused(f"cannot take the lock {path}; remove it if no nfvi process uses {folder}")


def release_lock(folder: str | Path) -> None:
    """Release this process's lock of ``folder`` (the file is removed only if it is still this process's)."""
    key = _key(folder)
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] > 0:
        return
    del _HELD[key]
    path = Path(folder) / LOCK
    with contextlib.suppress(OSError, ValueError):
        info = json.loads(path.read_text())
        if isinstance(info, dict) and info.get("token") == held[0]:
            path.unlink()


def folder_owner(folder: str | Path) -> tuple[str | None, dict | None]:
    """The command and first config of the run ``folder`` holds: ``(None, None)`` for a folder without a run,
    ``("unknown", None)`` for an unreadable record."""
    folder = Path(folder)
    for name in (RUN_RECORD, "run_config.json"):
        path = folder / name
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except (OSError, ValueError):
                return "unknown", None
            if not isinstance(saved, dict):
                return "unknown", None
            if name == RUN_RECORD:
                return str(saved.get("command", "unknown")), saved.get("config")
            return "train", {k: v for k, v in saved.items() if k != "run_id"}  # the config, less the run's id
    results = _read_json(folder / "results.json")
    if isinstance(results, dict):  # a run from before run.json existed
        return _TASK_COMMAND.get(results.get("task"), "unknown"), None
    return None, None


def _read_json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _other_command_message(folder: Path, command: str, other: str) -> str:
    return f"{folder} holds a run of nfvi {other}; use another folder, or overwrite=true to replace that run"


@contextlib.contextmanager
def claim_folder(folder: str | Path, command: str, overwrite: bool = False):
    """Hold ``folder`` for a launch of ``command`` before anything is written into it (:mod:`nfvi.cli` claims each
    job's folder before the task starts): its lock, and a refusal of another command's run unless ``overwrite``
    (the task's :class:`Run` then replaces it). Raises :class:`~nfvi.errors.RunRefused` (nothing changed) or a
    one-line :class:`NfviError`; the notice of a stale lock taken over is logged once the claim holds."""
    folder = Path(folder)
    notice = acquire_lock(folder, command)
    try:
        other, _ = folder_owner(folder)
        if other is not None and other != command and not overwrite:
            raise RunRefused(_other_command_message(folder, command, other))
    except BaseException:
        release_lock(folder)
        if notice:
            print(f"nfvi {command}: {notice}", file=sys.stderr)
        raise
    if notice:
        with console_logging():
            logging.getLogger(f"nfvi.{command}").warning(notice)
    try:
        yield folder
    finally:
        release_lock(folder)


#: what to do when a run is admitted into a folder (:meth:`Run.admit`): real path -> callback (:func:`on_admission`)
_ADMISSION: dict[str, object] = {}


@contextlib.contextmanager
def on_admission(folder: str | Path, callback):
    """Call ``callback()`` once when a :class:`Run` is admitted into ``folder`` (:meth:`Run.admit`: its checks passed
    and it starts writing), within this block. :mod:`nfvi.cli` writes Hydra's record of the launch (``.hydra/``)
    then, so that a refused launch leaves no trace."""
    key = _key(folder)
    _ADMISSION[key] = callback
    try:
        yield
    finally:
        _ADMISSION.pop(key, None)


class console_logging:
    """Context manager: the ``nfvi`` loggers print at INFO to stderr when no console handler (Hydra's) does already.

    :class:`Run` uses it; ``nfvi evaluate`` wraps its whole loop in it (the list of runs precedes every Run).
    """

    def __init__(self):
        self.handler: logging.Handler | None = None
        self.old_level: int | None = None

    def __enter__(self) -> console_logging:
        nfvi_log = logging.getLogger("nfvi")
        if nfvi_log.getEffectiveLevel() > logging.INFO:
            self.old_level = nfvi_log.level
            nfvi_log.setLevel(logging.INFO)
        if not any(type(h) is logging.StreamHandler for h in [*nfvi_log.handlers, *logging.getLogger().handlers]):
            self.handler = logging.StreamHandler(sys.stderr)
            self.handler.setFormatter(logging.Formatter(LOG_FORMAT))
            nfvi_log.addHandler(self.handler)
        return self

    def __exit__(self, *exc) -> bool:
        nfvi_log = logging.getLogger("nfvi")
        if self.handler is not None:
            nfvi_log.removeHandler(self.handler)
            self.handler = None
        if self.old_level is not None:
            nfvi_log.setLevel(self.old_level)
            self.old_level = None
        return False


#: every command's default ``threads``: one torch thread per process (docs/performance.md). Two threads made small
#: runs 8-17x slower on a 2-core machine shared with other jobs, and several jobs side by side (joblib) each
#: want one; pass ``threads=N`` (or ``threads=0``, torch's own choice: all cores) on a machine of your own.
DEFAULT_THREADS = 1


def apply_threads(threads: int) -> None:
    """``threads=N`` of every command: torch's intra-op CPU threads (N >= 1); 0 leaves torch's default
    (``OMP_NUM_THREADS`` if set, else one per core)."""
    if threads and int(threads) > 0:
        torch.set_num_threads(int(threads))


#: glibc malloc settings of :func:`retain_freed_memory`: blocks under 32 MiB (glibc's largest threshold) from the heap,
#: and the heap handed back to the kernel only beyond 1 GiB free
MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD = 32 << 20, 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


@functools.cache
def retain_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse, as every nfvi command does for its process.

    With glibc's defaults, a CPU training update's larger temporaries (the gradient of an amortized flow's
    parameter head, 2.6 MB at K=80) are fresh ``mmap`` regions, or reuse a heap that was trimmed since: the
    kernel faults in and zeroes their pages again at every update, 300-900 page faults per update of Table 2's
    model. Set here (``mallopt``): blocks under 32 MiB come from the heap, and the heap is returned to the
    kernel only beyond 1 GiB free; no faults, and the update 2-6% faster on one thread (docs/performance.md).
    The cost is that a process keeps its peak heap, as a caching allocator does.

    Returns True where set. A no-op (False) off Linux or off glibc, with ``NFVI_RETAIN_FREED_MEMORY=0`` (glibc's
    defaults), and where ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES`` are in the
    environment (your own settings stand). Any other value of ``NFVI_RETAIN_FREED_MEMORY`` than 0 or 1 is a
    one-line :class:`NfviError`. Once per process.
    """
    return _set_malloc()


def _set_malloc() -> bool:
    env = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
    choice = os.environ.get("NFVI_RETAIN_FREED_MEMORY", "").strip()
    if choice not in ("", "0", "1"):
        raise NfviError(
            f"NFVI_RETAIN_FREED_MEMORY={choice!r}: use 1 (keep freed memory for reuse, the default) "
            "or 0 (glibc's defaults)"
        )
    if choice == "0":
        return False
    if not sys.platform.startswith("linux") or any(os.environ.get(k) for k in env):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process already runs on
    except (OSError, AttributeError):
        return False
    if platform.libc_ver()[0] != "glibc":  # musl has a mallopt that does nothing
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)
    )


class Run:
    """One command's run in one folder, as a context manager::

        with Run(out, command="energy", cfg=cfg) as run:
            done = run.begin()          # resume/overwrite policy; a finished run's results or None
            ...                          # the loop: run.log.info(...), run.metrics.log(...)
            run.write_results(results)   # provenance + config, finite, atomic

    Entering creates the folder (one-line errors when it cannot be: a file, a read-only folder, a parent that is
    not a folder), takes ``.nfvi.lock``, routes the ``nfvi`` loggers to the console and ``<command>.log`` at INFO
    (adding handlers only where Hydra's logging does not already), makes SIGTERM end the run through ``__exit__``,
    and applies ``cfg.seed``, ``cfg.device`` and ``cfg.threads`` where the command has them (``run.device``), and
    :func:`retain_freed_memory`.
    Leaving releases the lock and turns file-system errors (ENOSPC, read-only, ...) into one-line errors.

    ``record``: the file holding the command and first config (``run.json``; train keeps ``run_config.json``,
    which holds the config alone). ``claim=False`` (``nfvi evaluate``): the folder is another command's run;
    only lock, log and write results.
    """

    def __init__(self, out: str | Path, command: str, cfg=None, *, record: str = RUN_RECORD, claim: bool = True):
        from omegaconf import OmegaConf

        self.out = Path(out)
        self.command = command
        self.cfg = cfg
        self.config = OmegaConf.to_container(cfg, resolve=True) if cfg is not None else {}
        self.record = record
        self.claim = claim
        self.started = time.time()
        self.log = logging.getLogger(f"nfvi.{command}")
        self.device: torch.device | None = None
        self.metrics: MetricsLog | None = None
        self.trackers = None  # nfvi.trackers.Trackers, started by open_metrics
        #: the id of the run this folder holds (its record's ``run_id``; set by :meth:`save_record`)
        self.run_id: str | None = None
        self._handlers: list[logging.Handler] = []
        self._console = console_logging()
        self._old_sigterm = None
        self._locked = False

    # -- entering and leaving ------------------------------------------------------------------------------------------
    def __enter__(self) -> Run:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _folder_error(self.out, exc) from None
        if not self.out.is_dir():
            raise NfviError(f"run folder {self.out} is a file, not a folder; choose another run folder")
        self._lock()
        try:
            self._start_logging()
            self._catch_sigterm()
            self._setup()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None
        if self.trackers is not None:
            self.trackers, trackers = None, self.trackers
            trackers.close(failed=exc_type is not None)
        self._unlock()
        self._stop_logging()
        if isinstance(exc, OSError) and not isinstance(exc, NfviError):
            message = environment_fault(exc, self.out)
            if message is not None:
                raise NfviError(message) from None
        return False

    def _setup(self) -> None:
        retain_freed_memory()
        kernels.enabled()  # a bad NFVI_KERNELS ends here, in one line, before the run folder changes
        cfg = self.cfg
        if cfg is None:
            return
        if "threads" in cfg:
            apply_threads(cfg.threads)
        if "device" in cfg:
            self.device = select_device(cfg.device)
        if "seed" in cfg:
            seed_everything(int(cfg.seed))

    def _catch_sigterm(self) -> None:
        """SIGTERM raises ``SystemExit(143)`` so that the lock is released (train installs its own handler)."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:

            def stop(signum, frame):
                raise SystemExit(128 + signum)

            self._old_sigterm = signal.signal(signal.SIGTERM, stop)

    # -- the lock ------------------------------------------------------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        return self.out / LOCK

    @staticmethod
    def holder(folder: str | Path) -> dict | None:
        """The holder of ``folder``'s lock (``{"pid", "host", "command", "started_at"}``): a live process of this
        host or a process of another host; None without a lock or for a stale one (:func:`read_lock`)."""
        holder, stale = read_lock(folder)
        return holder if stale is None else None

    def _lock(self) -> None:
        notice = acquire_lock(self.out, self.command)
        self._locked = True
        if notice:
            self.log.warning(notice)

    def _unlock(self) -> None:
        if self._locked:
            self._locked = False
            release_lock(self.out)

    # -- logging -------------------------------------------------------------------------------------------------------
    def _start_logging(self) -> None:
        """The ``nfvi`` loggers reach the console and ``<out>/<command>.log`` at INFO, through Hydra's handlers
        where its job logging has them, else through handlers of this run (removed on exit)."""
        self._console.__enter__()
        nfvi_log = logging.getLogger("nfvi")
        chain = [*nfvi_log.handlers, *logging.getLogger().handlers]
        log_file = Path(os.path.abspath(self.out / f"{self.command}.log"))  # as logging.FileHandler names it
        if not any(getattr(h, "baseFilename", None) == str(log_file) for h in chain):
            file = logging.FileHandler(log_file, encoding="utf-8", delay=True)  # no log file before a line
            file.setFormatter(logging.Formatter(LOG_FORMAT))
            self._handlers.append(file)
        for handler in self._handlers:
            handler.setLevel(logging.INFO)
            nfvi_log.addHandler(handler)

    def _stop_logging(self) -> None:
        nfvi_log = logging.getLogger("nfvi")
        for handler in self._handlers:
            nfvi_log.removeHandler(handler)
            handler.close()
        self._handlers = []
        self._console.__exit__(None, None, None)

    # -- who owns the folder -------------------------------------------------------------------------------------------
    def owner(self) -> tuple[str | None, dict | None]:
        """The command and first config of the run this folder holds: ``(None, None)`` for an empty folder."""
        return folder_owner(self.out)

    def read_results(self) -> dict | None:
        results = _read_json(self.out / "results.json")
        return results if isinstance(results, dict) else None

    def admit(self) -> None:
        """This launch's checks passed and it starts writing into the folder: run the folder's admission callback
        (:func:`on_admission`; :mod:`nfvi.cli` writes ``.hydra/`` then). Idempotent."""
        callback = _ADMISSION.pop(_key(self.out), None)
        if callback is not None:
            callback()

    def clear(self) -> None:
        """Remove the files of the run this folder holds (:data:`RUN_FILES`); ``.hydra/`` and logs stay."""
        for name in RUN_FILES:
            path = self.out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def save_record(self) -> None:
        """Record the command, resolved config and a new ``run_id`` of this (first) launch (train: the config and
        ``run_id`` in ``run_config.json``). The id goes into every checkpoint, so that weights name their run."""
        self.run_id = uuid.uuid4().hex
        if self.record == RUN_RECORD:
            started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            record = {"command": self.command, "config": self.config, "started_at": started, "run_id": self.run_id}
            write_json(self.out / self.record, record)
        else:
            write_json(self.out / self.record, {**self.config, "run_id": self.run_id})

    def record_id(self) -> str | None:
        """The ``run_id`` of this folder's record (None: no record, or one from an nfvi before run ids)."""
        for name in (RUN_RECORD, "run_config.json"):
            try:
                saved = json.loads((self.out / name).read_text())
            except (OSError, ValueError):
                continue
            return saved.get("run_id") if isinstance(saved, dict) else None
        return None

    def refuse_other_command(self) -> None:
        """Refuse (one line) a folder that holds another command's run, unless ``overwrite=true`` (then clear it)."""
        command, _ = self.owner()
        if command is None or command == self.command:
            return
        if self.cfg is not None and self.cfg.get("overwrite", False):
            self.admit()
            self.log.info("overwrite=true: removing the nfvi %s run in %s", command, self.out)
            self.clear()
            return
        raise RunRefused(_other_command_message(self.out, self.command, command))

    def begin(self) -> dict | None:
        """The resume/overwrite policy of energy and cde. Returns the finished run's results when there is nothing
        to do (``resume=true``, same settings), else None after preparing the folder for a fresh run."""
        self.refuse_other_command()
        command, saved = self.owner()
        overwrite, resume = bool(self.cfg.get("overwrite", False)), bool(self.cfg.get("resume", False))
        if command is not None and overwrite:
            self.admit()
            self.log.info("overwrite=true: starting %s afresh", self.out)
            self.clear()
        elif command is not None:
            results = self.read_results()
            changes = ["(settings unknown: a run from an older nfvi)"] if saved is None else []
            changes = changes or config_changes(saved, self.config)
            what = "a finished run" if results is not None else "an unfinished run"
            if changes:
                shown = ", ".join(changes[:6]) + (f" and {len(changes) - 6} more" if len(changes) > 6 else "")
                raise RunRefused(
                    f"{self.out} holds {what} with other settings ({shown}); use another folder, or overwrite=true "
                    f"to replace it"
                )
            if not resume:
                raise RunRefused(
                    f"{self.out} holds {what} with these settings; resume=true keeps it (a finished run) or runs it "
                    f"again (an unfinished one), overwrite=true starts it afresh"
                )
            if results is not None:
                self.log.info("%s is complete (resume=true); nothing to do", self.out)
                return results
            self.admit()
            self.log.info("resume=true: %s holds an unfinished run; running it again", self.out)
            self.clear()
        self.admit()
        self.save_record()
        self.open_metrics()
        return None

    def open_metrics(self) -> MetricsLog:
        """``metrics.csv`` as :attr:`metrics`, its rows also sent to the trackers ``cfg.logger`` selects (started
        here, once, with the resolved config; closed on exit)."""
        if self.trackers is None:
            from nfvi.trackers import open_trackers

            logger = self.cfg.get("logger") if self.cfg is not None else None
            self.trackers = open_trackers(logger, self.out, self.config, run_id=self.run_id or self.record_id())
        self.metrics = MetricsLog(self.out / "metrics.csv", trackers=self.trackers)
        return self.metrics

    # -- results -------------------------------------------------------------------------------------------------------
    def results(self, results: dict, required: tuple[str, ...] = ()) -> dict:
        """``results`` plus run metadata, provenance and the config; non-finite values handled by
        :func:`finite_results` (a non-finite ``required`` metric is an error)."""
        full = dict(results)
        extra = {**run_metadata(self.device, self.started), **provenance(), "config": self.config}
        for key, value in extra.items():  # the command's own fields win (e.g. the wall time it measured)
            full.setdefault(key, value)
        return finite_results(full, required)

    def write_results(self, results: dict, required: tuple[str, ...] = (), path: str | Path | None = None) -> dict:
        """Complete ``results`` (:meth:`results`) and write it atomically to ``path`` (default ``results.json``)."""
        full = self.results(results, required)
        write_json(Path(path) if path is not None else self.out / "results.json", full)
        if path is None and self.trackers:
            self.trackers.log_results(full)
        return full


class _suppress_os_error:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return exc_type is not None and issubclass(exc_type, OSError)
