"""A base distribution pushed through a flow, as a ``torch.distributions.Distribution``.

``q_K = FlowDistribution(q_0, flow, context)`` samples ``z_K = f_K o ... o f_1(z_0)``, ``z_0 ~ q_0``, and
scores points by the change of variables (paper Eq. 7)::

    log q_K(z_K) = log q_0(z_0) - sum_k log|det df_k/dz_{k-1}|

Along the sampling path (:meth:`FlowDistribution.rsample_and_log_prob`) this is exact for every flow;
:meth:`FlowDistribution.log_prob` at an arbitrary point first inverts the flow (``flow.inverse``), which
every kind but Sylvester supports. Re-exported from :mod:`nfvi.flows`.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, constraints

from nfvi.checks import check_context

if TYPE_CHECKING:
    from nfvi.flows import Flow

__all__ = ["FlowDistribution"]


class FlowDistribution(Distribution):
    """``q_K``: ``base`` (event shape ``(D,)``) pushed through ``flow`` (optionally amortized on ``context``).

    ``batch_shape`` is the base's batch shape, broadcast with ``context.shape[:-1]`` for an amortized flow
    (``flow.context_dim > 0``); ``event_shape`` is ``(D,)``. Samples are reparameterised (``has_rsample``). An
    unbatched base against a batched context is expanded to the broadcast batch shape (one independent ``z_0`` per
    context row). :meth:`expand` gives the same flow over a larger batch shape. :meth:`entropy` raises: a flow's
    entropy has no closed form; ``-q.rsample_and_log_prob((n,))[1].mean(0)`` is its Monte Carlo estimate.
    ``q.to_pyro()`` (:func:`nfvi.pyro.to_pyro`, needs pyro-ppl) is the same ``q_K`` for ``pyro.sample``.

    Args:
        base: a distribution with event shape ``(D,)``, e.g. ``Independent(Normal(mu, sigma), 1)``.
        flow: an :class:`nfvi.flows.Flow` on R^D.
        context: ``(*batch, C)`` features for an amortized flow; ignored by a global one.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, base: Distribution, flow: Flow, context: Tensor | None = None, validate_args=None):
        if not isinstance(base, Distribution):
            raise TypeError(
                f"FlowDistribution's base must be a torch.distributions.Distribution with event shape (D,), "
                f"got {type(base).__name__}"
            )
        if not (isinstance(flow, nn.Module) and isinstance(getattr(flow, "dim", None), int)):  # an nfvi Flow
            raise TypeError(
                f"FlowDistribution's flow must be an nfvi.flows.Flow (from build_flow), got {type(flow).__name__}"
            )
        if len(base.event_shape) != 1:
            raise ValueError(f"FlowDistribution needs a base with event shape (D,), got {tuple(base.event_shape)}")
        if base.event_shape[0] != flow.dim:
            raise ValueError(
                f"FlowDistribution's base has event shape {tuple(base.event_shape)} but its flow "
                f"({type(flow).__name__}) is on R^{flow.dim}; expected a base with event shape ({flow.dim},)"
            )
        self.base, self.flow, self.context = base, flow, context
        batch_shape = base.batch_shape
        if getattr(flow, "context_dim", 0) > 0:  # the context's width and batch shape, as the flow will see them
            check_context(flow, base.batch_shape + base.event_shape, context, name="base sample")
            batch_shape = torch.broadcast_shapes(batch_shape, context.shape[:-1])
        super().__init__(batch_shape, base.event_shape, validate_args=validate_args)
        # the base as sampled: over the whole batch shape (an unbatched base against a batched context)
        self._base = base if base.batch_shape == batch_shape else base.expand(batch_shape)

    def expand(self, batch_shape, _instance=None) -> FlowDistribution:
        """The same ``q_K`` over ``batch_shape`` (the current batch shape must broadcast to it): the base is
        expanded, and an amortized flow's context expanded to ``(*batch_shape, C)``."""
        batch_shape = torch.Size(batch_shape)
        try:
            fits = torch.broadcast_shapes(self.batch_shape, batch_shape) == batch_shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"FlowDistribution.expand: batch shape {tuple(self.batch_shape)} does not broadcast to "
                f"{tuple(batch_shape)}"
            )
        context = self.context
        if context is not None and getattr(self.flow, "context_dim", 0) > 0:
            context = context.expand(*batch_shape, context.shape[-1])
        return type(self)(self._base.expand(batch_shape), self.flow, context, validate_args=self._validate_args)

    def to_pyro(self) -> FlowDistribution:
        """This distribution for ``pyro.sample`` (:class:`nfvi.pyro.PyroFlowDistribution`; needs pyro-ppl): the same
        base, flow and context, nothing copied."""
        cls = pyro_flow_distribution()
        if isinstance(self, cls):
            return self
        return cls(self.base, self.flow, self.context, validate_args=self._validate_args)

    def entropy(self) -> Tensor:
        raise NotImplementedError(
            "FlowDistribution has no closed-form entropy; estimate it by Monte Carlo as "
            "-q.rsample_and_log_prob((n,))[1].mean(0)"
        )

    def __repr__(self) -> str:
        flow = f"{type(self.flow).__name__}({self.flow.extra_repr()})"
        return (
            f"FlowDistribution(base={self.base!r}, flow={flow}, batch_shape={tuple(self.batch_shape)}, "
            f"event_shape={tuple(self.event_shape)})"
        )

    def rsample_and_log_prob(self, sample_shape: torch.Size | tuple = ()) -> tuple[Tensor, Tensor]:
        """``(z_K, log q_K(z_K))``, shapes ``(*sample_shape, *batch_shape, D)`` and ``(*sample_shape, *batch_shape)``.

        Exact for every kind: ``log q_0(z_0) - log_det`` along the sampling path (Eq. 7), no inverse.
        """
        z0 = self._base.rsample(sample_shape)
        z_k, log_det = self.flow(z0, self.context)
        shape = self._extended_shape(sample_shape)
        return z_k.expand(shape), (self._base.log_prob(z0) - log_det).expand(shape[:-1])

    def rsample(self, sample_shape: torch.Size | tuple = ()) -> Tensor:
        return self.rsample_and_log_prob(sample_shape)[0]

    def sample(self, sample_shape: torch.Size | tuple = ()) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        """``log q_K(value)`` at any point: ``z_0 = flow.inverse(value)``, then the forward pass for the log-det.

        Raises ``NotImplementedError`` for flows without an inverse (Sylvester).
        """
        if self._validate_args:
            self._validate_sample(value)
        z0, overflow = self.flow.inverse_with_overflow(value, self.context)
        base_lp = self._base.log_prob(z0)
        # -inf far from the mass, never NaN: where the preimage overflowed, or where log q_0 is already -inf (a
        # preimage so large that -z_0^2 / 2 is below the most negative float; every kind's |log det| grows at most
        # linearly in |z_0|), log q_K is -inf; the forward pass then runs on 0 there, so no NaN reaches it.
        far = overflow | ((base_lp == -math.inf) & ~torch.isnan(z0).any(-1))
        if torch.is_grad_enabled() and base_lp.requires_grad and bool(far.any()):
            # again with the far points at 0, so that no inf enters autograd's graph (a zero gradient times an
            # infinite local derivative would make every parameter's gradient NaN); their result stays -inf
            z0, _ = self.flow.inverse_with_overflow(torch.where(far.unsqueeze(-1), 0.0, value), self.context)
            base_lp = self._base.log_prob(z0)
        _, log_det = self.flow(torch.where(far.unsqueeze(-1), 0.0, z0), self.context)
        return torch.where(far, -math.inf, base_lp - log_det)


