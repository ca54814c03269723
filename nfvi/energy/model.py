"""The 2-D model ``q_K = flow(N(mu, diag sigma^2))`` and its exact density at any point (by inversion)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions import Independent, Normal

from nfvi.errors import NfviError
from nfvi.flows import Flow
from nfvi.transforms import AdditiveCouplingTransform, PlanarTransform, RadialTransform

__all__ = ["EnergyModel", "flow_inverse", "log_density"]


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


def _planar_inverse(t: PlanarTransform, y: Tensor, iters: int = 80) -> Tensor:
    """Solve ``y = z + u_hat tanh(w.z + b)`` for z. With ``a = w.z``: ``a + c tanh(a + b) = w.y``,
    ``c = w.u_hat > -1``, strictly increasing in ``a``, and ``|a - w.y| <= |c|``: bisection."""
    target = (y * t.w).sum(-1)
    c = (t.w * t.u_hat).sum(-1).expand_as(target)
    lo, hi = target - c.abs(), target + c.abs()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        above = mid + c * torch.tanh(mid + t.b) > target
        hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
    a = 0.5 * (lo + hi)
    return y - t.u_hat * torch.tanh(a + t.b).unsqueeze(-1)


def _radial_inverse(t: RadialTransform, y: Tensor) -> Tensor:
    """Solve ``y = z + beta (z - z0) / (alpha + r)``. The radius obeys ``r_y = r (r + s) / (alpha + r)``
    (``s = alpha + beta > 0``), a quadratic ``r^2 + (s - r_y) r - alpha r_y = 0`` with one root >= 0."""
    diff = y - t.z0
    r_y = torch.linalg.vector_norm(diff, dim=-1)
    alpha, s = t.alpha, t.s
    b = s - r_y
    disc = torch.sqrt(b * b + 4 * alpha * r_y)
    r = torch.where(b > 0, 2 * alpha * r_y / (b + disc), 0.5 * (disc - b))
    return t.z0 + diff * ((alpha + r) / (r + s)).unsqueeze(-1)


def flow_inverse(flow: Flow, z_k: Tensor) -> Tensor:
    """``z_0 = f_1^{-1} o ... o f_K^{-1}(z_K)`` for global planar, radial and NICE flows; ``(*, D)``."""
    z = z_k
    for transform in reversed(flow.transforms()):
        if isinstance(transform, PlanarTransform):
            z = _planar_inverse(transform, z)
        elif isinstance(transform, RadialTransform):
            z = _radial_inverse(transform, z)
        elif isinstance(transform, AdditiveCouplingTransform):
            z = transform._inverse(z)
        else:
            raise NfviError(f"no inverse for {type(transform).__name__}")
    return z


@torch.no_grad()
def log_density(model: EnergyModel, z_k: Tensor) -> Tensor:
    """Exact ``log q_K(z_K)`` at arbitrary points ``(*, D)``: invert the flow, then run it forward for the log-det."""
    z0 = flow_inverse(model.flow, z_k)
    _, log_det = model.flow(z0)
    return model.base().log_prob(z0) - log_det
