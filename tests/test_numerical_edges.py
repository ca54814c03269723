"""Issue 19, item 4: the numerical edges of the flows.

- Sylvester log-determinants without a clamp: ``log(1 + p sech^2 a)`` (:func:`nfvi.transforms.log1p_scaled_sech2`)
  against mpmath in float64, and a Sylvester layer whose factors lie below 1e-30 against their analytic value;
- IAF ``log_prob`` far from the mass: -inf (or the finite value), never NaN, on a +-14 grid of a perturbed IAF;
- the planar inverse's gradient is the implicit-function one, ``dx/dy = 1 / f'(x)``, in float32 and float64.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.autograd.functional import jacobian
from torch.distributions import Independent, Normal

from nfvi.flows import FlowDistribution, build_flow
from nfvi.transforms import PlanarTransform, SylvesterTransform, log1p_scaled_sech2, log1p_tanh_product

mpmath = pytest.importorskip("mpmath")  # installed with torch (through sympy)

A_VALUES = [0.0, 1e-300, 1e-150, 1e-20, 1e-8, 1e-3, 0.3, 0.88, 0.9, 1.0, 3.0, 10.0, 20.0, 40.0, 300.0, 710.0]
L_VALUES = [-700.0, -200.0, -69.0, -30.0, -5.0, -1.0, -0.7, -1e-3, -1e-12, 0.0, 1e-12, 0.5, 1.0, 5.0, 30.0]


def mp_log_factor(a: float, log1p_p: float):
    """``log(1 + p sech^2 a)`` with ``p = expm1(log1p_p)``, in 60 digits."""
    with mpmath.workdps(60):
        a, lp = mpmath.mpf(a), mpmath.mpf(log1p_p)
        return mpmath.log1p(mpmath.expm1(lp) * mpmath.sech(a) ** 2)


def test_log_factor_matches_mpmath_in_float64_with_no_floor():
    a = torch.tensor(A_VALUES, dtype=torch.float64)[:, None]
    lp = torch.tensor(L_VALUES, dtype=torch.float64)[None, :]
    a, lp = torch.broadcast_tensors(a, lp)
    sign = torch.where(torch.arange(a.numel()).reshape(a.shape) % 2 == 0, 1.0, -1.0).to(a)  # both signs of a
    got = log1p_scaled_sech2(sign * a, torch.tanh(sign * a), lp)
    for value, ai, li in zip(got.flatten().tolist(), a.flatten().tolist(), lp.flatten().tolist(), strict=True):
        exact = mp_log_factor(ai, li)
        assert abs(value - float(exact)) <= 1e-13 * abs(float(exact)) + 1e-300, (ai, li, value, exact)
    assert got.min() < -600  # factors far below 1e-30 (log 1e-30 = -69.1) are reported as they are


def test_log_factor_gradients_are_finite_at_a_zero():
    a = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    lp = torch.tensor([-50.0, -0.1, 2.0], dtype=torch.float64, requires_grad=True)
    out = log1p_scaled_sech2(a, torch.tanh(a), lp)
    assert torch.allclose(out, lp.detach())  # at a = 0 the factor is 1 + p
    out.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(lp.grad).all()


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
def test_sylvester_factors_below_1e30_are_exact(dtype, rtol):
    """Raw diagonals +-40: ``1 + R_ii R~_ii = sech^2(40) ~ 7e-35``; with ``a`` near 0 every factor is below 1e-30
    (the old clamp reported ``log 1e-30`` for each, 28 nats too high in all here)."""
    m = 3
    q = torch.eye(m, dtype=dtype)
    r_raw = torch.full((m,), 40.0, dtype=dtype)
    diag = torch.tanh(r_raw)
    r = torch.diag(diag) + torch.triu(torch.full((m, m), 0.3, dtype=dtype), 1)
    r_tilde = torch.diag(-diag)
    log1p_diag = log1p_tanh_product(r_raw, -r_raw)
    z = torch.tensor([[1e-20, -3e-18, 0.0]], dtype=dtype)
    layer = SylvesterTransform(q, r, r_tilde, torch.zeros(m, dtype=dtype), log1p_diag)
    _, ladj = layer.call_and_ladj(z)
    a = (r_tilde @ z[0]).tolist()
    with mpmath.workdps(60):
        one_plus_p = mpmath.sech(40) ** 2
        exact = sum(mpmath.log(mpmath.tanh(ai) ** 2 + mpmath.sech(ai) ** 2 * one_plus_p) for ai in a)
    assert float(exact) < 3 * math.log(1e-30) - 25  # the clamp's floor, 28 nats above the true log-det
    assert abs(ladj.item() - float(exact)) <= rtol * abs(float(exact))


def perturbed_iaf(seed: int = 0, scale: float = 0.3):
    torch.manual_seed(seed)
    flow = build_flow("iaf", 2, 6)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn_like(p))
    return flow


def flow_distribution(flow, dtype=torch.float32):
    return FlowDistribution(Independent(Normal(torch.zeros(2, dtype=dtype), torch.ones(2, dtype=dtype)), 1), flow)


def grid(dtype=torch.float32):
    g = torch.linspace(-14.0, 14.0, 57, dtype=dtype)
    return torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)


def test_iaf_log_prob_far_from_the_mass_is_minus_inf_or_finite_never_nan():
    flow = perturbed_iaf()
    with torch.no_grad():
        lp32 = flow_distribution(flow).log_prob(grid())
        lp64 = flow_distribution(copy.deepcopy(flow).double(), torch.float64).log_prob(grid(torch.float64))
    assert not lp32.isnan().any() and not lp64.isnan().any() and not (lp32 == math.inf).any()
    far = lp32 == -math.inf
    assert 0.1 < far.float().mean() < 0.9  # the grid reaches far beyond the mass (40% NaN there before)
    # -inf in float32 only where the value is at or beyond float32's range (its z_0^2 overflows from 1.7e38)
    assert (lp64[far] < -1e38).all()
    near = ~far & (lp64 > -1e4)
    assert near.sum() > 100
    assert torch.allclose(lp32[near].double(), lp64[near], rtol=1e-3, atol=1e-3)  # float32 through 6 inverses


def test_iaf_log_prob_gradients_stay_finite_beside_far_points():
    flow = perturbed_iaf()
    lp = flow_distribution(flow).log_prob(grid())
    assert (lp == -math.inf).any()
    lp[lp > -1e4].sum().backward()  # far points in the same batch put no NaN in the parameters' gradients
    assert all(torch.isfinite(p.grad).all() for p in flow.parameters() if p.grad is not None)


def test_iaf_inverse_of_a_far_point_is_inf_not_nan():
    flow = perturbed_iaf()
    with torch.no_grad():
        z0 = flow.inverse(grid())
    assert not z0.isnan().any() and (z0 == math.inf).all(-1).any()
    assert flow.inverse(torch.tensor([[math.nan, 0.0]])).isnan().all()  # NaN in, NaN out: nothing hidden


def test_planar_inverse_gradient_of_the_issue_example():
    t = PlanarTransform(
        torch.tensor([-1.970576286315918]), torch.tensor([0.6280840635299683]), torch.tensor(-0.1131517887)
    )
    y = torch.tensor([0.25441133975982666])
    x = t.inv(y)
    expected = 1.0 / jacobian(t, x)  # 3.6005; autograd through the bisection bounds gave 1.7223
    assert torch.allclose(jacobian(t.inv, y), expected, rtol=1e-5)
    assert abs(expected.item() - 3.6005) < 1e-3


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-3), (torch.float64, 1e-9)])
def test_planar_inverse_gradients_are_the_implicit_function_ones(dtype, rtol):
    """2,000 random 1-D layers (independent, one per row): ``dx/dy = 1 / f'(x)`` and, for each parameter,
    ``dx/dtheta = -(df/dtheta at fixed x) / f'(x)``, whichever branch the root search ends in."""
    gen = torch.Generator().manual_seed(0)
    n = 2000
    u, w, y = (2.0 * torch.randn(n, 1, generator=gen, dtype=dtype) for _ in range(3))
    b = torch.randn(n, generator=gen, dtype=dtype)
    params = [p.requires_grad_() for p in (u, w, b)]
    y.requires_grad_()
    t = PlanarTransform(u, w, b)
    x = t.inv(y)
    got = torch.autograd.grad(x.sum(), [y, *params], retain_graph=True)
    xd = x.detach()
    fx = t(xd)  # f at the fixed root: its partial derivatives in y (none) and the parameters
    slope = 1.0 + (t.u_hat * t.w).sum(-1, keepdim=True) * (1.0 - torch.tanh(xd * t.w + b[:, None]) ** 2)
    partial = torch.autograd.grad(fx.sum(), params)
    assert torch.allclose(got[0], 1.0 / slope.detach(), rtol=rtol, atol=0)
    for g, p in zip(got[1:], partial, strict=True):
        expected = -p / slope.detach().reshape(p.shape)
        assert torch.allclose(g, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def test_planar_inverse_jacobian_is_the_inverse_of_the_forward_jacobian_in_3d():
    torch.manual_seed(1)
    t = PlanarTransform(torch.randn(3, dtype=torch.float64) * 2, torch.randn(3, dtype=torch.float64), torch.tensor(0.4))
    y = torch.randn(3, dtype=torch.float64)
    x = t.inv(y)
    assert torch.allclose(jacobian(t.inv, y), torch.linalg.inv(jacobian(t, x)), rtol=1e-10, atol=1e-12)


def test_per_layer_planar_log_det_is_exact_below_1e30():
    """PlanarTransform's log-det (planar_ladj) has no 1e-30 floor: at a = 1e-20 with u_hat^T w = -1 + 1e-40 the
    factor tanh^2 a + sech^2 a (1 + u_hat^T w) = ~1e-40 + 1e-40 (float64, analytic)."""
    import math

    import torch

    from nfvi.transforms import planar_ladj

    a = torch.tensor([1e-20], dtype=torch.float64)
    wu = torch.tensor([math.log(math.expm1(1e-40))], dtype=torch.float64)  # softplus(wu) = 1e-40
    got = planar_ladj(a, torch.tanh(a), wu)
    want = math.log(math.tanh(1e-20) ** 2 + (1 - math.tanh(1e-20) ** 2) * 1e-40)
    assert abs(float(got) - want) < 1e-9
