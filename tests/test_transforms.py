"""Every flow layer's log-determinant against autograd's Jacobian (float64), and its constraints."""

from __future__ import annotations

import pytest
import torch

from nfvi.flows import build_flow
from nfvi.transforms import AdditiveCouplingTransform, PlanarTransform, RadialTransform, planar_u_hat

KINDS = ["planar", "radial", "nice"]


def randomise(flow, scale: float) -> None:
    with torch.no_grad():
        for p in flow.parameters():
            p.copy_(torch.randn_like(p) * scale)


def autograd_logdet(flow, z, context):
    """log|det J| of z -> flow(z)[0] per row, by building the full Jacobian with autograd."""
    out = []
    for i in range(z.shape[0]):
        ctx = None if context is None else context[i]
        jac = torch.autograd.functional.jacobian(lambda v: flow(v, ctx)[0], z[i])
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign > 0, "flow Jacobian must have a positive determinant"
        out.append(logabs)
    return torch.stack(out)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("context_dim", [0, 3], ids=["global", "amortized"])
@pytest.mark.parametrize("scale", [0.5, 3.0], ids=["moderate", "large"])
@pytest.mark.parametrize("dim", [1, 2, 5])
def test_log_det_matches_autograd_jacobian(float64, kind, context_dim, scale, dim):
    if kind == "nice" and dim < 2:
        pytest.skip("NICE needs dim >= 2")
    flow = build_flow(kind, dim, 4, context_dim=context_dim)
    # NICE's coupling MLPs compound over layers: large weights make the Jacobian too ill-conditioned for slogdet.
    randomise(flow, min(scale, 0.3) if kind == "nice" else scale)
    z = torch.randn(6, dim) * scale
    context = torch.randn(6, context_dim) if context_dim else None
    _, log_det = flow(z, context)
    assert log_det.shape == (6,)
    torch.testing.assert_close(log_det, autograd_logdet(flow, z, context), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("c", [0.5, 1.0, 10.0, 1e3])
def test_planar_adversarial_u_keeps_determinant_positive(float64, c):
    """u = -c w would make 1 + u^T psi cross zero without the Appendix A.1 reparameterisation."""
    w = torch.randn(3)
    u = -c * w
    t = PlanarTransform(u, w, torch.tensor(0.3))
    assert (w * t.u_hat).sum() > -1
    z = torch.randn(20, 3)
    jac_logdets = [torch.linalg.slogdet(torch.autograd.functional.jacobian(lambda v: t(v), zi)) for zi in z]
    assert all(sign > 0 for sign, _ in jac_logdets)
    torch.testing.assert_close(t.call_and_ladj(z)[1], torch.stack([la for _, la in jac_logdets]))


def test_planar_u_hat_divides_by_squared_norm(float64):
    """w^T u_hat = -1 + softplus(w^T u) exactly, which only holds with ||w||^2 (docs/paper.md section 7, bug 1)."""
    u, w = torch.randn(4), 7.0 * torch.randn(4)
    wu = (w * u).sum()
    torch.testing.assert_close((w * planar_u_hat(u, w)).sum(), -1 + torch.nn.functional.softplus(wu))


def test_radial_constraint_beta_at_least_minus_alpha(float64):
    t = RadialTransform(torch.zeros(2), torch.tensor(-3.0), torch.tensor(-50.0))
    assert t.beta >= -t.alpha


@pytest.mark.parametrize("kind", ["planar", "radial"])
@pytest.mark.parametrize("raw_scale", [1.0, 1e2, 1e3])
def test_float32_finite_for_extreme_raw_parameters(kind, raw_scale):
    torch.manual_seed(1)
    flow = build_flow(kind, 2, 3)
    with torch.no_grad():
        raw = torch.randn_like(flow.raw) * raw_scale
        if kind == "planar":  # adversarial: u = -c w, the direction that breaks invertibility
            raw[:, :2] = -raw_scale * raw[:, 2:4]
        flow.raw.copy_(raw)
    z = torch.randn(500, 2) * raw_scale
    z_k, log_det = flow(z)
    assert torch.isfinite(z_k).all() and torch.isfinite(log_det).all()
    log_det.sum().backward()
    assert torch.isfinite(flow.raw.grad).all()


def test_nice_is_volume_preserving_and_exactly_invertible(float64):
    flow = build_flow("nice", 6, 5, mix="permute")
    randomise(flow, 0.3)
    z = torch.randn(10, 6)
    z_k, log_det = flow(z)
    assert torch.equal(log_det, torch.zeros(10))
    z_back = z_k
    for t in reversed(flow.transforms()):
        assert isinstance(t, AdditiveCouplingTransform)
        z_back = t.inv(z_back)
    torch.testing.assert_close(z_back, z, rtol=0, atol=1e-12)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v)[0], z[0])
    torch.testing.assert_close(torch.linalg.det(jac), torch.tensor(1.0))


@pytest.mark.parametrize("kind", ["planar", "radial"])
def test_planar_and_radial_have_no_inverse(kind):
    flow = build_flow(kind, 2, 1)
    with pytest.raises(NotImplementedError, match="no closed-form inverse"):
        flow.transforms()[0].inv(torch.zeros(2))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("context_dim", [0, 4], ids=["global", "amortized"])
def test_extra_leading_sample_dimensions(float64, kind, context_dim):
    """z of shape (S, B, D) with context (B, C) equals applying the flow to each sample separately."""
    flow = build_flow(kind, 3, 3, context_dim=context_dim)
    randomise(flow, 0.7)
    z = torch.randn(5, 4, 3)
    context = torch.randn(4, context_dim) if context_dim else None
    z_k, log_det = flow(z, context)
    assert z_k.shape == (5, 4, 3) and log_det.shape == (5, 4)
    for s in range(5):
        z_s, ld_s = flow(z[s], context)
        torch.testing.assert_close(z_k[s], z_s)
        torch.testing.assert_close(log_det[s], ld_s)
