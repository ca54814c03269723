"""Typed config schemas shared by every command, registered in Hydra's ConfigStore.

Each YAML option under ``nfvi/conf/*/<group>/`` lists its schema (``base_<group>``) first in its defaults,
so a misspelled key or a value of the wrong type fails at composition with Hydra's message. Each
command module (``nfvi.energy_fit``, ``nfvi.vae.train``, ...) defines its own primary schema next to
its code and registers it as ``base_<command>`` with :func:`store`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from nfvi.errors import NfviError, check_choice, check_range
from nfvi.flows import FLOW_KINDS, Flow, build_flow

__all__ = [
    "FlowConfig",
    "OptimConfig",
    "PathsConfig",
    "store",
    "flow_from_config",
    "optimizer_from_config",
    "select_device",
]


@dataclass
class FlowConfig:
    """``flow=<kind>`` picks the option; ``flow.length=K`` the number of layers (0 = identity)."""

    kind: str = "planar"
    length: int = 10
    hidden: int = 64  # nice: width of each coupling MLP
    mix: str = "alternate"  # nice: alternate | permute
    w_floor: Optional[float] = 0.1  # planar, amortized only: ||w|| >= w_floor (docs/paper.md section 13); null = off
    amortized: bool = True  # train/cde: parameters computed per data point from the encoder (Sec. 4.3); false = global


@dataclass
class OptimConfig:
    """``optim=rmsprop|adam|adamax``; ``momentum`` is used by rmsprop only."""

    name: str = "rmsprop"
    lr: float = 1e-5
    momentum: float = 0.9
    eps: float = 1e-8
    weight_decay: float = 0.0
    flow_lr_factor: float = 1.0  # the flow's own parameters (e.g. its amortization head) learn at lr * this factor


@dataclass
class PathsConfig:
    """Where data live and where runs go. ``NFVI_DATA`` sets the default data root."""

    data_dir: str = "${oc.env:NFVI_DATA,./data}"
    output_dir: str = "outputs"


OPTIMIZERS = {"rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam, "adamax": torch.optim.Adamax}


def store(name: str, node, group: str | None = None) -> None:
    """Register a schema ``node`` under ``name`` (and ``group``) in Hydra's ConfigStore."""
    ConfigStore.instance().store(name=name, node=node, group=group)


store("base_flow", FlowConfig, group="flow")
store("base_optim", OptimConfig, group="optim")
store("base_paths", PathsConfig, group="paths")


def flow_from_config(cfg: FlowConfig | DictConfig, dim: int, context_dim: int = 0) -> Flow:
    """``build_flow`` with the options of ``cfg`` that apply to its kind.

    ``context_dim`` is the width of the features the flow may read (0: none); with ``flow.amortized=false``
    the flow ignores them and keeps global parameters.
    """
    check_choice("flow", cfg.kind, FLOW_KINDS)
    context_dim = context_dim if getattr(cfg, "amortized", True) else 0
    options = {}
    if cfg.kind == "nice":
        options = {"hidden": cfg.hidden, "mix": cfg.mix}
    elif cfg.kind == "planar" and context_dim > 0:
        options = {"w_floor": cfg.w_floor}
    return build_flow(cfg.kind, dim, cfg.length, context_dim=context_dim, **options)


def optimizer_from_config(cfg: OptimConfig | DictConfig, params, flow_params=()) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.name`` with its settings, over ``params``.

    Those of ``params`` that are also in ``flow_params`` (the flow's own parameters) form a second group
    with learning rate ``cfg.lr * cfg.flow_lr_factor`` when the factor is not 1. Why: with Adam, a flow head
    that computes each layer's parameters from 400 encoder features moves them by up to ~400 * lr per
    update; at lr 1e-3 that held amortized planar flows back (docs/mnist.md, "The flow's learning rate").
    """
    check_choice("optim.name", cfg.name, OPTIMIZERS)
    check_range("optim.lr", cfg.lr, low=0.0, kind="a positive learning rate")
    factor = getattr(cfg, "flow_lr_factor", 1.0)
    check_range("optim.flow_lr_factor", factor, low=0.0, kind="a multiplier of optim.lr")
    kwargs = {"lr": cfg.lr, "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    if cfg.name == "rmsprop":
        kwargs["momentum"] = cfg.momentum
    params = list(params)
    flow_ids = {id(p) for p in flow_params}
    if factor != 1.0 and flow_ids:
        groups = [
            {"params": [p for p in params if id(p) not in flow_ids]},
            {"params": [p for p in params if id(p) in flow_ids], "lr": cfg.lr * factor},
        ]
        params = [g for g in groups if g["params"]]
    if cfg.name == "adam":
        # One fused kernel per step: 6x faster than the default per-tensor loop on the CPU for the MNIST model
        # (benchmarks/README.md). Same algorithm; older torch builds without it fall back to the loop.
        try:
            return OPTIMIZERS[cfg.name](params, fused=True, **kwargs)
        except (RuntimeError, TypeError):
            pass
    return OPTIMIZERS[cfg.name](params, **kwargs)


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
