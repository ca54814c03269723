"""The fused planar chain (nfvi.transforms.planar_chain / planar_chain_ladj): gradients, broadcasting, and the
exact log-determinant log|1 + u_hat^T psi| at the edge where the factor is far below 1e-30 (no clamp)."""

from __future__ import annotations

import mpmath
import pytest
import torch

from nfvi.transforms import PlanarTransform, planar_chain, planar_chain_ladj, planar_u_hat

mpmath.mp.dps = 60


def _exact_log_factor(a: float, wu: float) -> float:
    """log(tanh^2 a + sech^2 a * softplus(wu)) with 60 digits."""
    a, wu = mpmath.mpf(a), mpmath.mpf(wu)
    return float(mpmath.log(mpmath.tanh(a) ** 2 + mpmath.sech(a) ** 2 * mpmath.log1p(mpmath.exp(wu))))


def _one_layer(a: float, wu: float, dtype):
    """D = 1, K = 1: w = 1, u = wu, z = 0, b = a, so that w^T z + b = a and w^T u = wu."""
    t = {"dtype": dtype}
    return torch.zeros(1, 1, **t), torch.ones(1, 1, **t), torch.full((1, 1), wu, **t), torch.full((1,), a, **t)


@pytest.mark.parametrize(
    "a, wu",
    [(1e-20, -100.0), (0.0, -700.0), (1e-150, -300.0), (3e-8, -40.0), (1e-3, -5.0), (0.7, 2.0), (-30.0, -60.0)],
)
def test_log_det_is_exact_in_float64_where_the_factor_is_tiny(a, wu):
    """The first three factors lie far below 1e-30, where the old clamp reported up to 31 nats too much."""
    z, w, u, b = _one_layer(a, wu, torch.float64)
    _, ladj = planar_chain_ladj(z, w, u, b)
    exact = _exact_log_factor(a, wu)
    torch.testing.assert_close(ladj, torch.tensor([exact], dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("a, wu", [(1e-20, -80.0), (0.0, -100.0), (1e-30, -60.0), (2e-4, -30.0), (-5.0, 3.0)])
def test_log_det_is_exact_in_float32_where_the_factor_is_representable(a, wu):
    z, w, u, b = _one_layer(a, wu, torch.float32)
    _, ladj = planar_chain_ladj(z, w, u, b)
    exact = _exact_log_factor(float(torch.tensor(a, dtype=torch.float32)), wu)
    torch.testing.assert_close(ladj.double(), torch.tensor([exact], dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_log_det_gradients_are_finite_at_the_edge():
    """a = 0 exactly and softplus(wu) underflowing: the hand-written gradients stay finite (no 0 * inf)."""
    for dtype, wu in ((torch.float32, -120.0), (torch.float64, -800.0)):
        z, w, u, b = (t.requires_grad_() for t in _one_layer(0.0, wu, dtype))
        z_k, ladj = planar_chain_ladj(z, w, u, b)
        grads = torch.autograd.grad(z_k.sum() + ladj.sum(), (z, w, u, b))
        assert all(torch.isfinite(g).all() for g in grads), grads


@pytest.mark.parametrize(
    "z_shape, batch", [((2, 5, 3), (5,)), ((7, 3), ()), ((7, 1, 3), (4,)), ((3,), (2,)), ((2, 3, 2, 3), (2,))]
)
def test_chain_gradients_match_finite_differences(float64, z_shape, batch):
    k = 4
    z = torch.randn(*z_shape, requires_grad=True)
    w = torch.randn(*batch, k, 3, requires_grad=True)
    u = (0.7 * torch.randn(*batch, k, 3)).requires_grad_()
    b = torch.randn(*batch, k, requires_grad=True)
    assert torch.autograd.gradcheck(planar_chain_ladj, (z, w, u, b))
    assert torch.autograd.gradcheck(lambda z, w, u, b: planar_chain(z, w, planar_u_hat(u, w), b), (z, w, u, b))


def test_chain_is_the_composition_of_planar_transforms(float64):
    z = torch.randn(6, 5, 4)
    w, u, b = torch.randn(5, 3, 4), torch.randn(5, 3, 4), torch.randn(5, 3)
    expect, ladj = z, 0.0
    for k in range(3):
        expect, step = PlanarTransform(u[:, k], w[:, k], b[:, k]).call_and_ladj(expect)
        ladj = ladj + step
    z_k, log_det = planar_chain_ladj(z, w, u, b)
    torch.testing.assert_close(z_k, expect)
    torch.testing.assert_close(log_det, ladj)
    with torch.no_grad():  # the no-gradient path runs the same arithmetic in two buffers
        torch.testing.assert_close(planar_chain_ladj(z, w, u, b)[0], expect)


@pytest.mark.parametrize("samples", [(), (3,)])
def test_fused_gradients_equal_the_plain_ops_with_head_shaped_parameters(float64, samples):
    """The fused node's hand-written backward (layer-major buffers; one sample is the training update's case)
    against autograd through the same arithmetic as plain ops, with ``u, w, b`` cut from one ``(N, K, 2D + 1)``
    tensor as an amortized flow's head gives them (strided views)."""
    from nfvi.transforms import _chain_outputs

    n, k, d = 20, 12, 5
    z = torch.randn(*samples, n, d, requires_grad=True)
    raw = torch.randn(n, k, 2 * d + 1, requires_grad=True)
    c_z, c_l = torch.randn(*samples, n, d), torch.randn(*samples, n)

    def grads(chain):
        u, w, b = raw.split([d, d, 1], dim=-1)
        z_k, ladj = chain(z, 0.5 + w.abs(), 0.8 * u, b.squeeze(-1))
        return torch.autograd.grad((c_z * z_k).sum() + (c_l * ladj).sum(), (z, raw))

    fused = grads(planar_chain_ladj)
    plain = grads(lambda *t: _chain_outputs(*t, ladj=True)[:2])
    for f, p in zip(fused, plain, strict=True):
        torch.testing.assert_close(f, p, rtol=1e-12, atol=1e-12)


def test_softplus_pair_is_exact_and_differentiates_like_softplus(float64):
    """``(softplus(x), softplus(-x))`` from one shared ``log1p``: exact to rounding against 60 digits from -700
    to 700; under autograd it is torch's softplus, whose derivative at 0 is 1/2."""
    from nfvi.transforms import _softplus_pair

    x = torch.tensor([-700.0, -60.0, -20.5, -1.0, -1e-20, 0.0, 3e-8, 0.7, 19.9, 20.5, 36.0, 700.0])
    sp, spn = _softplus_pair(x)
    for value, pos, neg in zip(x.tolist(), sp.tolist(), spn.tolist(), strict=True):
        for got, arg in ((pos, value), (neg, -value)):
            exact = float(mpmath.log1p(mpmath.exp(mpmath.mpf(arg))))
            assert got == pytest.approx(exact, rel=4e-16, abs=0.0), (arg, got, exact)
    at_zero = torch.zeros(1, requires_grad=True)
    grads = torch.autograd.grad(sum(t.sum() for t in _softplus_pair(at_zero)), at_zero)[0]
    torch.testing.assert_close(grads, torch.zeros(1))  # 1/2 - 1/2
    grad_pos = torch.autograd.grad(_softplus_pair(at_zero)[0].sum(), at_zero)[0]
    torch.testing.assert_close(grad_pos, torch.full((1,), 0.5))