@functools.cache
def pyro_flow_distribution() -> type:
    """The class :class:`nfvi.pyro.PyroFlowDistribution`, made on first use (pyro-ppl is optional): a
    :class:`FlowDistribution` with pyro's ``TorchDistributionMixin`` that remembers its last sample's ``log q_K``."""
    try:
        from pyro.distributions.torch_distribution import TorchDistributionMixin
    except ImportError as error:
        raise ImportError("nfvi's pyro adapter needs pyro-ppl: pip install 'nfvi[pyro]'") from error

    class PyroFlowDistribution(FlowDistribution, TorchDistributionMixin):
        """A :class:`FlowDistribution` that ``pyro.sample`` accepts (same arguments and shapes).

        It remembers its last sample and that sample's ``log q_K`` (exact, along the sampling path, Eq. 7), so
        ``log_prob`` of the very tensor it just drew (what ``Trace_ELBO`` scores in a guide) needs no inverse: a
        Sylvester flow works as a guide too. Any other point goes through :meth:`FlowDistribution.log_prob`.
        """

        _last: tuple[Tensor, Tensor] | None = None

        def rsample_and_log_prob(self, sample_shape: torch.Size | tuple = ()) -> tuple[Tensor, Tensor]:
            z, log_q = super().rsample_and_log_prob(sample_shape)
            self._last = (z, log_q)
            return z, log_q

        def log_prob(self, value: Tensor) -> Tensor:
            if self._last is not None and value is self._last[0]:
                return self._last[1]
            return super().log_prob(value)

    PyroFlowDistribution.__module__ = "nfvi.pyro"
    return PyroFlowDistribution
