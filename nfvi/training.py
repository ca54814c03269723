"""What every training loop shares: the flow and optimizer factories of a config.

The loops themselves stay in their task modules (``nfvi.energy.task``, ``nfvi.vae.task``, ``nfvi.cde.fit``).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from nfvi.config import FlowConfig, OptimConfig
from nfvi.flows import Flow, build_flow

__all__ = ["OPTIMIZERS", "flow_from_config", "optimizer_from_config"]

OPTIMIZERS = {"rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam, "adamax": torch.optim.Adamax}


def flow_from_config(cfg: FlowConfig | DictConfig, dim: int, context_dim: int = 0) -> Flow:
    """``build_flow`` with the options of ``cfg`` that apply to its kind.

    ``context_dim`` is the width of the features the flow may read (0: none); with ``flow.amortized=false``
    the flow ignores them and keeps global parameters. Options per kind: docs/flows.md.
    """
    context_dim = context_dim if getattr(cfg, "amortized", True) else 0
    options = {}
    if cfg.kind == "nice":
        options = {"hidden": cfg.hidden, "mix": cfg.mix}
    elif cfg.kind == "planar" and context_dim > 0:
        options = {"w_floor": cfg.w_floor}
    elif cfg.kind == "iaf":
        options = {"hidden": cfg.hidden, "num_hidden": cfg.num_hidden}
    elif cfg.kind == "sylvester":
        options = {"variant": cfg.variant}
        if cfg.variant == "orthogonal":
            options["num_vectors"] = cfg.num_vectors
        elif cfg.variant == "householder":
            options["num_householder"] = cfg.num_householder
    return build_flow(cfg.kind, dim, cfg.length, context_dim=context_dim, **options)


def optimizer_from_config(cfg: OptimConfig | DictConfig, params, flow_params=()) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.name`` with its settings, over ``params``.

    Those of ``params`` that are also in ``flow_params`` (the flow's own parameters) form a second group
    with learning rate ``cfg.lr * cfg.flow_lr_factor`` when the factor is not 1. Why: with Adam, a flow head
    that computes each layer's parameters from 400 encoder features moves them by up to ~400 * lr per
    update; at lr 1e-3 that held amortized planar flows back (docs/mnist.md, "The flow's learning rate").
    """
    factor = getattr(cfg, "flow_lr_factor", 1.0)
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
