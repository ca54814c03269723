"""What every training loop shares: the flow and optimizer factories of a config, the Eq. 20 inverse temperature,
the cosine learning-rate factor and the non-finite guard.

The loops themselves stay in their task modules (``nfvi.energy.task``, ``nfvi.vae.task``, ``nfvi.cde.fit``).
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

from nfvi.config import FlowConfig, OptimConfig
from nfvi.errors import NonFiniteLossError
from nfvi.flows import Flow, build_flow

__all__ = [
    "OPTIMIZERS",
    "beta_schedule",
    "check_finite",
    "clip_gradients",
    "cosine_factor",
    "cosine_scheduler",
    "early_stop_due",
    "flow_from_config",
    "flow_options",
    "optimizer_from_config",
]

OPTIMIZERS = {"rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam, "adamax": torch.optim.Adamax}


def flow_options(cfg: FlowConfig | DictConfig, context_dim: int = 1) -> dict:
    """The ``build_flow`` options of ``cfg`` that apply to its kind (docs/flows.md), e.g. ``{"variant": ...}``."""
    if cfg.kind == "nice":
        return {"hidden": cfg.hidden, "mix": cfg.mix}
    if cfg.kind == "planar" and context_dim > 0:
        return {"w_floor": cfg.w_floor}
    if cfg.kind == "iaf":
        return {"hidden": cfg.hidden, "num_hidden": cfg.num_hidden}
    if cfg.kind == "sylvester":
        extra = {
            "orthogonal": {"num_vectors": cfg.num_vectors},
            "householder": {"num_householder": cfg.num_householder},
        }
        return {"variant": cfg.variant, **extra.get(cfg.variant, {})}
    return {}


def flow_from_config(cfg: FlowConfig | DictConfig, dim: int, context_dim: int = 0) -> Flow:
    """``build_flow`` with the options of ``cfg`` that apply to its kind (:func:`flow_options`).

    ``context_dim`` is the width of the features the flow may read (0: none); with ``flow.amortized=false``
    the flow ignores them and keeps global parameters.
    """
    context_dim = context_dim if getattr(cfg, "amortized", True) else 0
    return build_flow(cfg.kind, dim, cfg.length, context_dim=context_dim, **flow_options(cfg, context_dim))


def early_stop_due(step: int, best_step: int | None, t) -> bool:
    """Whether training stops at update ``step`` (early stopping, ``trainer.patience``; the Sylvester protocol).

    True when ``patience`` validations (``patience * val_every`` updates) have passed without a better validation
    -ELBO than the one at ``best_step``, counting from the end of the warm-up (``anneal_steps``; 0 without
    annealing). A pure function of the step and the best step, so a resumed run stops where an uninterrupted one does.
    """
    if t.patience <= 0 or best_step is None:
        return False
    warm = t.anneal_steps if t.annealing != "none" else 0
    return step >= warm and step - max(int(best_step), warm) >= t.patience * t.val_every


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
    # The fastest implementation torch has for each (measured with torch 2.14 on the CPU for the maxout MNIST model,
    # 4.3 million parameters; benchmarks/README.md, "Optimizer step"): Adam's fused kernel (one pass, ~4x faster
    # than the per-tensor loop); Adamax's foreach kernels; RMSprop has no fused kernel and its foreach path was no
    # faster on the CPU, so it keeps torch's default (per-tensor on the CPU, foreach on a GPU). Same algorithms.
    if cfg.name == "adam":
        try:
            return OPTIMIZERS[cfg.name](params, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # an older torch build or a device without the fused kernel
            pass
    if cfg.name == "adamax":
        kwargs["foreach"] = True
    return OPTIMIZERS[cfg.name](params, **kwargs)


def clip_gradients(params, max_norm: float) -> torch.Tensor:
    """The global gradient norm of ``params`` (a tensor: no host synchronisation), after scaling the gradients
    to at most ``max_norm`` (``inf``: only the norm; nothing is rescaled). Same result as
    ``torch.nn.utils.clip_grad_norm_``, on its foreach path (one kernel per dtype and device for the norms)."""
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads:
        return torch.tensor(0.0)
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm


def beta_schedule(step: int, beta0: float = 0.01, anneal_steps: int = 10000, anneal: bool = True) -> float:
    """Inverse temperature of update ``step`` (0-based), paper Eq. 20: ``beta_t = min(1, beta0 + t / anneal_steps)``.

    ``anneal=False`` or ``anneal_steps <= 0`` give 1 (no annealing). ``nfvi.energy.task.beta_at`` and
    ``nfvi.vae.objectives.beta_schedule`` are thin aliases with their commands' argument names.
    """
    if not anneal or anneal_steps <= 0:
        return 1.0
    return min(1.0, beta0 + step / anneal_steps)


def cosine_factor(step: int, span: int, final: float) -> float:
    """Learning-rate multiplier of a cosine decay from 1 (``step = 0``) to ``final`` (``step >= span``).

    ``final + (1 - final) * (1 + cos(pi * min(1, step / span))) / 2``; ``span <= 0`` gives 1. The VAE
    (``nfvi train``) uses ``span = steps - 1`` (its last update runs at ``final``); ``nfvi energy`` uses torch's
    :func:`cosine_scheduler`, whose closed form is this with ``span = steps`` (its last update runs just above
    ``final``). The two spans are kept so that every published number stays the same.
    """
    if span <= 0:
        return 1.0
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / span)))


def cosine_scheduler(optimizer: torch.optim.Optimizer, steps: int, eta_min: float):
    """torch's ``CosineAnnealingLR``: each group's lr decays to ``eta_min`` over ``steps`` updates (``nfvi energy``)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=eta_min)


def check_finite(value, step: int, where=None, what: str = "loss") -> None:
    """The non-finite guard of every loop: raise :class:`NonFiniteLossError` if ``value`` is NaN or inf.

    The one-line message names ``what``, its value and the ``step`` (``"<what> became nan at step 7; stopping"``),
    then ``where`` (what was kept, e.g. the last good checkpoint) when given: a string, or a function returning
    one (called only on failure).
    """
    value = float(value)
    if not math.isfinite(value):
        where = where() if callable(where) else where
        kept = f"; {where}" if where else ""
        raise NonFiniteLossError(f"{what} became {value} at step {step}; stopping{kept}")
