"""The previous training update and model code, frozen as a reference: nfvi as of c11e01b.

Before issue 18 the amortized planar flow ran the K layers as one autograd node with a per-layer loop of
about 17 small operations (forward and backward), the reparameterisation of ``u`` and the log-determinants
(with a ``1e-30`` clamp on ``tanh^2``) under autograd, gradients clipped with the per-tensor
``clip_grad_norm_``, RMSprop/Adamax on torch's default (per-tensor) path, the maxout max over windows of 4
consecutive values and the Bernoulli likelihood through ``torch.distributions``. This module keeps that code,
verbatim, so that

- ``benchmarks.run`` times the current update and importance sampling against it in the same run (``prev_*``
  and ``speedup_vs_prev`` columns);
- ``tests/test_benchmarks.py`` checks that 200 fixed-seed updates end with the same parameters (to float32
  rounding) on both paths.

::

    use_reference_code(model)                  # its planar flow, maxout layers and likelihood run the frozen code
    step = reference_step(model, params, opt)  # one update as Trainer.fit did it
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "RefPlanarChain",
    "ref_log_likelihood",
    "ref_maxout_forward",
    "ref_planar_forward",
    "reference_optimizer",
    "reference_step",
    "use_reference_code",
]


def _log_softplus(x: Tensor) -> Tensor:
    safe = torch.clamp(x, min=-20.0)
    return torch.where(x < -20.0, x, torch.log(F.softplus(safe)))


def _log_sech2(a: Tensor) -> Tensor:
    a = a.abs()
    return 2.0 * (math.log(2.0) - a - F.softplus(-2.0 * a))


def ref_planar_u_hat(u: Tensor, w: Tensor) -> Tensor:
    wu = (w * u).sum(-1, keepdim=True)
    return u + (F.softplus(-wu) - 1.0) * w / (w * w).sum(-1, keepdim=True)


def ref_planar_ladj(a: Tensor, h: Tensor, wu: Tensor) -> Tensor:
    log_h2 = torch.log(torch.clamp(h * h, min=1e-30))
    return torch.logaddexp(log_h2, _log_sech2(a) + _log_softplus(wu))


def _chain(z: Tensor, w: Tensor, u_hat: Tensor, b: Tensor, inputs=None, activations=None) -> tuple[Tensor, Tensor]:
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


class RefPlanarChain(torch.autograd.Function):
    """The previous ``nfvi.transforms._PlanarChain`` (one node, per-layer loop in forward and backward)."""

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


def ref_planar_forward(flow, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The previous ``PlanarFlow.forward``: ``(z_K, sum_k log|det J_k|)``."""
    u, w, b = flow._split(flow.raw_params(context))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (z, w, u, b)):
        z, pre = RefPlanarChain.apply(z, w, ref_planar_u_hat(u, w), b)
    else:
        z, pre = _chain(z, w, ref_planar_u_hat(u, w), b)
    return z, ref_planar_ladj(pre, torch.tanh(pre), (w * u).sum(-1)).sum(-1)


def ref_maxout_forward(self, x: Tensor) -> Tensor:
    """The previous ``nfvi.vae.model.Maxout.forward``."""
    return self.linear(x).unflatten(-1, (-1, self.window)).amax(-1)


def ref_log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
    """The previous ``VAE.log_likelihood``: ``torch.distributions`` (``Independent(Bernoulli(logits))``)."""
    return self.decode(z).log_prob(self.prepare(x))


def use_reference_code(model) -> None:
    """Make ``model`` (a :class:`nfvi.vae.model.VAE`) run the previous code: its planar flow (if any) runs
    :func:`ref_planar_forward`, its maxout layers :func:`ref_maxout_forward`, its likelihood
    :func:`ref_log_likelihood`."""
    from nfvi.flows import PlanarFlow
    from nfvi.vae.model import Maxout

    if isinstance(model.flow, PlanarFlow):
        model.flow.forward = types.MethodType(ref_planar_forward, model.flow)
    for module in model.modules():
        if isinstance(module, Maxout):
            module.forward = types.MethodType(ref_maxout_forward, module)
    model.log_likelihood = types.MethodType(ref_log_likelihood, model)


def reference_optimizer(name: str, params, lr: float, momentum: float = 0.0, eps: float = 1e-8):
    """The previous ``optimizer_from_config`` for rmsprop / adamax: torch's default (per-tensor on the CPU)."""
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, eps=eps)
    return torch.optim.Adamax(params, lr=lr, eps=eps, foreach=False)


def reference_step(model, params, optimizer, max_norm: float = float("inf")):
    """One update as the previous ``Trainer.fit`` did it: Eq. 20 loss, backward, ``clip_grad_norm_``, step.

    Returns ``step(x, beta) -> loss`` (a float: the previous loop read the loss back every update).
    """
    from nfvi.vae.objectives import annealed_loss, free_energy_terms

    def step(x: Tensor, beta: float) -> float:
        terms = free_energy_terms(model, x, num_samples=1)
        loss = annealed_loss(terms, beta, "eq20").mean()
        value = float(loss.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        optimizer.step()
        return value

    return step
