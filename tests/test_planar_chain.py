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
