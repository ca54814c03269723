"""Checkpoints of ``nfvi train`` runs: save atomically, load with one-line errors, compare configs on resume.

A run directory holds two checkpoint files, both written through a temporary file and a rename
(:func:`nfvi.runs.atomic_torch_save`), so a crash never leaves a half-written file:

- ``checkpoint.pt``: everything needed to continue exactly where the run stopped: the model and
  optimizer state, the update count, the torch RNG state, the data generator's state with the
  epoch's permutation and position, the best validation bound so far and the resolved config.
  It is only ever replaced by a state whose parameters are finite.
- ``best.pt``: the model with the best validation bound (``-ELBO`` on the validation split), with
  its step and value. ``nfvi evaluate`` and the end-of-training evaluation use it by default.

Both are plain dicts of tensors and primitives (``torch.load(..., weights_only=True)`` reads them).

Resuming compares the checkpoint's config with the new one key by key (:func:`config_diff`). Keys
that do not change the trajectory of the parameters may differ (:data:`RESUME_MAY_CHANGE`):
``trainer.steps`` may be raised (to train longer) as long as no learning-rate schedule depends on
it, and the cadence of logging, validation and checkpoints, the evaluation settings, the device
and the paths are free.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from nfvi.errors import NfviError
from nfvi.runs import atomic_torch_save

__all__ = [
    "BEST",
    "CHECKPOINT",
    "FORMAT",
    "RESUME_MAY_CHANGE",
    "config_diff",
    "flatten",
    "load_checkpoint",
    "load_model",
    "model_from_state",
    "save_checkpoint",
]

FORMAT = "nfvi-vae-checkpoint"
VERSION = 1
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"

#: config keys (fnmatch patterns on dotted names) that may differ between a checkpoint and a resumed run
RESUME_MAY_CHANGE = (
    "resume",
    "run_dir",
    "device",
    "threads",
    "paths.*",
    "trainer.steps",  # raising it trains longer; refused below when trainer.lr_decay depends on it
    "trainer.log_every",
    "trainer.val_every",
    "trainer.ckpt_every",
    "trainer.progress",
    "trainer.compile",  # speed only (torch.compile of the same update)
    "eval.*",
)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict/list config as ``{"a.b.c": value}`` (lists are kept whole as values)."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    out: dict[str, Any] = {}
    if isinstance(node, dict):
        for key, value in node.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict) and value:
                out.update(flatten(value, name))
            else:
                out[name] = value
    else:
        out[prefix] = node
    return out


def config_diff(saved: dict | DictConfig, current: dict | DictConfig, may_change=RESUME_MAY_CHANGE) -> list[str]:
    """Dotted keys whose values differ between two configs, ignoring the ``may_change`` patterns.

    Keys present in only one of the two (a schema key added or removed by a newer nfvi) are not
    differences: the checkpoint's run never set them.
    """
    a, b = flatten(saved), flatten(current)
    keys = sorted(set(a) & set(b))
    return [k for k in keys if a[k] != b[k] and not _matches(k, may_change)]


def _matches(key: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write ``state`` (a dict; ``format`` and ``version`` are added) atomically to ``path``."""
    atomic_torch_save({"format": FORMAT, "version": VERSION, **state}, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; anything else is a one-line :class:`NfviError`."""
    path = Path(path)
    if not path.is_file():
        raise NfviError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated zip, random bytes, a pickle with foreign classes ...
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        picked = [line for line in lines if "Unpickler error" in line]
        reason = (picked or lines or [type(exc).__name__])[0].split(". ")[0]
        raise NfviError(
            f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: {reason[:160]}); "
            f"delete it to start over, or restore a copy"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise NfviError(f"{path} is not an nfvi train checkpoint (no format tag {FORMAT!r})")
    if state.get("version") != VERSION:
        raise NfviError(f"checkpoint {path} has format version {state.get('version')!r}; this nfvi reads {VERSION}")
    missing = [k for k in ("config", "model", "step") if k not in state]
    if missing:
        raise NfviError(f"checkpoint {path} is incomplete: no {', '.join(missing)}")
    return state


def model_from_state(state: dict, device: str | torch.device = "cpu"):
    """Rebuild the VAE of a checkpoint's config and load its weights (eval mode)."""
    from nfvi.data.images import IMAGE_SHAPE
    from nfvi.vae.model import build_model

    cfg = OmegaConf.create(state["config"])
    x_dim = state.get("x_dim", torch.Size(IMAGE_SHAPE).numel())
    x_dim = int(x_dim) if isinstance(x_dim, int) else tuple(int(n) for n in x_dim)
    model = build_model(cfg.model, cfg.flow, x_dim)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise NfviError(f"checkpoint weights do not fit the model of its config: {first}") from None
    return model.to(device).eval()


def load_model(run_dir: str | Path, which: str = "best", device: str | torch.device = "cpu"):
    """The trained VAE of a ``nfvi train`` run directory, in eval mode.

    ``which="best"`` takes ``best.pt`` (best validation bound) when the run has one, else the last
    checkpoint; ``which="last"`` always takes ``checkpoint.pt``.
    """
    if which not in ("best", "last"):
        raise NfviError(f"which={which!r} is not allowed; choose one of: best, last")
    run_dir = Path(run_dir)
    path = run_dir / BEST if which == "best" and (run_dir / BEST).is_file() else run_dir / CHECKPOINT
    if not path.is_file():
        raise NfviError(f"{run_dir} holds no {CHECKPOINT} or {BEST}; is it a `nfvi train` run directory?")
    return model_from_state(load_checkpoint(path), device)
