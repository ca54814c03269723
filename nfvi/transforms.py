"""The maths of each flow layer, as ``torch.distributions.Transform`` objects.

A transform holds already-constrained parameter tensors and knows nothing of where they came
from (a global ``nn.Parameter`` or an encoder head, see :mod:`nfvi.flows`). Every transform maps
the sampling direction z_{k-1} -> z_k (paper Eq. 6) and returns, with the output, the
log-absolute-determinant of its Jacobian (``ladj``) of shape ``z.shape[:-1]``.

Shapes: ``z`` is ``(*sample, *batch, D)``; a parameter of one layer is ``(*batch, P)`` and
broadcasts against ``z`` from the right, so global parameters are simply ``(P,)``.

Planar and radial flows have no closed-form inverse; their ``_inverse`` raises. Compute
log q_K along the sampling path (Eq. 7), never through an inverse cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Transform, constraints

__all__ = [
    "FlowTransform",
    "PlanarTransform",
    "RadialTransform",
    "AdditiveCouplingTransform",
    "planar_u_hat",
    "planar_ladj",
    "planar_chain",
    "log_softplus",
]


def log_softplus(x: Tensor) -> Tensor:
    """``log(softplus(x))`` without underflow: equals ``x`` to float precision below -20."""
    safe = torch.clamp(x, min=-20.0)
    return torch.where(x < -20.0, x, torch.log(F.softplus(safe)))


def log_sech2(a: Tensor) -> Tensor:
    """``log(1 - tanh(a)^2) = 2 (log 2 - |a| - softplus(-2|a|))``, finite for any finite ``a``."""
    a = a.abs()
    return 2.0 * (math.log(2.0) - a - F.softplus(-2.0 * a))


def planar_u_hat(u: Tensor, w: Tensor) -> Tensor:
    """Appendix A.1: ``u_hat = u + (m(w.u) - w.u) w / ||w||^2`` with ``m(x) = -1 + softplus(x)``.

    Uses the identity ``m(x) - x = softplus(-x) - 1`` so that large ``|w.u|`` loses no precision.
    Guarantees ``w . u_hat = m(w.u) > -1``, hence an invertible layer. Shapes ``(*, D)``.
    Note the **squared** norm (dividing by ``||w||`` is a known bug, docs/paper.md section 7).
    """
    wu = (w * u).sum(-1, keepdim=True)
    return u + (F.softplus(-wu) - 1.0) * w / (w * w).sum(-1, keepdim=True)


def planar_ladj(a: Tensor, h: Tensor, wu: Tensor) -> Tensor:
    """Planar ``log|det|`` from ``a = w^T z + b``, ``h = tanh(a)`` and ``wu = w^T u`` (see :class:`PlanarTransform`).

    Elementwise, so it also takes every layer at once (``a``, ``h``: ``(..., K)``; ``wu``: ``(*batch, K)``).
    """
    log_h2 = torch.log(torch.clamp(h * h, min=1e-30))
    return torch.logaddexp(log_h2, log_sech2(a) + log_softplus(wu))


def _chain(z: Tensor, w: Tensor, u_hat: Tensor, b: Tensor, inputs=None, activations=None) -> tuple[Tensor, Tensor]:
    """The K updates ``a_k = w_k.z + b_k``, ``z <- z + u_k tanh(a_k)``: ``(z_K, a)``; optionally collects each
    layer's input z and ``tanh(a_k)`` into the lists ``inputs`` and ``activations`` (for the backward pass)."""
    pre = []
    for w_k, u_k, b_k in zip(w.unbind(-2), u_hat.unbind(-2), b.unbind(-1), strict=True):
        if inputs is not None:
            inputs.append(z)
        a = (z * w_k).sum(-1) + b_k
        h = torch.tanh(a)
        z = torch.addcmul(z, u_k, h.unsqueeze(-1))
        pre.append(a)
        if activations is not None:
            activations.append(h)
    return z, torch.stack(pre, -1)


class _PlanarChain(torch.autograd.Function):
    """K planar updates ``a_k = w_k.z + b_k``, ``z <- z + u_k tanh(a_k)`` with a hand-written backward.

    One autograd node for the whole chain instead of ~6 per layer: the per-layer tensors are small
    (e.g. 100 x 40), so the time is in per-operation overhead, not arithmetic. First-order only.
    """

    @staticmethod
    def forward(ctx, z, w, u_hat, b):
        zs, act = [], []
        z_k, pre = _chain(z, w, u_hat, b, inputs=zs, activations=act)
        ctx.save_for_backward(w, u_hat, torch.stack(act, -1), *zs)
        ctx.shapes = (zs[0].shape, b.shape[:-1])
        return z_k, pre

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_z, g_pre):
        w, u_hat, h_all, *zs = ctx.saved_tensors
        z_shape, b_shape = ctx.shapes
        out_shape = torch.broadcast_shapes(zs[-1].shape, u_hat.shape[:-2] + u_hat.shape[-1:])
        g_z = torch.zeros(out_shape, dtype=w.dtype, device=w.device) if g_z is None else g_z
        num = h_all.shape[-1]
        g_w, g_u, g_b = [None] * num, [None] * num, [None] * num
        for k in reversed(range(num)):
            h, u_k, w_k = h_all[..., k], u_hat[..., k, :], w[..., k, :]
            g_u[k] = (g_z * h.unsqueeze(-1)).sum_to_size(u_k.shape)
            g_a = (g_z * u_k).sum(-1) * (1.0 - h * h)
            if g_pre is not None:
                g_a = g_a + g_pre[..., k]
            g_w[k] = (g_a.unsqueeze(-1) * zs[k]).sum_to_size(w_k.shape)
            g_b[k] = g_a.sum_to_size(b_shape)
            g_z = torch.addcmul(g_z, g_a.unsqueeze(-1), w_k)
        return g_z.sum_to_size(z_shape), torch.stack(g_w, -2), torch.stack(g_u, -2), torch.stack(g_b, -1)


