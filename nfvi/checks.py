"""Argument checks of the Python API: one-line errors that name the argument, its shape and what was expected.

Every flow calls :func:`check_flow_input` at its entry (``forward`` and ``inverse``), and
:class:`nfvi.distributions.FlowDistribution` calls it at construction, so a point of the wrong width or a context
that does not fit fails there, in one line, rather than deep inside a matrix product. Shape checks only
(Python integers, no device synchronisation), so they cost nothing measurable on the hot path.

A bad value raises :class:`nfvi.errors.NfviError` (a ``ValueError``); a value of the wrong type ``TypeError``.
"""

from __future__ import annotations

from torch import Tensor

from nfvi.errors import NfviError

__all__ = ["check_context", "check_flow_input", "check_tensor", "shape_str"]


def shape_str(shape) -> str:
    """``(5, 3)`` for a shape (``(5,)`` for one dimension, ``()`` for none)."""
    return str(tuple(shape))


def check_tensor(name: str, value, expected: str) -> None:
    """``TypeError`` unless ``value`` is a tensor with at least one dimension; ``expected`` describes its shape."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(value).__name__}")
    if value.dim() == 0:
        raise NfviError(f"{name} has shape (); expected {expected}")


def _broadcasts(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether two batch shapes broadcast against each other from the right."""
    return all(m == n or m == 1 or n == 1 for m, n in zip(reversed(a), reversed(b), strict=False))


def check_flow_input(flow, z: Tensor, context: Tensor | None = None, name: str = "z") -> None:
    """The entry check of a flow (``flow.dim``, and ``flow.context_dim`` when amortized) on a point and its context.

    ``z`` must be ``(*sample, *batch, D)`` with ``D = flow.dim``; for an amortized flow (``context_dim = C > 0``)
    ``context`` must be ``(*batch, C)``, and its batch shape must broadcast against ``z``'s from the right. A global
    flow ignores any context. ``name``: the argument's name in the message (``z``, ``z_k``, ``value``).
    """
    dim = flow.dim
    check_tensor(name, z, f"(..., {dim})")
    if z.shape[-1] != dim:
        raise NfviError(
            f"{name} has shape {shape_str(z.shape)} but this {type(flow).__name__} is on R^{dim}; expected (..., {dim})"
        )
    check_context(flow, z.shape, context, name)


def check_context(flow, shape, context: Tensor | None, name: str = "z") -> None:
    """The context part of :func:`check_flow_input`, for points of ``shape`` ``(*sample, *batch, D)``."""
    context_dim = getattr(flow, "context_dim", 0)
    if context_dim == 0:
        return
    if context is None:
        raise NfviError(f"this {type(flow).__name__} is amortized (context_dim={context_dim}); pass context")
    check_tensor("context", context, f"(*batch, {context_dim})")
    if context.shape[-1] != context_dim:
        raise NfviError(
            f"context has shape {shape_str(context.shape)} but this {type(flow).__name__} reads "
            f"context_dim={context_dim} features; expected (*batch, {context_dim})"
        )
    n = context.dim() - 1
    if tuple(shape[-1 - n : -1]) != tuple(context.shape[:-1]) and not _broadcasts(shape[:-1], context.shape[:-1]):
        raise NfviError(
            f"{name} of shape {shape_str(shape)} and context of shape {shape_str(context.shape)} have batch shapes "
            f"{shape_str(shape[:-1])} and {shape_str(context.shape[:-1])} that do not broadcast; expected "
            f"{name} (*sample, *batch, {flow.dim}) with context (*batch, {context_dim})"
        )
