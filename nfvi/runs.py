"""Run directories: atomic writes, ``metrics.csv``, ``results.json`` and run metadata.

Every command writes into Hydra's output directory (``hydra.job.chdir=false``): ``.hydra/`` (the
resolved config), ``metrics.csv`` (one row per logged step), ``results.json`` (final numbers, each
with its unit, plus the metadata of :func:`run_metadata`), and figures or checkpoints.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from nfvi.errors import NfviError, NonFiniteLossError

__all__ = [
    "atomic_write_bytes",
    "new_file_mode",
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


def new_file_mode() -> int:
    """The permissions ``open()`` gives a new file (0o666 less the umask); ``mkstemp``'s own 0o600 would hide runs."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj, path: str | Path) -> None:
    """``torch.save`` that never leaves a half-written file behind."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


class MetricsLog:
    """Append-only ``metrics.csv``; the header is fixed by the first row. Resumable: ``truncate_after``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fields: list[str] | None = None
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open() as f:
                self.fields = next(csv.reader(f), None)

    def log(self, **row) -> None:
        new = self.fields is None
        if new:
            self.fields = list(row)
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
            f.flush()

    def truncate_after(self, step: int, key: str = "step") -> None:
        """Drop rows logged after ``step`` (used when resuming from an older checkpoint)."""
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
    """Raise :class:`NonFiniteLossError` naming the step if ``loss`` is NaN or inf."""
    value = float(loss)
    if not math.isfinite(value):
        where = f"; what the run wrote so far is kept in {run_path}" if run_path else ""
        raise NonFiniteLossError(f"loss became {value} at step {step}; stopping{where}")


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch (CPU and CUDA) and Python's ``random``; return a seeded CPU generator."""
    import random

    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cpu``, ``cuda`` or ``cuda:N`` force one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise NfviError(f"device={name!r} is not allowed; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NfviError(f"device={name!r} was asked for but CUDA is not available here; use device=auto or cpu")
    return device
