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

Every checkpoint records its run's identity: the ``run_id`` written into ``run_config.json`` when the run
started, and its full resolved config. :func:`check_identity` refuses weights whose id or config (up to
:data:`IDENTITY_MAY_CHANGE`, what a resume may change) differs from the folder's record, naming the first differing
key: ``nfvi evaluate`` never labels one run's weights with another run's settings, and ``resume=true`` never
continues a checkpoint copied in from another run. A checkpoint or record from an nfvi before run ids (no
``run_id``) is accepted with a warning, its config still compared.
"""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from nfvi.errors import NfviError, RunRefused
from nfvi.runs import atomic_torch_save, select_device
from nfvi.trackers import flatten_config

__all__ = [
    "BEST",
    "CHECKPOINT",
    "FORMAT",
    "IDENTITY_MAY_CHANGE",
    "RESUME_MAY_CHANGE",
    "check_identity",
    "config_diff",
    "flatten",
    "load_checkpoint",
    "load_model",
    "model_from_state",
    "save_checkpoint",
    "weights_mismatch",
]

FORMAT = "nfvi-vae-checkpoint"
VERSION = 1
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"

#: config keys (fnmatch patterns on dotted names) that may differ between a checkpoint and a resumed run
RESUME_MAY_CHANGE = (
    "resume",
    "overwrite",  # a flag of the launch (overwrite=true then resume=true continues the run it started)
    "run_dir",
    "device",
    "threads",
    "paths.*",
    "logger.*",  # the trackers (nfvi.trackers)
    "trainer.steps",  # raising it trains longer; refused below when trainer.lr_decay depends on it
    "trainer.log_every",
    "trainer.val_every",
    "trainer.ckpt_every",
    "trainer.progress",
    "trainer.compile",  # speed only (torch.compile of the same update)
    "optim.compile",  # speed only (torch.compile of the same optimizer step)
    "eval.*",
)


#: keys in which a checkpoint may differ from its folder's record (run_config.json, the first launch): what a resume
#: may change
IDENTITY_MAY_CHANGE = RESUME_MAY_CHANGE

log = logging.getLogger("nfvi.checkpoint")


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict/list config (or a ``DictConfig``) as ``{"a.b.c": value}`` (lists are kept whole as values);
    :func:`nfvi.trackers.flatten_config` after resolving the config."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    return flatten_config(node, prefix) if isinstance(node, dict) else {prefix: node}


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
        raise NfviError(weights_mismatch(model.state_dict(), state["model"], cfg.flow.kind, exc)) from None
    return model.to(device).eval()


#: flows whose parameter layout changed to the Sylvester authors' (issue 19): their older checkpoints do not load
RELAYOUT_FLOWS = ("sylvester", "iaf")


def weights_mismatch(expected: dict, found: dict, flow: str, exc: Exception | None = None) -> str:
    """One line: the first parameter that differs between a model's ``state_dict`` (``expected``) and a checkpoint's
    (``found``), missing, unexpected or of another shape, and for a Sylvester or amortized IAF posterior the likely
    cause (a checkpoint written before these posteriors took the authors' layout) and what to do."""

    def more(keys: list) -> str:
        return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""

    if missing := [k for k in expected if k not in found]:
        what = f"{missing[0]} is missing from the checkpoint{more(missing)}"
    elif extra := [k for k in found if k not in expected]:
        what = f"the checkpoint holds {extra[0]}, which this model has not{more(extra)}"
    elif shapes := [k for k in expected if tuple(found[k].shape) != tuple(expected[k].shape)]:
        key = shapes[0]
        what = f"{key} is {tuple(found[key].shape)} in the checkpoint but {tuple(expected[key].shape)} here"
    else:
        what = str(exc).strip().splitlines()[0] if exc is not None else "they differ"
    message = f"checkpoint weights do not fit the model of its config (flow={flow}): {what}"
    if flow in RELAYOUT_FLOWS:
        message += (
            "; Sylvester and amortized IAF posteriors have taken the Sylvester authors' parameter layout "
            "(docs/flows.md), so checkpoints written before that no longer load: train the run again, or evaluate "
            "it with the nfvi commit that wrote it (git_commit in its run.json)"
        )
    return message


def load_model(run_dir: str | Path, which: str = "best", device: str | torch.device = "cpu"):
    """The trained VAE of a ``nfvi train`` run directory, in eval mode.

    ``which="best"`` takes ``best.pt`` (best validation bound) when the run has one, else the last
    checkpoint; ``which="last"`` always takes ``checkpoint.pt``. ``device``: ``cpu``, ``cuda``, ``cuda:N``, ``auto``
    or a ``torch.device``; one unknown or absent here is a one-line error (:func:`nfvi.runs.select_device`).
    """
    if which not in ("best", "last"):
        raise NfviError(f"which={which!r} is not allowed; choose one of: best, last")
    device = select_device(device)  # before reading anything: a bad device is a one-line error
    run_dir = Path(run_dir)
    path = run_dir / BEST if which == "best" and (run_dir / BEST).is_file() else run_dir / CHECKPOINT
    if not path.is_file():
        raise NfviError(f"{run_dir} holds no {CHECKPOINT} or {BEST}; is it a `nfvi train` run directory?")
    return model_from_state(load_checkpoint(path), device)


def check_identity(path: str | Path, state: dict, record: dict | None, record_id: str | None) -> None:
    """Refuse (one line) the checkpoint ``state`` read from ``path`` unless it is of the run recorded in its folder.

    ``record``: the folder's recorded config (``run_config.json``; None: none, nothing to compare); ``record_id``:
    its ``run_id``. A checkpoint whose ``run_id`` differs, or whose config differs from ``record`` in a key outside
    :data:`IDENTITY_MAY_CHANGE`, is refused naming the first such key. Without an id on either side (an older
    nfvi) the config alone is compared, with a warning.
    """
    run_id = state.get("run_id")
    if record is not None:
        diff = config_diff(record, state.get("config") or {}, IDENTITY_MAY_CHANGE)
        if diff:
            key, saved, ours = diff[0], flatten(state.get("config") or {}), flatten(record)
            more = f" (and {len(diff) - 1} more keys)" if len(diff) > 1 else ""
            raise RunRefused(
                f"{path} is not of the run of this folder: its weights were trained with {key}={saved[key]!r} but "
                f"the run's record (run_config.json) has {key}={ours[key]!r}{more}; evaluate it in its own folder, "
                f"or remove it"
            )
    if run_id is not None and record_id is not None and run_id != record_id:
        raise RunRefused(
            f"{path} holds the weights of another run (run id {run_id}; the run of this folder is {record_id}): "
            f"it was copied or moved here; evaluate it in its own folder, or remove it"
        )
    if run_id is None or record_id is None:
        what = "the checkpoint" if run_id is None else "the folder's run_config.json"
        log.warning("%s: %s records no run id (an older nfvi); its config is checked only", path, what)