def planar_chain(z: Tensor, w: Tensor, u_hat: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Apply K planar layers in turn: ``(z_K, a)`` with ``a = (a_1..a_K)`` of shape ``(*sample, *batch, K)``.

    ``w``, ``u_hat``: ``(*batch, K, D)`` (``u_hat`` already reparameterised), ``b``: ``(*batch, K)``.
    With gradients on, one autograd node (:class:`_PlanarChain`); otherwise a plain loop.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (z, w, u_hat, b)):
        return _PlanarChain.apply(z, w, u_hat, b)
    return _chain(z, w, u_hat, b)


class FlowTransform(Transform):
    """Base class: a bijection of R^D with ``call_and_ladj(z) -> (f(z), log|det df/dz|)``."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def call_and_ladj(self, z: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _call(self, z: Tensor) -> Tensor:
        return self.call_and_ladj(z)[0]

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.call_and_ladj(x)[1]

    def _inverse(self, y: Tensor) -> Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} has no closed-form inverse; compute log q_K along the sampling path"
        )


class PlanarTransform(FlowTransform):
    """Planar flow, paper Eq. 10-12: ``f(z) = z + u_hat tanh(w^T z + b)``.

    ``log|det| = log|1 + (1 - tanh^2(a)) w^T u_hat|`` with ``a = w^T z + b`` (Eq. 11-12). Since
    ``w^T u_hat = -1 + s`` with ``s = softplus(w^T u)``, the argument equals
    ``tanh^2(a) + (1 - tanh^2(a)) s > 0``; it is evaluated in log space so that it stays finite
    in float32 even when ``s`` underflows (adversarial ``u = -c w``).

    Args:
        u, w: ``(*batch, D)`` raw vectors (``u`` is reparameterised to ``u_hat`` here).
        b: ``(*batch,)`` bias.
    """

    def __init__(self, u: Tensor, w: Tensor, b: Tensor):
        super().__init__()
        self.w, self.b = w, b
        self.wu = (w * u).sum(-1)
        self.u_hat = planar_u_hat(u, w)

    def call_and_ladj(self, z: Tensor) -> tuple[Tensor, Tensor]:
        a = (z * self.w).sum(-1) + self.b
        h = torch.tanh(a)
        z_new = z + self.u_hat * h.unsqueeze(-1)
        return z_new, planar_ladj(a, h, self.wu)


class RadialTransform(FlowTransform):
    """Radial flow, paper Eq. 14: ``f(z) = z + beta h(alpha, r) (z - z0)``, ``h = 1/(alpha + r)``.

    Appendix A.2 reparameterisation: ``alpha = softplus(alpha')``, ``beta = -alpha + softplus(beta')``
    so ``beta >= -alpha``. With ``s = softplus(beta')`` the two factors of the determinant are
    ``1 + beta h = (r + s)/(alpha + r)`` and
    ``1 + beta h + beta h' r = (r (r + 2 alpha) + s alpha) / (alpha + r)^2``, both positive, so
    ``ladj = (D-1) [log(r+s) - log(alpha+r)] + log(r(r+2 alpha) + s alpha) - 2 log(alpha+r)``.

    Args:
        z0: ``(*batch, D)`` centre; alpha_raw, beta_raw: ``(*batch,)`` unconstrained scalars.
    """

    def __init__(self, z0: Tensor, alpha_raw: Tensor, beta_raw: Tensor):
        super().__init__()
        self.z0 = z0
        self.alpha = F.softplus(alpha_raw)
        self.s = F.softplus(beta_raw)
        self.beta = self.s - self.alpha

    def call_and_ladj(self, z: Tensor) -> tuple[Tensor, Tensor]:
        diff = z - self.z0
        r = torch.linalg.vector_norm(diff, dim=-1)
        alpha, s = self.alpha, self.s
        z_new = z + (self.beta / (alpha + r)).unsqueeze(-1) * diff
        log_ar = torch.log(alpha + r)
        d = z.shape[-1]
        ladj = (d - 1) * (torch.log(r + s) - log_ar) + torch.log(r * (r + 2 * alpha) + s * alpha) - 2 * log_ar
        return z_new, ladj


class AdditiveCouplingTransform(FlowTransform):
    """NICE additive coupling (Dinh et al. 2014): ``z_b <- z_b + m(z_a)``; volume preserving.

    Args:
        shift: callable mapping ``z[..., keep]`` (``(*, |keep|)``) to a shift ``(*, |change|)``.
        keep, change: index tensors splitting the D coordinates into the conditioning half
            and the half that is shifted.
    """

    def __init__(self, shift, keep: Tensor, change: Tensor):
        super().__init__()
        self.shift, self.keep, self.change = shift, keep, change

    def call_and_ladj(self, z: Tensor) -> tuple[Tensor, Tensor]:
        z_new = z.clone()
        z_new[..., self.change] = z[..., self.change] + self.shift(z[..., self.keep])
        return z_new, z.new_zeros(z.shape[:-1])

    def _inverse(self, y: Tensor) -> Tensor:
        z = y.clone()
        z[..., self.change] = y[..., self.change] - self.shift(y[..., self.keep])
        return z
