"""The 2-D model ``q_K = flow(N(mu, diag sigma^2))`` and its exact density at any point (by inversion)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions import Independent, Normal

from nfvi.distributions import FlowDistribution
from nfvi.flows import Flow

__all__ = ["EnergyModel", "log_density"]


class EnergyModel(nn.Module):
    """``q_K``: a diagonal Gaussian ``q_0 = N(mu, diag sigma^2)`` (learnable, global) pushed through ``flow``."""

    def __init__(self, flow: Flow, dim: int = 2):
        super().__init__()
        self.flow = flow
        self.mu = nn.Parameter(torch.zeros(dim))
        self.log_sigma = nn.Parameter(torch.zeros(dim))

    def base(self) -> Independent:
        return Independent(Normal(self.mu, self.log_sigma.exp()), 1)

    def forward(self, n: int) -> tuple[Tensor, Tensor]:
        """Draw ``n`` samples: ``(z_K (n, D), log q_K(z_K) (n,))`` along the sampling path (Eq. 7)."""
        base = self.base()
        z0 = base.rsample((n,))
        z_k, log_det = self.flow(z0)
        return z_k, base.log_prob(z0) - log_det


@torch.no_grad()
def log_density(model: EnergyModel, z_k: Tensor) -> Tensor:
    """Exact ``log q_K(z_K)`` at arbitrary points ``(*, D)``: each layer inverted (:meth:`nfvi.flows.Flow.inverse`),
    then the flow run forward for the log-det (:class:`nfvi.distributions.FlowDistribution`)."""
    return FlowDistribution(model.base(), model.flow).log_prob(z_k)
