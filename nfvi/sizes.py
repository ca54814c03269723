"""Size bounds on the whole: estimate what one training update needs before anything is allocated.

Every size key is bounded on its own (``nfvi.config``), but sizes multiply: ``model.hidden=16384 model.layers=64``
passes key by key and needs ~2 TB. :func:`check_memory` builds the model on PyTorch's ``meta`` device (shapes
without storage: no memory, no compute), counts its parameters and the bytes of every tensor one forward pass on a
meta batch creates, and refuses in one line a config whose estimate exceeds the memory of the device it will run
on, naming the keys of the largest part (the model, the flow, or the batch)::

    bytes = 4 copies x parameters x itemsize  (weights, gradients and two optimizer states: Adam's moments,
                                               RMSprop's square average and momentum)
          + 2 x activations of one update      (the forward's outputs, kept for backward, and their gradients)

Long flows are not built layer by layer: the model is built with the flow at length 0, 1 and 2 and the count
extrapolated linearly in ``flow.length`` (every flow's layers have the same size); the activations likewise in the
batch (measured at one and two examples). Where a model cannot run on the meta device (a ``.item()`` inside its
forward, e.g. the Sylvester flows), the activations are left out and the parameters alone are checked.
The estimate is a lower bound on what the allocator will be asked for, so a refused config would not have fitted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from nfvi.errors import NfviError

__all__ = [
    "PARAM_COPIES",
    "Estimate",
    "available_memory",
    "check_memory",
    "estimate",
    "flow_size_keys",
    "format_bytes",
    "with_length",
]

log = logging.getLogger("nfvi.sizes")

#: copies of each parameter an update holds: the weights, their gradients and two optimizer states
PARAM_COPIES = 4
#: activations are counted twice: the forward's outputs (kept for backward) and their gradients
ACTIVATION_COPIES = 2


class _CountBytes(TorchDispatchMode):
    """Sum the bytes of every tensor an operation creates (views share storage and are not counted)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not getattr(func, "is_view", False):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.bytes += t.numel() * t.element_size()
        return out


class Estimate:
    """The memory one update needs: parameters (counts) and activations (bytes of one update at the given batch;
    None when the model cannot run on the meta device), each split into the ``model`` without its flow
    (flow length 0) and the ``flow``."""

    def __init__(self, params: dict[str, int], activations: dict[str, int] | None, itemsize: int):
        self.params, self.activations, self.itemsize = params, activations, itemsize

    @property
    def parameters(self) -> int:
        return sum(self.params.values())

    def parts(self) -> dict[str, int]:
        """Bytes of the ``model`` and of the ``flow``: parameters (with gradients and optimizer state) plus their
        share of the activations."""
        acts = self.activations or {}
        copies = PARAM_COPIES * self.itemsize
        return {k: copies * self.params[k] + ACTIVATION_COPIES * acts.get(k, 0) for k in ("model", "flow")}

    @property
    def activation_bytes(self) -> int:
        return ACTIVATION_COPIES * sum((self.activations or {}).values())

    @property
    def bytes(self) -> int:
        return sum(self.parts().values())


def _created_bytes(forward: Callable, n: int) -> int | None:
    """Bytes the meta ``forward(n)`` creates (None: it cannot run on the meta device)."""
    counter = _CountBytes()
    try:
        with torch.device("meta"), counter:
            forward(n)
    except Exception:  # a data-dependent op (.item(), a bisection): no activation estimate
        return None
    return counter.bytes


