"""The maths of each flow layer, as ``torch.distributions.Transform`` objects.

A transform holds already-constrained parameter tensors and knows nothing of where they came
from (a global ``nn.Parameter`` or an encoder head, see :mod:`nfvi.flows`). Every transform maps
the sampling direction z_{k-1} -> z_k (paper Eq. 6) and returns, with the output, the
log-absolute-determinant of its Jacobian (``ladj``) of shape ``z.shape[:-1]``.

Shapes: ``z`` is ``(*sample, *batch, D)``; a parameter of one layer is ``(*batch, P)`` and
broadcasts against ``z`` from the right, so global parameters are simply ``(P,)``.

Inverses (``t.inv(y)``) are computed afresh at any point, never through a cache: planar by a
monotone 1-D root search, radial in closed form, NICE and Householder exactly, IAF by D sequential
passes. Sylvester layers have none (their ``_inverse`` raises; they cache their last forward pass, so
``TransformedDistribution`` can score its own sample); compute their log q_K along the sampling path (Eq. 7).

The fused planar and NICE chains (one autograd node for K layers) fall back to plain torch ops under
``torch.func`` transforms and ``torch.jit.trace``, and recompute differentiably under ``create_graph=True``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Transform, constraints

from nfvi import kernels

__all__ = [
    "FlowTransform",
    "PlanarTransform",
    "RadialTransform",
    "AdditiveCouplingTransform",
    "IAFTransform",
    "HouseholderTransform",
    "SylvesterTransform",
    "householder_matrix",
    "bjorck_orthonormalize",
    "BJORCK_STEPS",
    "planar_u_hat",
    "planar_ladj",
    "coupling_chain",
    "coupling_context_terms",
    "planar_chain",
    "planar_chain_ladj",
    "planar_chain_packed",
    "planar_split",
    "planar_w_floor",
    "log_softplus",
    "log1p_tanh_product",
    "log1p_scaled_sech2",
]


def log_softplus(x: Tensor) -> Tensor:
    """``log(softplus(x))`` without underflow: equals ``x`` to float precision below -20."""
    safe = torch.clamp(x, min=-20.0)
    return torch.where(x < -20.0, x, torch.log(F.softplus(safe)))


def log_sech2(a: Tensor) -> Tensor:
    """``log(1 - tanh(a)^2) = 2 (log 2 - |a| - softplus(-2|a|))``, finite for any finite ``a``."""
    a = a.abs()
    return 2.0 * (math.log(2.0) - a - F.softplus(-2.0 * a))


def log1p_tanh_product(x: Tensor, y: Tensor) -> Tensor:
    """``log(1 + tanh(x) tanh(y)) = log cosh(x + y) - log cosh(x) - log cosh(y)``, finite for any finite x, y
    (``1 + tanh x tanh y = cosh(x + y) / (cosh x cosh y) > 0``) even where ``tanh x tanh y`` rounds to -1."""

    def log_cosh(t: Tensor) -> Tensor:
        t = t.abs()
        return t + F.softplus(-2.0 * t) - math.log(2.0)

    return log_cosh(x + y) - log_cosh(x) - log_cosh(y)


def log1p_scaled_sech2(a: Tensor, h: Tensor, log1p_p: Tensor) -> Tensor:
    """``log(1 + p sech^2(a))`` for ``p > -1`` given as ``log1p_p = log(1 + p)``, and ``h = tanh(a)``: the log of
    one factor ``1 + p h'(a)`` of a planar (Eq. 11-12) or Sylvester determinant, with no clamp.

    Exact to a few ulps of the factor wherever the factor is representable, in two branches. Where
    ``x = p sech^2(a) >= -1/2``, ``log1p(x)`` (no cancellation; ``x`` is a product of accurately computed terms).
    Where ``x < -1/2`` (so ``p < -1/2`` and ``|a| < 0.89``) the factor is written as the positive combination
    ``tanh^2(a) + sech^2(a) (1 + p)`` and summed in log space, ``logaddexp(2 log|tanh a|, log sech^2(a) + log1p_p)``:
    both terms are accurate however small (``1 + p`` comes in as its log), so there is no floor (the old 1e-30
    clamp on ``tanh^2`` reported factors below it as 1e-30). At ``a = 0`` exactly, ``log tanh^2 = -inf`` and the
    factor is ``1 + p``; gradients stay finite there (neither branch's unused input reaches autograd).

    Shapes: any, broadcast together.
    """
    log_s = log_sech2(a)
    x = torch.expm1(log1p_p) * torch.exp(log_s)  # p sech^2(a) in [-1, inf)
    near = x < -0.5
    direct = torch.log1p(torch.where(near, torch.zeros_like(x), x))
    zero = h == 0
    log_h2 = torch.where(zero, -math.inf, 2.0 * torch.log(torch.where(zero, torch.ones_like(h), h).abs()))
    positive = torch.logaddexp(log_h2, log_s + log1p_p)
    return torch.where(near, positive, direct)


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
    return log1p_scaled_sech2(a, h, log_softplus(wu))  # 1 + u_hat^T psi = 1 + (softplus(wu) - 1) sech^2(a); no clamp


def _log_abs_tanh(a: Tensor, h: Tensor) -> Tensor:
    """``log|tanh a|`` without underflow, given ``h = tanh a``: ``log|a| - a^2 / 3`` where ``|a| < 1e-3`` (error
    < 1e-13); ``-inf`` at 0."""
    small = a.abs() < 1e-3
    return torch.where(small, a.abs().log() - a * a / 3.0, torch.where(small, 1.0, h).abs().log())


def _softplus_pair(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(softplus(x), softplus(-x))``, each exact to rounding, from one ``log1p(exp(-|x|))`` (torch's CPU
    ``log1p`` and ``softplus`` are scalar loops, so one shared pass instead of two or three). Where autograd
    records (the plain path), torch's softplus, whose derivative at 0 is 1/2 (``clamp``'s and ``abs``' are 0)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return F.softplus(x), F.softplus(-x)
    tail = torch.log1p(torch.exp(-x.abs()))
    return x.clamp(min=0.0) + tail, (-x).clamp(min=0.0) + tail


def _log_softplus(x: Tensor, sp: Tensor) -> Tensor:
    """``log softplus(x)`` given ``sp = softplus(x)``, exact to rounding for every finite x: ``x - exp(x) / 2``
    below -20 (error < 1e-18), where ``sp`` may underflow."""
    low = x < -20.0
    return torch.where(low, x - 0.5 * torch.exp(torch.clamp(x, max=-20.0)), torch.log(torch.where(low, 1.0, sp)))


def _planar_log_factor(a: Tensor, h: Tensor, wu: Tensor, sp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``log|1 + u_hat^T psi|`` of a planar layer (Eq. 11-12) from ``a = w^T z + b``, ``h = tanh a``, ``wu = w^T u``
    (raw u) and ``sp = softplus(wu)``; with it ``log|tanh a|`` and ``log sech^2 a``, which the backward reuses.

    The factor is ``tanh^2(a) + sech^2(a) softplus(wu)`` (both terms >= 0, see :class:`PlanarTransform`), so
    ``log factor = logaddexp(2 log|tanh a|, log sech^2 a + log softplus(wu))`` with each log taken without
    underflow: exact (to rounding) wherever the factor is representable, and finite beyond (no clamp).
    Elementwise and broadcasting; forward only (the chain's backward uses :func:`_planar_log_factor_grads`).
    """
    log_t, log_s = _log_abs_tanh(a, h), log_sech2(a)
    return torch.logaddexp(2.0 * log_t, log_s + _log_softplus(wu, sp)), log_t, log_s


def _planar_log_factor_grads(
    h: Tensor, sp: Tensor, spn: Tensor, log_f: Tensor, log_t: Tensor, log_s: Tensor
) -> tuple[Tensor, Tensor]:
    """``d log_f / d a`` and ``d log_f / d wu`` of :func:`_planar_log_factor`, finite everywhere, from its saved
    pieces (``h = tanh a``, ``sp = softplus(wu)``, ``spn = softplus(-wu)``, ``log_f``, ``log_t = log|tanh a|``,
    ``log_s = log sech^2 a``).

    With ``f = h^2 + s sp`` (``s = sech^2 a``): ``df/da = 2 h s (1 - sp)`` and ``df/dwu = s sigmoid(wu)``
    (``log sigmoid(wu) = -spn``); both are divided by ``f = exp(log_f)`` in log space (exponents <= ~0).
    """
    d_a = 2.0 * torch.sign(h) * (1.0 - sp) * torch.exp(log_t + log_s - log_f)
    d_wu = torch.exp(log_s - spn - log_f)
    return d_a, d_wu


def _plain() -> bool:
    """True where the fused chains must run as plain differentiable torch ops: inside a ``torch.func`` transform
    (vmap, grad, jacrev, ...) or ``torch.jit.trace``, which a hand-written autograd node with ``out=`` buffers
    does not support. The plain path is the same arithmetic (the same numbers), recorded op by op."""
    return torch._C._are_functorch_transforms_active() or torch.jit.is_tracing()


def _chain_forward(z0: Tensor, W: Tensor, U: Tensor, B: Tensor, keep: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """K planar updates in the chain's layout: ``z0 (N, S, D)``, layer-major ``W``, ``U`` ``(K, N, 1, D)`` and
    ``B (K, N, 1, 1)``. Returns ``z_K (N, S, D)``, ``a`` and ``h = tanh a`` ``(K, N, S, 1)``, and every layer's
    input ``z_k`` in one buffer ``(K + 1, N, S, D)`` (``keep``; otherwise two buffers in turn).

    Three small kernels per layer, each writing into a preallocated buffer (no allocation, no autograd):
    ``a_k = b_k + z_k w_k`` (a batched matrix product, ``baddbmm``), ``h_k = tanh a_k``, ``z_{k+1} = z_k + u_k h_k``.
    """
    k, (n, s, d) = W.shape[0], z0.shape
    WT = W.transpose(-1, -2)  # (K, N, D, 1)
    if _recording(z0, W, U, B):
        # out= kernels record no gradients: the same arithmetic, allocating
        if torch.is_autocast_enabled(z0.device.type):  # the flow's own product stays in z's dtype (as with out=)
            with torch.autocast(z0.device.type, enabled=False):
                return _chain_forward(z0, W, U, B, keep)
        zl, al, hl = [z0], [], []
        for wt_k, u_k, b_k in zip(WT.unbind(0), U.unbind(0), B.unbind(0), strict=True):
            al.append(torch.baddbmm(b_k, zl[-1], wt_k))
            hl.append(torch.tanh(al[-1]))
            zl.append(torch.addcmul(zl[-1], u_k, hl[-1]))
        return zl[-1], torch.stack(al), torch.stack(hl), torch.stack(zl)
    opts = {"dtype": z0.dtype, "device": z0.device}
    a, h = torch.empty(k, n, s, 1, **opts), torch.empty(k, n, s, 1, **opts)
    zs = torch.empty(k + 1 if keep else 2, n, s, d, **opts)
    zs[0] = z0
    zl, wtl, ul, bl, al, hl = (t.unbind(0) for t in (zs, WT, U, B, a, h))
    for i in range(k):
        z, nxt = (zl[i], zl[i + 1]) if keep else (zl[i % 2], zl[1 - i % 2])
        torch.baddbmm(bl[i], z, wtl[i], out=al[i])
        torch.addcmul(z, ul[i], torch.tanh(al[i], out=hl[i]), out=nxt)
    return zl[k if keep else k % 2], a, h, zs


def _recording(*tensors: Tensor) -> bool:
    """True where the chain must run as differentiable ops: :func:`_plain`, or autograd recording for ``tensors``."""
    return _plain() or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _broadcast_shapes(*shapes: torch.Size) -> torch.Size:
    """``torch.broadcast_shapes``, with equal shapes (the common case) answered without it (it costs tens of
    microseconds per call)."""
    return shapes[0] if all(s == shapes[0] for s in shapes[1:]) else torch.broadcast_shapes(*shapes)


def _chain_layout(z: Tensor, w: Tensor, u: Tensor, b: Tensor):
    """The chain's flattened layout: ``(k, d, n, s, batch, full, w3, u3, z0)`` with ``w3``, ``u3`` ``(N, K, D)``
    and ``z0 (N, S, D)`` (views where they can be), ``N`` the batch and ``S`` the sample elements; a batch axis
    of size 1 broadcasts against ``z``'s."""
    batch = _broadcast_shapes(w.shape[:-2], u.shape[:-2], b.shape[:-1])
    k, d = w.shape[-2:]
    full = _broadcast_shapes(z.shape[:-1], batch)
    sample, batch = full[: len(full) - len(batch)], full[len(full) - len(batch) :]
    n, s = math.prod(batch), math.prod(sample)
    w3, u3 = (t.expand(*batch, k, d).reshape(n, k, d) for t in (w, u))
    z0 = z.expand(*full, d).reshape(s, n, d).transpose(0, 1)
    return k, d, n, s, batch, full, w3, u3, z0


def _chain_outputs(z: Tensor, w: Tensor, u: Tensor, b: Tensor, ladj: bool, keep: bool = False):
    """``(z_K, second, saved, (batch, full))`` for :func:`planar_chain` (``ladj`` False: ``u`` is ``u_hat``,
    ``second`` is ``a``) and :func:`planar_chain_ladj` (``ladj`` True: ``u`` is the raw u, reparameterised here,
    ``second`` is the summed log-determinant). ``saved``: what the backward pass needs."""
    k, d, n, s, batch, full, w3, u3, z0 = _chain_layout(z, w, u, b)
    B = b.expand(*batch, k).reshape(n, k).T.reshape(k, n, 1, 1)
    rep = ()
    if ladj:  # Appendix A.1: u_hat = u + (softplus(-w.u) - 1) w / |w|^2 (as planar_u_hat)
        wu, q = (w3 * u3).sum(-1), (w3 * w3).sum(-1)
        sp, spn = _softplus_pair(wu)  # softplus(w.u), softplus(-w.u)
        c = spn - 1.0
        r = c / q
    if _recording(z, w, u, b):  # differentiable: views and out-of-place ops
        u_hat = torch.addcmul(u3, r.unsqueeze(-1), w3) if ladj else u3
        W, U = (t.unsqueeze(2).transpose(0, 1) for t in (w3, u_hat))
    else:  # layer-major copies (K, N, 1, D): a layer's rows side by side, for the loops and the backward's passes
        W, U = (t.transpose(0, 1).contiguous().unsqueeze(2) for t in (w3, u3))
        if ladj:
            u3, U = U.squeeze(2).transpose(0, 1), torch.addcmul(U, r.T.reshape(k, n, 1, 1), W)
    if ladj:
        rep = (u3, wu, q, c, r, sp, spn)
    z_k, a, h, zs = _chain_forward(z0, W, U, B, keep)
    if ladj:
        wu_k, sp_k = (t.T.reshape(k, n, 1, 1) for t in (rep[1], rep[5]))
        log_f, log_t, log_s = _planar_log_factor(a, h, wu_k, sp_k)  # (K, N, S, 1) each
        second = log_f.sum(0).view(n, s).T.reshape(full)
        rep = (*rep, log_f, log_t, log_s)
    else:
        second = a.view(k, n, s).permute(2, 1, 0).reshape(*full, k)
    z_k = z_k.transpose(0, 1).reshape(*full, d)
    return z_k, second, (W, U, h, zs, *rep), (batch, full)


def _compiled_outputs(z: Tensor, w: Tensor, u: Tensor, b: Tensor, keep: bool = False, w_floor: float | None = None):
    """:func:`_chain_outputs` with ``ladj`` through the compiled kernel (:mod:`nfvi.kernels`): the same
    ``(z_K, log_det, saved, (batch, full))``, with ``saved = (w_eff, u_hat, consts, zs, terms)`` (``keep``) for
    :func:`kernels.planar_backward`. ``w``, ``u`` and ``b`` are read in place (views of a parameter head's output
    need no copy); with ``w_floor``, ``w`` is raw and floored as :func:`planar_w_floor`."""
    k, d, n, s, batch, full, w3, u3, z0 = _chain_layout(z, w, u, b)
    w_eff, u_hat, consts = kernels.planar_reparam(w3, u3, w_floor)
    z_k, ladj, saved = kernels.planar_forward(z0, w_eff, b.expand(*batch, k).reshape(n, k), u_hat, consts, keep)
    saved = (w_eff, u_hat, consts, *saved) if keep else ()
    return z_k.transpose(0, 1).reshape(*full, d), ladj.T.reshape(full), saved, (batch, full)


def _use_kernel(ladj: bool, *tensors: Tensor) -> bool:
    """True where :func:`planar_chain_ladj` runs compiled: CPU float32 or float64 tensors, kernels available."""
    return ladj and kernels.usable(*tensors)


class _PlanarChain(torch.autograd.Function):
    """The K planar layers of :func:`planar_chain` / :func:`planar_chain_ladj` as one autograd node with a
    hand-written backward.

    Backward, from the last layer down, three small kernels per layer: ``g_a_k = (1 - h_k^2) u_k^T g_{z_{k+1}} + e_k``
    (``e_k`` from the second output) and ``g_{z_k} = g_{z_{k+1}} + g_a_k w_k``, each ``g_z`` kept in one buffer;
    then the gradients of all ``w``, ``u`` and ``b`` (through the reparameterisation of ``u`` when ``ladj``) in
    a few batched operations. Under ``create_graph=True`` (double backward) the backward instead recomputes the
    chain as plain differentiable ops and differentiates that (:func:`_recompute_grads`), so higher derivatives
    are exact and the first-order pass keeps its speed.
    """

    @staticmethod
    def forward(ctx, z, w, u, b, ladj):
        ctx.compiled = _use_kernel(ladj, z, w, u, b)
        with torch.no_grad():
            outputs = _compiled_outputs if ctx.compiled else functools.partial(_chain_outputs, ladj=ladj)
            z_k, second, saved, (batch, full) = outputs(z, w, u, b, keep=True)
        ctx.save_for_backward(z, w, u, b, *saved)
        ctx.meta = (z.shape, w.shape, u.shape, b.shape, batch, full, ladj)
        return z_k, second

    @staticmethod
    def backward(ctx, g_zk, g_second):
        inputs, saved = ctx.saved_tensors[:4], ctx.saved_tensors[4:]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain recomputation instead
            ladj = ctx.meta[-1]
            grads = _recompute_grads(lambda *t: _chain_outputs(*t, ladj)[:2], inputs, (g_zk, g_second))
            return (*grads, None)
        if ctx.compiled:
            return (*_compiled_grads(ctx.meta, inputs, saved, g_zk, g_second), None)
        W, U, h, zs, *rep = saved
        z_shape, w_shape, u_shape, b_shape, batch, full, ladj = ctx.meta
        k, n, s, d = zs.shape[0] - 1, *zs.shape[1:]
        gz = torch.empty_like(zs)  # gz[j] = dL/dz_j (gz[k]: at z_K)
        if g_zk is None:
            gz[k].zero_()
        else:
            gz[k] = g_zk.reshape(s, n, d).transpose(0, 1)
        extra = g_wu = None
        if g_second is not None and not ladj:
            extra = g_second.reshape(s, n, k).permute(2, 1, 0).unsqueeze(-1)  # (K, N, S, 1)
        elif g_second is not None:
            g_l = g_second.reshape(s, n).T.unsqueeze(-1)  # (N, S, 1)
            sp, spn = (t.T.reshape(k, n, 1, 1) for t in rep[5:7])
            d_a, d_wu = _planar_log_factor_grads(h, sp, spn, *rep[7:])
            extra = g_l * d_a
            g_wu = (g_l * d_wu).sum((2, 3))  # (K, N)
        dh = 1.0 - h * h
        g_a = torch.empty_like(h)
        gzl, wl, utl, gal, dhl = (t.unbind(0) for t in (gz, W, U.transpose(-1, -2), g_a, dh))
        el = extra.unbind(0) if extra is not None else None
        for j in reversed(range(k)):
            torch.bmm(gzl[j + 1], utl[j], out=gal[j])
            if el is None:
                gal[j].mul_(dhl[j])
            else:
                torch.addcmul(el[j], gal[j], dhl[j], out=gal[j])
            torch.addcmul(gzl[j + 1], wl[j], gal[j], out=gzl[j])
        # d/dw and d/du_hat, layer-major (K, N, D) like the buffers they come from (one pass each when S = 1)
        if s == 1:
            g_w, g_u = g_a.view(k, n, 1) * zs[:k].view(k, n, d), h.view(k, n, 1) * gz[1:].view(k, n, d)
        else:
            g_w, g_u = (g_a * zs[:k]).sum(2), (h * gz[1:]).sum(2)
        if ladj:  # back through u_hat = u + r w, r = c(w.u) / |w|^2, and the log-det's own w.u
            u3, wu, q, c, r = (t.transpose(0, 1) for t in rep[:5])  # layer-major (K, N, ...)
            w_k = W.squeeze(2)
            t = (g_u * w_k).sum(-1)
            alpha = (g_wu if g_wu is not None else 0.0) - t * torch.sigmoid(-wu) / q
            g_w.addcmul_(r.unsqueeze(-1), g_u).addcmul_(alpha.unsqueeze(-1), u3)
            g_w.addcmul_((-2.0 * t * c / (q * q)).unsqueeze(-1), w_k)
            g_u.addcmul_(alpha.unsqueeze(-1), w_k)
        return (
            gz[0].transpose(0, 1).reshape(*full, d).sum_to_size(z_shape),
            g_w.transpose(0, 1).reshape(*batch, k, d).sum_to_size(w_shape),
            g_u.transpose(0, 1).reshape(*batch, k, d).sum_to_size(u_shape),
            g_a.sum((2, 3)).T.reshape(*batch, k).sum_to_size(b_shape),
            None,
        )


def _compiled_grads(meta: tuple, inputs: tuple, saved: tuple, g_zk: Tensor | None, g_ladj: Tensor | None):
    """The backward of :func:`_compiled_outputs` (:func:`kernels.planar_backward`), summed back to the inputs'
    shapes: ``(g_z, g_w, g_u, g_b)``."""
    z_shape, w_shape, u_shape, b_shape, batch, full, _ = meta
    n, s, k, d = saved[3].shape
    g_z0, g_w, g_u, g_b = _kernel_backward(inputs[2].expand(*batch, k, d).reshape(n, k, d), saved, g_zk, g_ladj)
    return (
        g_z0.transpose(0, 1).reshape(*full, d).sum_to_size(z_shape),
        g_w.reshape(*batch, k, d).sum_to_size(w_shape),
        g_u.reshape(*batch, k, d).sum_to_size(u_shape),
        g_b.reshape(*batch, k).sum_to_size(b_shape),
    )


def _kernel_backward(u3: Tensor, saved: tuple, g_zk: Tensor | None, g_ladj: Tensor | None, out=None):
    """:func:`kernels.planar_backward` from :func:`_compiled_outputs`' ``saved`` and the raw ``u (N, K, D)``,
    with the output gradients in the chain's ``(*sample, *batch, ...)`` layout."""
    w_eff, u_hat, consts, zs, terms = saved
    n, s, k, d = zs.shape
    g_zk = None if g_zk is None else g_zk.reshape(s, n, d).transpose(0, 1)
    g_ladj = None if g_ladj is None else g_ladj.reshape(s, n).T
    return kernels.planar_backward(w_eff, u3, u_hat, consts, (zs, terms), g_zk, g_ladj, out)


def planar_w_floor(w: Tensor, w_floor: float | None) -> Tensor:
    """:class:`nfvi.flows.PlanarFlow`'s guard against the amortized blow-up: ``w_1 = w_floor + softplus(w_1')``,
    the other coordinates as they are (``w (*, D)``, raw); ``w`` itself where ``w_floor`` is None."""
    if w_floor is None:
        return w
    w_1, w_rest = w.split([1, w.shape[-1] - 1], dim=-1)
    return torch.cat([w_floor + F.softplus(w_1), w_rest], dim=-1)


def planar_split(raw: Tensor, w_floor: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(u, w, b)`` of planar layers from their raw parameters ``raw (*batch, K, 2D + 1)`` = ``[u, w', b]``
    (:class:`nfvi.flows.PlanarFlow`'s layout), ``w`` through :func:`planar_w_floor`: ``(*batch, K, D)`` twice and
    ``(*batch, K)``. ``torch.split``, not slicing: its backward writes the three gradients into one tensor."""
    d = (raw.shape[-1] - 1) // 2
    u, w, b = raw.split([d, d, 1], dim=-1)
    return u, planar_w_floor(w, w_floor), b.squeeze(-1)


class _PackedPlanarChain(torch.autograd.Function):
    """:func:`planar_chain_packed` through the compiled kernel, one autograd node whose backward writes the raw
    parameters' gradient ``(*batch, K, 2D + 1)`` in place of three (and of the floor's own operations)."""

    @staticmethod
    def forward(ctx, z, raw, w_floor):
        u, w, b = planar_split(raw)
        with torch.no_grad():
            z_k, ladj, saved, (batch, full) = _compiled_outputs(z, w, u, b, keep=True, w_floor=w_floor)
        ctx.save_for_backward(z, raw, *saved)
        ctx.meta = (z.shape, batch, full, w_floor)
        return z_k, ladj

    @staticmethod
    def backward(ctx, g_zk, g_ladj):
        z, raw, *saved = ctx.saved_tensors
        z_shape, batch, full, w_floor = ctx.meta
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain recomputation instead
            grads = _recompute_grads(lambda z, raw: _packed_plain(z, raw, w_floor), (z, raw), (g_zk, g_ladj))
            return (*grads, None)
        n, s, k, d = saved[3].shape
        g_raw = torch.empty(n, k, 2 * d + 1, dtype=raw.dtype)
        g_u, g_w, g_b = g_raw.split([d, d, 1], dim=-1)
        u3 = raw.reshape(n, k, 2 * d + 1)[..., :d]
        g_z0 = _kernel_backward(u3, saved, g_zk, g_ladj, out=(g_w, g_u, g_b.squeeze(-1)))[0]
        return g_z0.transpose(0, 1).reshape(*full, d).sum_to_size(z_shape), g_raw.view(raw.shape), None


def _packed_plain(z: Tensor, raw: Tensor, w_floor: float | None) -> tuple[Tensor, Tensor]:
    u, w, b = planar_split(raw, w_floor)
    return _chain_outputs(z, w, u, b, True)[:2]


def planar_chain_packed(z: Tensor, raw: Tensor, w_floor: float | None = None) -> tuple[Tensor, Tensor]:
    """:func:`planar_chain_ladj` of the planar layers packed in ``raw (*batch, K, 2D + 1)`` (:func:`planar_split`,
    with :class:`nfvi.flows.PlanarFlow`'s ``w`` floor): ``(z_K, log_det)``.

    The same numbers as ``planar_chain_ladj(z, w, u, b)`` after ``u, w, b = planar_split(raw, w_floor)``. On the CPU
    with the compiled kernel (:mod:`nfvi.kernels`) and ``raw``'s batch axes those of ``z`` (no broadcast of the
    parameters), one autograd node reads ``raw`` in place and writes its gradient whole: no split, no floor
    operations, no concatenation of three gradients (2.6 MB per update of Table 2's K=80 model). Elsewhere, the
    split and :func:`planar_chain_ladj`.
    """
    batch = raw.shape[:-2]
    full = _broadcast_shapes(z.shape[:-1], batch)
    packed = full[len(full) - len(batch) :] == batch and raw.shape[-1] >= 3 and raw.shape[-1] % 2 == 1
    if packed and kernels.usable(z, raw):
        if torch.is_grad_enabled() and (z.requires_grad or raw.requires_grad):
            return _PackedPlanarChain.apply(z, raw, w_floor)
        u, w, b = planar_split(raw)
        return _compiled_outputs(z, w, u, b, w_floor=w_floor)[:2]
    u, w, b = planar_split(raw, w_floor)
    return planar_chain_ladj(z, w, u, b)


def _recompute_grads(fn, inputs: tuple, grad_outputs: tuple) -> list:
    """The vector-Jacobian product of ``fn(*inputs)`` with ``grad_outputs``, recorded for higher derivatives
    (``create_graph=True``): the double-backward path of the fused chains. ``None`` for inputs needing no gradient."""
    with torch.enable_grad():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grad_outputs, strict=True) if g is not None and o.requires_grad]
        wanted = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
        grads = [None] * len(inputs)
        if pairs and wanted:
            found = torch.autograd.grad(
                [o for o, _ in pairs],
                [inputs[i] for i in wanted],
                [g for _, g in pairs],
                create_graph=True,
                allow_unused=True,
            )
            for i, g in zip(wanted, found, strict=True):
                grads[i] = g
        return grads


def planar_chain(z: Tensor, w: Tensor, u_hat: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Apply K planar layers in turn: ``(z_K, a)`` with ``a = (a_1..a_K)`` of shape ``(*sample, *batch, K)``.

    ``w``, ``u_hat``: ``(*batch, K, D)`` (``u_hat`` already reparameterised), ``b``: ``(*batch, K)``; ``z``:
    ``(*sample, *batch, D)``, broadcasting against the batch. With gradients on, one autograd node
    (:class:`_PlanarChain`); otherwise the same arithmetic without saving anything.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (z, w, u_hat, b)) and not _plain():
        return _PlanarChain.apply(z, w, u_hat, b, False)
    return _chain_outputs(z, w, u_hat, b, False)[:2]


def planar_chain_ladj(z: Tensor, w: Tensor, u: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """K planar layers from their raw parameters: ``(z_K, log_det)``, ``log_det = sum_k log|1 + u_hat_k^T psi_k|``
    ``(*sample, *batch)`` (Eq. 11-12) with ``u_hat`` as :func:`planar_u_hat` (Appendix A.1).

    The same maths as chaining :class:`PlanarTransform`, in one autograd node (reparameterisation, the K layers
    and all log-determinants, :class:`_PlanarChain`), and with each log-determinant in the exact form of
    :func:`_planar_log_factor` (no clamp). Shapes as :func:`planar_chain`, ``u`` raw ``(*batch, K, D)``.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (z, w, u, b)) and not _plain():
        return _PlanarChain.apply(z, w, u, b, True)
    if _use_kernel(True, z, w, u, b) and not _recording(z, w, u, b):
        return _compiled_outputs(z, w, u, b)[:2]
    return _chain_outputs(z, w, u, b, True)[:2]


def coupling_context_terms(context: Tensor, params, splits) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The context part ``W_c @ context`` of every coupling's first layer, in one matrix product.

    ``params``, ``splits``: as in :func:`_coupling_loop` (``W1``'s columns after the first ``|keep|`` read the
    context). Returns ``W_c`` stacked over the K layers, ``(K * hidden, C)``, and the K terms, each
    ``(*batch, hidden)`` for a context ``(*batch, C)``.
    """
    w_c = torch.cat([p[0][:, keep.numel() :] for p, (keep, _) in zip(params, splits, strict=True)])
    return w_c, F.linear(context, w_c).split(params[0][0].shape[0], dim=-1)


def _coupling_loop(
    z: Tensor, context: Tensor | None, params, splits, saved: list | None = None, plain: bool = False
) -> Tensor:
    """K NICE couplings ``z_b <- z_b + m_k([z_a, context])`` with ``m_k`` = Linear-ReLU-Linear-ReLU-Linear.

    ``params``: K tuples ``(W1, b1, W2, b2, W3, b3)``, ``W1`` ``(hidden, |keep| + C)`` (z_a's columns first);
    ``splits``: K ``(keep, change)`` index tensors. ``z`` ``(*sample, *batch, D)`` must already carry every batch
    dimension of ``context`` ``(*batch, C)``. The context part of all K first layers is one product. Runs without
    recording gradients (in-place ReLUs); ``saved`` collects each layer's ``(z_a, h1, h2)`` for the backward pass.
    ``plain``: out-of-place ops only, for autograd and ``torch.func`` (the same numbers).
    """
    terms = [None] * len(params)
    if context is not None:
        w_c, terms = coupling_context_terms(context, params, splits)
        if saved is not None:
            saved.append(w_c)
    for (w1, b1, w2, b2, w3, b3), (keep, change), term in zip(params, splits, terms, strict=True):
        z_a = z.index_select(-1, keep)
        h1 = F.linear(z_a, w1[:, : keep.numel()], b1)
        if plain:
            h1 = (h1 if term is None else h1 + term).relu()
            h2 = F.linear(h1, w2, b2).relu()
        else:
            h1 = (h1 if term is None else h1.add_(term)).relu_()
            h2 = F.linear(h1, w2, b2).relu_()
        z = z.index_add(-1, change, F.linear(h2, w3, b3))
        if saved is not None:
            saved.append((z_a, h1, h2))
    return z


class _CouplingChain(torch.autograd.Function):
    """The K NICE couplings of :func:`coupling_chain` as one autograd node with a hand-written backward.

    Each layer is three small matrix products; under autograd the ~30 operations per layer (and the
    slicing of each first-layer weight into its z and context columns) cost several times the arithmetic
    (benchmarks/README.md, "NICE K=80"). Under ``create_graph=True`` the backward recomputes the chain as plain
    differentiable ops and differentiates that (:func:`_recompute_grads`), so double backward is exact.
    """

    @staticmethod
    def forward(ctx, z, context, splits, *flat):
        params = [flat[i : i + 6] for i in range(0, len(flat), 6)]
        saved = []
        with torch.no_grad():
            z_k = _coupling_loop(z, context, params, splits, saved)
        ctx.splits = splits
        ctx.has_context = context is not None
        w_c = [saved.pop(0), context] if context is not None else []  # (K * hidden, C) and the context
        ctx.save_for_backward(*flat, *[t for layer in saved for t in layer], *w_c, z)
        return z_k

    @staticmethod
    def backward(ctx, g_z):
        splits, num = ctx.splits, len(ctx.splits)
        saved, z_in = ctx.saved_tensors[:-1], ctx.saved_tensors[-1]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain recomputation instead
            context_in = saved[-1] if ctx.has_context else None

            def fn(z, context, *flat):
                return _coupling_loop(z, context, [flat[i : i + 6] for i in range(0, len(flat), 6)], splits, plain=True)

            grads = _recompute_grads(fn, (z_in, context_in, *saved[: 6 * num]), (g_z,))
            return (grads[0], grads[1], None, *grads[2:])
        flat, acts = saved[: 6 * num], saved[6 * num : 9 * num]
        w_c, context = saved[9 * num :] if ctx.has_context else (None, None)
        grads = [None] * (6 * num)
        g_terms = [None] * num

        def rows(t: Tensor) -> Tensor:  # (*, n) -> (N, n)
            return t.reshape(-1, t.shape[-1])

        for k in reversed(range(num)):
            w1, _, w2, _, w3, _ = flat[6 * k : 6 * k + 6]
            z_a, h1, h2 = acts[3 * k : 3 * k + 3]
            keep, change = splits[k]
            g_s = g_z.index_select(-1, change)
            g_h2 = torch.ops.aten.threshold_backward(g_s.matmul(w3), h2, 0)  # ReLU': 0 where h2 = 0
            g_h1 = torch.ops.aten.threshold_backward(g_h2.matmul(w2), h1, 0)
            grads[6 * k : 6 * k + 6] = [
                rows(g_h1).T @ rows(z_a),  # W1's z_a columns; its context columns come after the loop
                rows(g_h1).sum(0),
                rows(g_h2).T @ rows(h1),
                rows(g_h2).sum(0),
                rows(g_s).T @ rows(h2),
                rows(g_s).sum(0),
            ]
            if context is not None:
                g_terms[k] = g_h1.sum_to_size(*context.shape[:-1], g_h1.shape[-1])
            g_z = g_z.index_add(-1, keep, g_h1.matmul(w1[:, : keep.numel()]))
        g_context = None
        if context is not None:
            g_t = torch.cat(g_terms, -1)  # (*batch, K * hidden)
            g_w_c = (rows(g_t).T @ rows(context)).split(flat[0].shape[0])
            for k in range(num):
                grads[6 * k] = torch.cat([grads[6 * k], g_w_c[k]], dim=1)
            g_context = g_t.matmul(w_c) if ctx.needs_input_grad[1] else None
        return (g_z, g_context, None, *grads)


def coupling_chain(z: Tensor, context: Tensor | None, params, splits) -> Tensor:
    """Apply K NICE additive couplings in turn (see :func:`_coupling_loop` for ``params`` and ``splits``).

    ``z``: ``(*sample, *batch, D)``; ``context``: ``(*batch, C)`` or None. Returns ``z_K`` with the batch shape of
    ``z`` and ``context`` broadcast. With gradients on, one autograd node (:class:`_CouplingChain`); otherwise the
    plain loop. The log-determinant is 0 (volume preserving).
    """
    if context is not None:
        z = z.expand(*torch.broadcast_shapes(z.shape[:-1], context.shape[:-1]), z.shape[-1])
    flat = [t for layer in params for t in layer]
    if _plain():
        return _coupling_loop(z, context, params, splits, plain=True)
    if torch.is_grad_enabled() and any(
        t.requires_grad for t in [z, *flat, *([context] if context is not None else [])]
    ):
        return _CouplingChain.apply(z, context, splits, *flat)
    with torch.no_grad():
        return _coupling_loop(z, context, params, splits)


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

    def _inverse(self, y: Tensor, bits: int = 24, newton: int = 4) -> Tensor:
        """Solve ``y = z + u_hat tanh(w^T z + b)`` for z (Appendix A.1 makes it unique).

        Along w: with ``a = w^T z`` and ``c = w^T u_hat > -1``, ``g(a) = a + c tanh(a + b) - w^T y = 0``;
        ``g' = 1 + c sech^2(a + b) > 0`` so g is strictly increasing, and ``|a - w^T y| = |c tanh| <= |c|``
        brackets the root. Bisection shrinks the bracket to ``2^-bits`` (at most 64 halvings), then
        ``newton`` safeguarded Newton steps (each also shrinks the bracket; a step leaving it is replaced by
        the midpoint) reach float64 resolution where ``g'`` is not tiny. Then ``z = y - u_hat tanh(a + b)``.

        Gradients: the root ``a_0`` is found without autograd, then attached by the implicit-function theorem,
        ``a = a_0 - (g(a_0; w, u, b, y) - g(a_0).detach()) / g'(a_0)`` (value exactly ``a_0``, derivative
        ``-dg/dtheta / g'``), so ``dz/dy = (df/dz)^{-1}`` and the parameters' gradients are exact whichever branch
        (Newton step or bracket midpoint) the search ended in. First-order.
        """
        with torch.no_grad():
            a0 = self._root(y, bits, newton)
        if not torch.is_grad_enabled() or not any(t.requires_grad for t in (y, self.w, self.b, self.u_hat)):
            return y - self.u_hat * torch.tanh(a0 + self.b).unsqueeze(-1)
        h0 = torch.tanh(a0 + self.b)
        c = (self.w * self.u_hat).sum(-1)
        g = a0 + c * h0 - (y * self.w).sum(-1)  # 0 up to rounding; carries dg/dtheta at fixed a_0
        # g' = 1 + c sech^2 = tanh^2 + sech^2 (1 + c) with 1 + c = softplus(w.u) > 0, summed without cancellation
        slope = (h0 * h0 + torch.exp(log_sech2(a0 + self.b)) * F.softplus(self.wu)).detach()
        a = a0 - (g - g.detach()) / slope
        return y - self.u_hat * torch.tanh(a + self.b).unsqueeze(-1)

    def _root(self, y: Tensor, bits: int, newton: int) -> Tensor:
        """The root ``a`` of ``g`` (see :meth:`_inverse`), ``(*batch)``: bisection, then safeguarded Newton."""
        c = (self.w * self.u_hat).sum(-1)
        target, c, b = torch.broadcast_tensors((y * self.w).sum(-1), c, self.b)
        lo, hi = target - c.abs(), target + c.abs()
        widest = 2.0 * c.abs().max().item() if c.numel() else 0.0
        for _ in range(min(64, bits + max(0, math.ceil(math.log2(1.0 + widest))))):
            mid = 0.5 * (lo + hi)
            above = mid + c * torch.tanh(mid + b) > target
            hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
        a = 0.5 * (lo + hi)
        for _ in range(newton):
            h = torch.tanh(a + b)
            g = a + c * h - target
            above = g > 0
            hi, lo = torch.where(above, a, hi), torch.where(above, lo, a)
            step = a - g / (1.0 + c * (1.0 - h * h))
            a = torch.where((step >= lo) & (step <= hi), step, 0.5 * (lo + hi))
        return a


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

    def _inverse(self, y: Tensor) -> Tensor:
        """Closed form: ``y - z0 = (z - z0)(1 + beta/(alpha + r))``, so the radius obeys
        ``r_y = r (r + s)/(alpha + r)`` (``s = alpha + beta > 0``), i.e. ``r^2 + (s - r_y) r - alpha r_y = 0``
        with one root ``r >= 0`` (taken in the cancellation-free form for each sign of ``s - r_y``);
        then ``z = z0 + (y - z0)(alpha + r)/(r + s)``."""
        diff = y - self.z0
        r_y = torch.linalg.vector_norm(diff, dim=-1)
        alpha, s = self.alpha, self.s
        q = s - r_y
        disc = torch.sqrt(q * q + 4 * alpha * r_y)
        r = torch.where(q > 0, 2 * alpha * r_y / (q + disc), 0.5 * (disc - q))
        return self.z0 + diff * ((alpha + r) / (r + s)).unsqueeze(-1)


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

    def _couple(self, z: Tensor, sign: float) -> Tensor:
        shift = self.shift(z[..., self.keep])  # may carry batch dimensions z lacks (an amortized shift)
        z = z.expand(*torch.broadcast_shapes(z.shape[:-1], shift.shape[:-1]), z.shape[-1])
        shift = shift.expand(*z.shape[:-1], shift.shape[-1])
        return z.index_add(-1, self.change, shift, alpha=sign)  # a new tensor: z with shift added at `change`

    def call_and_ladj(self, z: Tensor) -> tuple[Tensor, Tensor]:
        z_new = self._couple(z, 1.0)
        return z_new, z_new.new_zeros(z_new.shape[:-1])

    def _inverse(self, y: Tensor) -> Tensor:
        return self._couple(y, -1.0)


class IAFTransform(FlowTransform):
    """Inverse autoregressive flow step (Kingma et al. 2016, Sec. 4), the gated (LSTM-type) update::

        z' = sigma * z + (1 - sigma) * m,    sigma = sigmoid(s),    (m, s) = net(z)

    where ``m_i`` and ``s_i`` depend only on the coordinates before i in the net's autoregressive order
    (a MADE). The Jacobian is then triangular in that order with diagonal ``sigma``, so
    ``ladj = sum_i log sigma_i = sum_i logsigmoid(s_i)`` (and ``1 - sigma = sigmoid(-s)``).

    Inverse: the coordinate first in the order needs no other, so D passes, pass j setting coordinate
    ``order[j]`` to ``(y - sigmoid(-s) m) / sigma`` from the coordinates already found (the others held at 0,
    so every pass stays finite), recover z exactly (``D`` network evaluations).

    Args:
        net: callable ``z (*, D) -> (m, s)``, each ``(*, D)`` (may broadcast extra batch dimensions).
        order: ``(D,)`` the autoregressive order of ``net`` (default ``0..D-1``); used by the inverse only.
    """

    def __init__(self, net, order: Tensor | None = None):
        super().__init__()
        self.net, self.order = net, order

    def call_and_ladj(self, z: Tensor) -> tuple[Tensor, Tensor]:
        m, s = self.net(z)
        z_new = torch.sigmoid(s) * z + torch.sigmoid(-s) * m
        return z_new, F.logsigmoid(s).sum(-1)

    def _inverse(self, y: Tensor) -> Tensor:
        dim = y.shape[-1]
        order = torch.arange(dim, device=y.device) if self.order is None else self.order
        z = torch.zeros_like(y)
        for i in order.tolist():
            m, s = self.net(z)
            z_i = (y[..., i] - torch.sigmoid(-s[..., i]) * m[..., i]) * torch.exp(-F.logsigmoid(s[..., i]))
            z = z.expand(*z_i.shape, dim) if z.shape[:-1] != z_i.shape else z  # an amortized net adds batch dims
            z = torch.cat([z[..., :i], z_i.unsqueeze(-1), z[..., i + 1 :]], dim=-1)
        return z


def householder_matrix(v: Tensor) -> Tensor:
    """``H = I - 2 v v^T / ||v||^2``, ``(*, D, D)`` from ``v`` ``(*, D)``; symmetric, orthogonal, det -1."""
    eye = torch.eye(v.shape[-1], dtype=v.dtype, device=v.device)
    return eye - 2.0 * v.unsqueeze(-1) * v.unsqueeze(-2) / (v * v).sum(-1, keepdim=True).unsqueeze(-1)


class HouseholderTransform(FlowTransform):
    """Householder flow (Tomczak & Welling 2016): ``z' = (I - 2 v v^T / ||v||^2) z``.

    A reflection: volume preserving (``|det| = 1``, ``ladj = 0``) and its own inverse.

    Args:
        v: ``(*batch, D)`` Householder vector (any nonzero vector; only its direction matters).
    """

    def __init__(self, v: Tensor):
        super().__init__()
        self.v = v

    def call_and_ladj(self, z: Tensor) -> tuple[Tensor, Tensor]:
        v = self.v
        z_new = z - (2.0 * (z * v).sum(-1, keepdim=True) / (v * v).sum(-1, keepdim=True)) * v
        return z_new, z_new.new_zeros(z_new.shape[:-1])

    def _inverse(self, y: Tensor) -> Tensor:
        return self.call_and_ladj(y)[0]


#: Björck steps of :func:`bjorck_orthonormalize` (fixed, as the Sylvester authors' loop of up to 100 steps, but
#: without its data-dependent stop); enough for ``sigma_min(A) / ||A||_F >= 3e-5`` to reach float rounding
BJORCK_STEPS = 30


def bjorck_orthonormalize(a: Tensor, steps: int = BJORCK_STEPS) -> Tensor:
    """Orthonormalise the columns of ``a`` ``(*, D, M)``, ``M <= D``, by ``steps`` steps of Björck's iteration
    (as in van den Berg et al. 2018, after Björck & Bowie 1971)::

        Q_0 = A / ||A||_F,    Q <- Q (I + (I - Q^T Q) / 2)

    Scaling by the Frobenius norm puts every singular value in (0, 1], where the iteration converges to the
    orthogonal polar factor: a singular value ``s`` grows by about 1.5x per step while small, then converges
    quadratically, so 30 steps reach float rounding (``||Q^T Q - I||_F`` ~1e-6 in float32 for M = 64, ~1e-14 in
    float64) from ``s >= 3e-5`` (a matrix whose columns are that close to dependent is not orthonormalised; the
    log-det identity of :class:`SylvesterTransform` assumes ``Q^T Q = I``). The number of steps is fixed, with no
    data-dependent test, so the function traces under ``torch.compile(fullgraph=True)``, runs on meta tensors and
    under ``torch.func.vmap``.
    """
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    q = a / torch.linalg.matrix_norm(a).clamp_min(1e-30)[..., None, None]
    for _ in range(steps):
        q = q + 0.5 * q @ (eye - q.transpose(-1, -2) @ q)
    return q


class SylvesterTransform(FlowTransform):
    """Sylvester flow (van den Berg et al. 2018, Sec. 3): ``z' = z + Q R h(R~ Q^T z + b)``, ``h = tanh``.

    ``Q`` ``(*batch, D, M)`` has orthonormal columns; ``R``, ``R~`` ``(*batch, M, M)`` are upper triangular
    and ``b`` is ``(*batch, M)``. With ``a = R~ Q^T z + b``, Sylvester's determinant identity
    ``det(I_D + A B) = det(I_M + B A)`` and ``Q^T Q = I`` give
    ``det J = det(I_M + diag(h'(a)) R~ R) = prod_i (1 + R~_ii R_ii h'(a_i))`` (``R~ R`` is upper
    triangular). The layer is invertible (their Theorem 2) when ``R_ii R~_ii > -1/||h'||_inf = -1``: the builders
    (:mod:`nfvi.flows`) pass diagonals through ``tanh`` so ``p_i = R_ii R~_ii`` lies in (-1, 1), as in the
    authors' code. Each factor's log, ``log(1 + p sech^2(a))``, is :func:`log1p_scaled_sech2` with ``log(1 + p)``
    given (``log1p_diag``, from :func:`log1p_tanh_product` of the raw diagonals): exact wherever the factor is
    representable, and finite even where ``p`` rounds to -1 (the positive combination
    ``tanh^2(a) + sech^2(a) (1 + p)`` in log space, no clamp).

    There is no closed-form inverse. The transform caches its last forward pass (``cache_size=1``, in the
    ``torch.distributions.Transform`` sense): ``t.inv(y)`` of the very tensor ``y = t(x)`` it returned last gives
    back ``x``, so ``TransformedDistribution`` (and a pyro guide) can score the sample it just drew; at any other
    point ``_inverse`` raises.

    Args:
        q: ``(*batch, D, M)``; r, r_tilde: ``(*batch, M, M)`` upper triangular; b: ``(*batch, M)``;
        log1p_diag: ``(*batch, M)`` ``log(1 + R_ii R~_ii)``; if None, ``log1p`` of the product.
        cache_size: 1 (default) to remember the last ``(x, y)``; 0 for none.
    """

    def __init__(
        self,
        q: Tensor,
        r: Tensor,
        r_tilde: Tensor,
        b: Tensor,
        log1p_diag: Tensor | None = None,
        cache_size: int = 1,
    ):
        super().__init__(cache_size=cache_size)
        self.q, self.r, self.r_tilde, self.b = q, r, r_tilde, b
        if log1p_diag is None:
            diag = torch.diagonal(r, dim1=-2, dim2=-1) * torch.diagonal(r_tilde, dim1=-2, dim2=-1)
            log1p_diag = torch.log1p(diag)
        self.log1p_diag = log1p_diag  # (*batch, M)

    def call_and_ladj(self, z: Tensor) -> tuple[Tensor, Tensor]:
        qtz = (z.unsqueeze(-2) @ self.q).squeeze(-2)  # (*, M)
        a = (qtz.unsqueeze(-2) @ self.r_tilde.transpose(-1, -2)).squeeze(-2) + self.b
        h = torch.tanh(a)
        rh = (h.unsqueeze(-2) @ self.r.transpose(-1, -2)).squeeze(-2)  # R h
        z_new = z + (rh.unsqueeze(-2) @ self.q.transpose(-1, -2)).squeeze(-2)
        return z_new, log1p_scaled_sech2(a, h, self.log1p_diag).sum(-1)

    def with_cache(self, cache_size: int = 1) -> SylvesterTransform:
        if self._cache_size == cache_size:
            return self
        return SylvesterTransform(self.q, self.r, self.r_tilde, self.b, self.log1p_diag, cache_size=cache_size)

    def _inverse(self, y: Tensor) -> Tensor:
        raise NotImplementedError(
            "sylvester flows have no inverse; use rsample_and_log_prob (a SylvesterTransform with cache_size=1 "
            "inverts only the very tensor it returned last, e.g. a TransformedDistribution's own sample)"
        )
