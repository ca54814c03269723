"""Mixed precision for training (``trainer.precision`` of ``nfvi train``, ``precision`` of ``nfvi cde``).

``fp32`` (the default) changes nothing. ``bf16`` runs the *networks* of a model (the encoder, the decoder, the
Gaussian head, an amortized flow's parameter head; a CDE's context MLP and heads) under
:func:`torch.autocast` with bfloat16, so that their matrix products and convolutions run in bfloat16, and casts
each network's floating outputs back to float32 at its boundary. Everything computed from those outputs stays
float32: the flow's layers and every log-determinant (paper Eq. 7), ``log q_0``, ``log p(z)``, ``log p(x | z)``,
the loss and its sums, and the importance-sampling log-sum-exp (float64 in :mod:`nfvi.estimators`). Parameters,
gradients and the optimizer's state stay float32 (autocast computes with bfloat16 copies of the weights).

::

    set_precision(model, "bf16")       # model: anything with autocast_modules() (VAE, FlowCDE, MDN)
    loss = ...                         # float32 log-densities; networks' products in bfloat16
    set_precision(model, "fp32")       # undo (evaluation is float32)

A model names its networks with ``autocast_modules() -> list[nn.Module]``. Only the instance's ``forward`` is
replaced (by :class:`AutocastForward`), so parameters and state dicts are untouched and checkpoints are the same.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nfvi.errors import check_choice

__all__ = ["PRECISIONS", "AutocastForward", "autocast_dtype", "check_precision", "set_precision"]

PRECISIONS = ("fp32", "bf16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def check_precision(key: str, value: str) -> None:
    """One-line :class:`nfvi.errors.NfviError` unless ``value`` is one of :data:`PRECISIONS`."""
    check_choice(key, value, PRECISIONS)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (None for ``fp32``); ValueError naming the allowed values otherwise."""
    if precision not in _DTYPES:
        raise ValueError(f"precision={precision!r} is not allowed; choose one of: {', '.join(PRECISIONS)}")
    return _DTYPES[precision]


def _to_float32(out):
    if isinstance(out, Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, tuple | list):
        return type(out)(_to_float32(o) for o in out)
    return out


def _device_type(args, module: nn.Module) -> str:
    for a in args:
        if isinstance(a, Tensor):
            return a.device.type
    for p in module.parameters():
        return p.device.type
    return "cpu"


class AutocastForward:
    """``module``'s class ``forward`` run under ``torch.autocast(dtype)``; floating outputs come back float32.

    Installed as the instance's ``forward`` by :func:`set_precision` (a plain class, so a model stays picklable
    and deep-copyable).
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        self.module, self.dtype = module, dtype

    def __call__(self, *args, **kwargs):
        with torch.autocast(_device_type(args, self.module), dtype=self.dtype):
            out = type(self.module).forward(self.module, *args, **kwargs)
        return _to_float32(out)


def set_precision(model: nn.Module, precision: str) -> nn.Module:
    """Run ``model.autocast_modules()`` in ``precision`` (module docstring); returns ``model``.

    ``fp32`` restores every network's own ``forward``. A model without ``autocast_modules`` accepts ``fp32``
    only (TypeError otherwise).
    """
    dtype = autocast_dtype(precision)
    modules = model.autocast_modules() if hasattr(model, "autocast_modules") else None
    if modules is None:
        if dtype is None:
            return model
        name = type(model).__name__
        raise TypeError(f"precision={precision!r} needs a model with autocast_modules(); {name} has none")
    for module in modules:
        module.__dict__.pop("forward", None)
        if dtype is not None:
            module.forward = AutocastForward(module, dtype)
    return model
