"""nfvi flows as pyro distributions: ``pyro.sample("z", to_pyro(q))`` (or ``q.to_pyro()``), ``q`` a
:class:`nfvi.distributions.FlowDistribution`.

Needs pyro-ppl (``pip install 'nfvi[pyro]'``). :class:`PyroFlowDistribution` is a ``FlowDistribution`` with pyro's
``TorchDistributionMixin`` (callable, ``event_dim``, ``to_event``, ``mask``, ``expand_by``, ...). It remembers its
last sample and that sample's ``log q_K`` (exact, along the sampling path, Eq. 7), so ``log_prob`` of the very
tensor it just drew, which is what ``Trace_ELBO`` scores in a guide, needs no inverse: a Sylvester flow works as a
guide too. Any other point goes through ``FlowDistribution.log_prob`` (the flow's inverse; Sylvester raises).
Register the flow's parameters in the guide with ``pyro.module("flow", flow)``.
"""

from __future__ import annotations

from nfvi.distributions import FlowDistribution, pyro_flow_distribution

__all__ = ["PyroFlowDistribution", "to_pyro"]

PyroFlowDistribution = pyro_flow_distribution()


def to_pyro(q: FlowDistribution) -> FlowDistribution:
    """``q`` as a :class:`PyroFlowDistribution` (the same base, flow and context; nothing copied)."""
    if not isinstance(q, FlowDistribution):
        raise TypeError(f"to_pyro expects an nfvi FlowDistribution, got {type(q).__name__}")
    return q.to_pyro()
