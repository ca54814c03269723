"""What every training loop shares: the flow and optimizer factories of a config, the Eq. 20 inverse temperature,
the cosine learning-rate factor, the non-finite guard and the divergence guard.

The loops themselves stay in their task modules (``nfvi.energy.task``, ``nfvi.vae.task``, ``nfvi.cde.fit``).
"""

from __future__ import annotations

import logging
import math
import types

import torch
import torch.optim.optimizer as torch_optimizer
from omegaconf import DictConfig

from nfvi import kernels
from nfvi.config import FlowConfig, OptimConfig
from nfvi.errors import DivergenceError, NonFiniteLossError
from nfvi.flows import Flow, build_flow

__all__ = [
    "OPTIMIZERS",
    "beta_schedule",
    "DIVERGENCE_FACTOR",
    "check_divergence",
    "LossWindow",
    "check_finite",
    "divergence_limit",
    "clip_gradients",
    "match_state_layout",
    "step_with_norm",
    "compile_optimizer_step",
    "cosine_factor",
    "cosine_scheduler",
    "early_stop_due",
    "flow_from_config",
    "flow_options",
    "optimizer_from_config",
]

OPTIMIZERS = {"rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam, "adamax": torch.optim.Adamax}

log = logging.getLogger("nfvi.training")


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
    # ``optim.compile=true`` (RMSprop, Adamax): the step through torch.compile, one generated kernel
    # (:func:`compile_optimizer_step`).
    if cfg.name == "adam":
        try:
            return OPTIMIZERS[cfg.name](params, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # an older torch build or a device without the fused kernel
            pass
    if cfg.name == "adamax":
        kwargs["foreach"] = True
    optimizer = OPTIMIZERS[cfg.name](params, **kwargs)
    if getattr(cfg, "compile", False) and cfg.name != "adam":
        compile_optimizer_step(optimizer, what=f"optim.compile=true ({cfg.name})")
    return optimizer


class _CompiledStep:
    """``optimizer.step`` through ``torch.compile``, with the learning rates passed as tensors (see
    :func:`compile_optimizer_step`); eager when compiling fails on the first call."""

    def __init__(self, optimizer: torch.optim.Optimizer, what: str):
        self.optimizer, self.what, self.calls = optimizer, what, 0
        self.eager = optimizer.step  # the class's bound method, captured before the instance's step is replaced
        self.compiled = torch.compile(self.eager)
        first = optimizer.param_groups[0]["params"][0]
        self.lrs = [torch.zeros((), dtype=first.dtype, device=first.device) for _ in optimizer.param_groups]

    def __call__(self, closure=None):
        if closure is not None or self.compiled is None:
            return self.eager(closure)
        groups = self.optimizer.param_groups
        lrs = [group["lr"] for group in groups]
        for group, tensor, lr in zip(groups, self.lrs, lrs, strict=True):
            tensor.fill_(float(lr))
            group["lr"] = tensor
        try:
            return self.compiled()
        except Exception as err:  # noqa: BLE001 - any failure to compile (no C++ compiler, no cache folder, ...)
            if self.calls:
                raise  # it compiled and ran before: a real error of the step
            self.compiled = None
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            log.warning("%s: torch.compile failed (%s); the optimizer step runs eagerly", self.what, reason)
        finally:
            for group, lr in zip(groups, lrs, strict=True):
                group["lr"] = lr
            self.calls += 1
        return self.eager()


def compile_optimizer_step(optimizer: torch.optim.Optimizer, what: str = "optim.compile=true") -> None:
    """Make ``optimizer.step()`` run through ``torch.compile`` (``optim.compile=true``), in place.

    torch 2.14 has no fused RMSprop or Adamax kernel: their per-tensor and foreach steps make about seven
    memory-bound passes over each parameter-sized tensor. Compiled, the step is one generated loop per tensor
    (on the CPU: C++, which needs a C++ compiler; on a GPU: Triton): 14.5 against 6.0 ms per RMSprop step for the
    4.3 million parameters of Table 2's K=80 model on one CPU thread (docs/performance.md). The same algorithm;
    the parameters agree with the eager step's to float32 rounding. The first step compiles (seconds).

    The learning rates go in as tensors, filled from ``param_groups`` at each step (a float would be a constant of
    the compiled code and each new value a recompilation); between steps ``param_groups`` hold floats as before,
    so the trainer's decay, torch's LR schedulers and ``state_dict`` see what they always saw. Where the first
    step fails to compile, a warning names the reason and the step runs eagerly from then on.
    """
    runner = _CompiledStep(optimizer, what)
    # a bound method, as torch's LR schedulers expect (they wrap ``optimizer.step.__func__``)
    optimizer.step = types.MethodType(lambda self, closure=None: runner(closure), optimizer)


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


def step_with_norm(optimizer: torch.optim.Optimizer, params) -> torch.Tensor:
    """``optimizer.step()`` and the global gradient norm of ``params``, as ``clip_gradients(params, inf)`` before
    the step reports it (nothing is rescaled): the trainer's update without gradient clipping.

    For RMSprop on the CPU with one torch thread (nfvi's default ``threads=1``; float32 or float64, not centered,
    not maximize, no step hooks, the same parameters as ``params``) the step and the norm are one pass over each
    gradient (:func:`nfvi.kernels.rmsprop_step`: torch's per-tensor arithmetic on torch's own ``step``,
    ``square_avg`` and ``momentum_buffer``, so ``state_dict`` and resuming see what they always saw). The norm was
    a second pass over every gradient: 0.9 ms of Table 2's K=80 update (17 MB of gradients; docs/performance.md).
    Elsewhere, or with ``NFVI_KERNELS=0``: :func:`clip_gradients`, then ``optimizer.step()``.
    """
    params = list(params)
    work = _fused_rmsprop_work(optimizer, params)
    if work is None:
        norm = clip_gradients(params, float("inf"))
        optimizer.step()
        return norm
    total = 0.0
    for group, items in work:
        lr, alpha, eps = float(group["lr"]), group["alpha"], group["eps"]
        weight_decay, momentum = group["weight_decay"], group["momentum"]
        for p, state in items:
            if not state:  # torch's RMSprop._init_group
                state["step"] = torch.zeros((), dtype=_scalar_dtype())
                state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if momentum > 0:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            buf = state.get("momentum_buffer")
            total += kernels.rmsprop_step(
                p.detach(), p.grad, state["square_avg"], buf, lr, alpha, eps, weight_decay, momentum
            )
    return torch.tensor(math.sqrt(total), dtype=torch.float32)


def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give each optimizer state tensor its parameter's memory layout (the same values), in place: state loaded
    from a checkpoint written before the amortized flow heads were stored column-major is row-major, and
    :func:`step_with_norm`'s one-pass step needs the parameter's layout (elsewhere torch's step runs, slower)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype, device=value.device).copy_(value)


def _dense(t: torch.Tensor) -> bool:
    """True where ``t``'s elements fill its storage without gaps, in row-major order or (2-D) transposed."""
    return t.is_contiguous() or (t.dim() == 2 and t.t().is_contiguous())


def _scalar_dtype() -> torch.dtype:
    """The dtype of torch's optimizer step counters (``torch.optim.optimizer._get_scalar_dtype``)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _fused_rmsprop_work(optimizer, params) -> list | None:
    """``[(group, [(param, state), ...]), ...]`` where :func:`step_with_norm` can take ``optimizer``'s step in the
    compiled kernel; None where it cannot (another optimizer, more than one torch thread, a setting the kernel
    lacks, hooks, tensors off the CPU, not dense or not of one layout, ``params`` not the optimizer's
    parameters)."""
    if type(optimizer) is not torch.optim.RMSprop or torch.get_num_threads() != 1:
        return None  # the kernel runs on one thread; with more, torch's (parallel) step
    hooks = (optimizer, torch_optimizer)  # step hooks (the instance's, then the global ones) run only in step()
    names = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_global_optimizer_pre_hooks")
    if any(getattr(owner, name, None) for owner in hooks for name in (*names, "_global_optimizer_post_hooks")):
        return None
    work, seen = [], set()
    for group in optimizer.param_groups:
        if group["centered"] or group["maximize"] or group["differentiable"] or group["capturable"]:
            return None
        items = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse or torch.is_complex(p):
                return None
            state = optimizer.state[p]
            tensors = [p, p.grad, *(state[k] for k in ("square_avg", "momentum_buffer") if k in state)]
            if not kernels.usable(*tensors) or not _dense(p) or any(t.stride() != p.stride() for t in tensors):
                return None  # the kernel runs over the storage in memory order: the same dense layout for all
            items.append((p, state))
            seen.add(id(p))
        work.append((group, items))
    if seen != {id(p) for p in params if p.grad is not None}:
        return None
    return work


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


#: the divergence guard's factor: a bound more than this many nats per dimension, or this many times its own
#: magnitude, above its value at the start of the run has diverged (:func:`divergence_limit`)
DIVERGENCE_FACTOR = 10.0


def divergence_limit(reference: float, num_dims: int, factor: float = DIVERGENCE_FACTOR) -> float:
    """The largest plausible value of a per-example bound (nats) that was ``reference`` at the start of the run.

    ``reference + factor * max(|reference|, num_dims)``: a -ELBO or NLL that grew by more than ``factor`` nats per
    dimension of the data (``num_dims``: pixels of an image, the width of y), or by ``factor`` times its own
    starting magnitude when that is larger, is not a slow fit but a diverged one. (A Bernoulli image model
    at 10 nats per pixel above its start gives each observed pixel a probability ~e^-10 less than a random
    initialisation does.) Works for bounds of either sign (the densities of continuous data can be negative).
    """
    return float(reference) + factor * max(abs(float(reference)), float(num_dims))


def check_divergence(value, reference, num_dims: int, step: int, where=None, what: str = "the training bound"):
    """The divergence guard: raise :class:`DivergenceError` if ``value`` exceeds :func:`divergence_limit`.

    ``value``: a logged per-example bound (a metrics row's mean, a validation or test bound; never read from the
    device per update); ``reference``: its value at the run's first update (None: no check, only the non-finite
    guard :func:`check_finite`). ``where`` as in :func:`check_finite`.
    """
    check_finite(value, step, where, what)
    if reference is None:
        return
    value, limit = float(value), divergence_limit(reference, num_dims)
    if value > limit:
        where = where() if callable(where) else where
        kept = f"; {where}" if where else ""
        raise DivergenceError(
            f"{what} diverged at step {step}: {value:.6g} nats, above the plausible limit {limit:.6g} (its value "
            f"at the start, {float(reference):.6g}, + {DIVERGENCE_FACTOR:g} x max(|that|, {num_dims} dims)); the "
            f"learning rate (optim.lr) may be too high; stopping{kept}"
        )


class LossWindow:
    """Per-update scalars (the loss, ...) summed between two log points, with the non-finite guard.

    ``add(step, loss=..., grad_norm=...)`` once per update; ``read()`` at a log point returns each value's mean
    (``maximum`` names: the maximum) over the updates since the last read, and starts a new window; ``check()``
    runs the guard alone (before a checkpoint is written).

    Reading a tensor's value makes the host wait for the device (a synchronisation per update on a GPU). So on
    an accelerator (``defer=True``, the default for a non-CPU device) the sums stay on the device, in float64,
    and the guard runs at ``read``/``check``: it raises :class:`NonFiniteLossError` naming the first update
    whose value in ``checked`` was NaN or inf, so a loop that calls ``check`` before every checkpoint never
    saves a state reached through a non-finite loss. On the CPU (``defer=False``) a read costs nothing: each
    value is read and checked at its own update, and the loop stops there.

    Args:
        names: the values, in the order they are checked (the first non-finite one at the earliest step is named).
        labels: what the error calls each name (``{"loss": "the loss"}``); default the name.
        checked: the names the guard watches (default all).
        maximum: the names reduced by their maximum instead of their mean.
        device: where the values live.
        where: what a stopped run keeps (a string or a function returning one), for the error message.
    """

    def __init__(self, names, device, *, labels=None, checked=None, maximum=(), where=None, defer=None):
        self.names, self.labels = tuple(names), dict(labels or {})
        self.checked = tuple(n for n in self.names if checked is None or n in checked)
        self.maximum = set(maximum)
        self.device, self.where = torch.device(device), where
        self.defer = self.device.type != "cpu" if defer is None else bool(defer)
        self._reset()

    def _reset(self) -> None:
        self.n = 0
        self.first_step = None  # the step of the window's first update
        if self.defer:
            size = len(self.names)
            self._sum = torch.zeros(size, dtype=torch.float64, device=self.device)
            self._max = torch.full((size,), -math.inf, dtype=torch.float64, device=self.device)
            self._ok = torch.ones(size, dtype=torch.bool, device=self.device)
            self._ok_count = torch.zeros(size, dtype=torch.int64, device=self.device)
        else:
            self._values = {n: 0.0 for n in self.names}

    def add(self, step: int, **values) -> None:
        """Record update ``step``'s values, one per name: 0-dim tensors on the device (floats too when not deferred).

        Steps are consecutive within a window (the guard names ``first step + updates before the bad one``).
        """
        if self.first_step is None:
            self.first_step = step
        self.n += 1
        if not self.defer:
            for name in self.names:
                value = float(values[name])
                if name in self.checked:
                    check_finite(value, step, self.where, what=self.labels.get(name, name))
                if name in self.maximum:
                    self._values[name] = value if self.n == 1 else max(self._values[name], value)
                else:
                    self._values[name] += value
            return
        v = torch.stack([values[n].detach().reshape(()) for n in self.names]).to(torch.float64)
        self._sum += v
        torch.maximum(self._max, v, out=self._max)
        self._ok &= torch.isfinite(v)
        self._ok_count += self._ok  # per name: the updates before its first non-finite value

    def check(self) -> None:
        """Raise :class:`NonFiniteLossError` if a checked value of this window was not finite (one host read)."""
        if not self.defer or self.n == 0 or not self.checked:
            return
        counts = self._ok_count.tolist()
        bad = [(counts[self.names.index(n)], j) for j, n in enumerate(self.checked)]
        bad = [b for b in bad if b[0] < self.n]
        if bad:
            count, j = min(bad)
            name = self.checked[j]
            value = float(self._sum[self.names.index(name)])
            value = value if not math.isfinite(value) else math.nan
            check_finite(value, self.first_step + count, self.where, what=self.labels.get(name, name))

    def read(self) -> dict[str, float]:
        """The window's means (or maxima), after :meth:`check`; starts a new window. Empty window: NaNs."""
        self.check()
        n = self.n
        if self.defer:
            sums, maxima = self._sum.tolist(), self._max.tolist()
            out = {k: (maxima[i] if k in self.maximum else sums[i] / n) if n else math.nan
                   for i, k in enumerate(self.names)}  # fmt: skip
        else:
            out = {k: (v if k in self.maximum else v / n) if n else math.nan for k, v in self._values.items()}
        self._reset()
        return out