def estimate(make: Callable, length: int, batch: int, limit: float | None = None) -> Estimate:
    """Estimate an update of the model ``make(length) -> (module, forward)`` builds (``forward(n)`` runs one update's
    forward pass over ``n`` examples).

    ``make`` is called on the meta device with the flow's length 0, 1 and 2 (at most ``length``), ``forward`` with 1
    and 2 examples; parameters and activations are extrapolated linearly from one layer on to ``length`` layers
    and to ``batch`` examples.
    ``limit``: bytes beyond which the parameters alone settle it (the forwards are then skipped: activations None).
    """
    built = {}
    for k in sorted({0, min(length, 1), min(length, 2)}):
        with torch.device("meta"):
            built[k] = make(k)

    def at_length(values: dict[int, float]) -> float:  # linear in the flow's length from one layer on (a flow may
        if length <= 1:  # hold parts shared by all its layers, e.g. the amortized IAF's context layer)
            return values[length]
        return values[1] + (values[2] - values[1]) * (length - 1)

    params = {k: sum(p.numel() for p in module.parameters()) for k, (module, _) in built.items()}
    itemsize = torch.get_default_dtype().itemsize
    est = Estimate({"model": params[0], "flow": round(at_length(params)) - params[0]}, None, itemsize)
    if limit is not None and est.bytes > limit:
        return est
    created = {k: [_created_bytes(forward, n) for n in (1, 2)] for k, (_, forward) in built.items()}
    if all(None not in pair for pair in created.values()):

        def at_batch(k: int) -> float:  # linear in the batch
            one, two = created[k]
            return one + max(two - one, 0) * (batch - 1)

        base = at_batch(0)
        full = at_length({k: at_batch(k) for k in created})
        est.activations = {"model": round(base), "flow": max(round(full - base), 0)}
    return est


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes the device has: a GPU's total memory, or the machine's physical memory (less a cgroup limit)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device.index or 0).total_memory)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(limit_file).read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return int(total)


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"


def check_memory(
    command: str,
    make: Callable,
    length: int,
    batch: int,
    keys: dict[str, dict[str, object]],
    device: torch.device | str = "cpu",
) -> Estimate:
    """Refuse (one :class:`NfviError` line) a config whose update needs more memory than ``device`` has.

    ``make``, ``length``, ``batch``: as :func:`estimate`. ``keys``: per part (``model``, ``flow``, ``batch``) the
    config keys that set its size with their values, named in the message for the largest part. Returns the
    estimate (logged at debug level).
    """
    have = available_memory(device)
    est = estimate(make, length, batch, limit=have)
    log.debug("nfvi %s: %d parameters, about %s per update", command, est.parameters, format_bytes(est.bytes))
    if est.bytes <= have:
        return est
    parts = est.parts()
    named = dict(keys.get(max(parts, key=parts.get), {}))
    if est.activation_bytes > est.bytes / 2:  # mostly activations: the batch multiplies them
        named.update(keys.get("batch", {}))
    shown = ", ".join(f"{k}={v}" for k, v in named.items()) or "the size keys"
    weights = format_bytes(est.bytes - est.activation_bytes)
    acts = "" if est.activations is None else f", activations of one update {format_bytes(est.activation_bytes)}"
    raise NfviError(
        f"this config needs about {format_bytes(est.bytes)} of memory ({est.parameters:.4g} parameters: {weights} "
        f"with gradients and optimizer state{acts}), more than the {format_bytes(have)} of "
        f"{torch.device(device).type} memory here; reduce {shown}"
    )


def flow_size_keys(flow_cfg, context_dim: int = 1) -> dict[str, object]:
    """The config keys that set the size of the flow ``flow_cfg`` (``flow.length`` and the options of its kind)."""
    from nfvi.training import flow_options

    sizes = ("hidden", "num_hidden", "num_householder", "num_vectors")
    options = flow_options(flow_cfg, context_dim)
    return {"flow.length": flow_cfg.length, **{f"flow.{k}": v for k, v in options.items() if k in sizes}}


def with_length(flow_cfg, length: int):
    """A copy of the flow config ``flow_cfg`` with ``length`` layers (for :func:`estimate`'s ``make``)."""
    from omegaconf import OmegaConf

    copy = OmegaConf.create(OmegaConf.to_container(flow_cfg, resolve=True))
    copy.length = length
    return copy
