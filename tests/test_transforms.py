"""Every flow layer's log-determinant against autograd's Jacobian (float64), its constraints and its inverse."""

from __future__ import annotations

import pytest
import torch

from nfvi.flows import build_flow
from nfvi.transforms import (
    AdditiveCouplingTransform,
    HouseholderTransform,
    PlanarTransform,
    RadialTransform,
    bjorck_orthonormalize,
    planar_u_hat,
)

# many small tensors: one intra-op thread is several times faster on a shared machine
pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ["planar", "radial", "nice"]
# the later kinds, with their options: (kind, options); "orthogonal-m2" uses M = min(2, D) < D vectors
NEW_SPECS = {
    "iaf": ("iaf", {"hidden": 16}),
    "iaf-2hidden": ("iaf", {"hidden": 8, "num_hidden": 2}),
    "householder": ("householder", {}),
    "sylvester-orthogonal": ("sylvester", {"variant": "orthogonal"}),
    "sylvester-orthogonal-m2": ("sylvester", {"variant": "orthogonal", "num_vectors": 2}),
    "sylvester-householder": ("sylvester", {"variant": "householder", "num_householder": 3}),
    "sylvester-triangular": ("sylvester", {"variant": "triangular"}),
}
INVERTIBLE = ["planar", "radial", "nice", "iaf", "householder"]


def new_flow(spec: str, dim: int, length: int, context_dim: int = 0):
    kind, options = NEW_SPECS[spec]
    if options.get("num_vectors", 0) > dim:
        options = {**options, "num_vectors": dim}
    return build_flow(kind, dim, length, context_dim=context_dim, **options)


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


@pytest.mark.parametrize("spec", list(NEW_SPECS))
@pytest.mark.parametrize("context_dim", [0, 3], ids=["global", "amortized"])
@pytest.mark.parametrize("scale", [0.5, 3.0], ids=["moderate", "large"])
@pytest.mark.parametrize("dim", [1, 2, 5])
def test_new_kinds_log_det_matches_autograd_jacobian(float64, spec, context_dim, scale, dim):
    """Four layers (an even number: Householder reflections then have det +1), random raw parameters."""
    flow = new_flow(spec, dim, 4, context_dim)
    # IAF's MADEs compound over layers like NICE's couplings; keep their weights moderate.
    randomise(flow, min(scale, 0.5) if spec.startswith("iaf") else scale)
    z = torch.randn(6, dim) * scale
    context = torch.randn(6, context_dim) if context_dim else None
    z_k, log_det = flow(z, context)
    assert z_k.shape == (6, dim) and log_det.shape == (6,)
    # IAF: slogdet of four triangular factors in alternating orders with saturated gates loses ~1e-7 relative
    rtol = 1e-6 if spec.startswith("iaf") else 1e-7
    torch.testing.assert_close(log_det, autograd_logdet(flow, z, context), rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("variant", ["orthogonal", "householder", "triangular"])
@pytest.mark.parametrize("raw_diag", [2.0, 50.0, 1e4])
def test_sylvester_diagonals_keep_determinant_positive_under_adversarial_parameters(variant, raw_diag):
    """R_ii -> +1, R~_ii -> -1: 1 + R_ii R~_ii h' nears 0 at a = 0 but the layer stays invertible, ladj finite."""
    torch.manual_seed(0)
    dim = 3
    for dtype in (torch.float32, torch.float64):
        flow = build_flow("sylvester", dim, 2, variant=variant).to(dtype)
        m = flow.num_vectors
        with torch.no_grad():
            raw = flow.raw.view(2, -1)  # per layer: [R / R~ matrix (M*M), diag R (M), diag R~ (M), b (M), Q ...]
            raw[:, : m * m].normal_()
            raw[:, m * m : m * m + m] = raw_diag
            raw[:, m * m + m : m * m + 2 * m] = -raw_diag
            raw[:, m * m + 2 * m : m * m + 3 * m] = 0.0  # b = 0: a = 0 at z = 0, where h' = 1
        z = torch.cat([torch.zeros(1, dim, dtype=dtype), torch.randn(20, dim, dtype=dtype)])
        z_k, log_det = flow(z)
        assert torch.isfinite(z_k).all() and torch.isfinite(log_det).all()
        if dtype == torch.float64 and raw_diag <= 2.0:  # beyond, det ~ 1e-20: too small for slogdet to check
            torch.testing.assert_close(log_det, autograd_logdet(flow, z, None))


@pytest.mark.parametrize("shape", [(4, 4), (6, 3), (3, 7, 2), (9, 1)], ids=str)
def test_bjorck_columns_orthonormal_in_float32(shape):
    torch.manual_seed(0)
    q = bjorck_orthonormalize(torch.randn(shape))
    eye = torch.eye(shape[-1])
    assert torch.linalg.matrix_norm(q.transpose(-1, -2) @ q - eye).max() < 1e-5


@pytest.mark.parametrize("context_dim", [0, 3], ids=["global", "amortized"])
def test_sylvester_orthogonal_q_is_orthonormal_in_float32(context_dim):
    torch.manual_seed(0)
    flow = build_flow("sylvester", 6, 3, context_dim=context_dim, num_vectors=4)
    randomise(flow, 1.0)
    context = torch.randn(5, 3) if context_dim else None
    for t in flow.transforms(context):
        assert t.q.shape[-2:] == (6, 4)
        assert torch.linalg.matrix_norm(t.q.transpose(-1, -2) @ t.q - torch.eye(4)).max() < 1e-5


@pytest.mark.parametrize("context_dim", [0, 2], ids=["global", "amortized"])
@pytest.mark.parametrize("num_hidden", [1, 2])
def test_iaf_jacobian_is_triangular_in_each_layers_order(float64, context_dim, num_hidden):
    """Layer k's output i depends only on the inputs before i in its order (reversed on odd layers)."""
    dim = 5
    flow = build_flow("iaf", dim, 2, context_dim=context_dim, hidden=12, num_hidden=num_hidden)
    randomise(flow, 0.5)
    context = torch.randn(context_dim) if context_dim else None
    z = torch.randn(dim)
    for k, t in enumerate(flow.transforms(context)):
        order = getattr(flow, f"order_{k}")
        assert order.tolist() == (list(range(dim)) if k % 2 == 0 else list(range(dim))[::-1])
        jac = torch.autograd.functional.jacobian(lambda v, t=t: t(v), z)[order][:, order]
        assert torch.count_nonzero(torch.triu(jac, 1)) == 0
        assert torch.count_nonzero(torch.tril(jac, -1)) > 0  # the conditioner does read earlier coordinates
        torch.testing.assert_close(torch.diagonal(jac).log().sum(), t.call_and_ladj(z)[1])


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


@pytest.mark.parametrize("kind", ["planar", "radial", "householder", "sylvester-orthogonal", "sylvester-triangular"])
@pytest.mark.parametrize("raw_scale", [1.0, 1e2, 1e3])
def test_float32_finite_for_extreme_raw_parameters(kind, raw_scale):
    torch.manual_seed(1)
    flow = new_flow(kind, 2, 3) if kind in NEW_SPECS else build_flow(kind, 2, 3)
    with torch.no_grad():
        raw = torch.randn_like(flow.raw) * raw_scale
        if kind == "planar":  # adversarial: u = -c w, the direction that breaks invertibility
            raw[:, :2] = -raw_scale * raw[:, 2:4]
        flow.raw.copy_(raw)
    z = torch.randn(500, 2) * raw_scale
    z_k, log_det = flow(z)
    assert torch.isfinite(z_k).all() and torch.isfinite(log_det).all()
    # volume-preserving householder has a constant log_det: take gradients through z_K for the new kinds
    (log_det.sum() + (0.0 if kind in ("planar", "radial") else z_k.mean())).backward()
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


@pytest.mark.parametrize("context_dim", [3, 0], ids=["amortized", "global"])
@pytest.mark.parametrize("dim, mix", [(6, "alternate"), (7, "alternate"), (6, "permute")])
def test_nice_is_the_textbook_coupling_chain(float64, dim, mix, context_dim):
    """Each layer is ``z_b <- z_b + m([z_a, h])``: the one-node chain (``flow(z, h)``, with its hand-written
    backward) and the per-layer transforms both match the plain formula, values and gradients, for the
    alternating split (even and odd D) and a random one."""
    flow = build_flow("nice", dim, 4, context_dim=context_dim, mix=mix)
    randomise(flow, 0.3)
    z = torch.randn(5, 4, dim, requires_grad=True)
    h = torch.randn(4, context_dim, requires_grad=True)
    expected = z
    for k, coupling in enumerate(flow.nets):
        keep, change = getattr(flow, f"keep_{k}"), getattr(flow, f"change_{k}")
        shifted = expected.clone()
        shifted[..., change] = expected[..., change] + coupling.net(
            torch.cat([expected[..., keep], h.expand(5, 4, context_dim)], -1)
        )
        expected = shifted
    by_transforms = z
    for t in flow.transforms(h):
        by_transforms = t(by_transforms)
    weights = torch.randn_like(expected)
    inputs = [z, h, *flow.parameters()] if context_dim else [z, *flow.parameters()]
    grads_expected = torch.autograd.grad((expected * weights).sum(), inputs)
    for z_k in (flow(z, h)[0], by_transforms):
        torch.testing.assert_close(z_k, expected, rtol=0, atol=1e-12)
        grads = torch.autograd.grad((z_k * weights).sum(), inputs)
        for got, want in zip(grads, grads_expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_amortized_nice_broadcasts_one_point_over_a_batch_of_contexts(float64):
    flow = build_flow("nice", 4, 3, context_dim=2)
    randomise(flow, 0.3)
    z, h = torch.randn(4, requires_grad=True), torch.randn(6, 2)
    z_k, log_det = flow(z, h)
    assert z_k.shape == (6, 4) and log_det.shape == (6,)
    torch.testing.assert_close(z_k, flow(z.detach().expand(6, 4), h)[0], rtol=0, atol=0)
    (g,) = torch.autograd.grad(z_k.sum(), z)
    (g_rows,) = torch.autograd.grad(flow(z.expand(6, 4), h)[0].sum(), z)
    torch.testing.assert_close(g, g_rows)


@pytest.mark.parametrize("kind", INVERTIBLE)
@pytest.mark.parametrize("context_dim", [0, 3], ids=["global", "amortized"])
@pytest.mark.parametrize("dim", [1, 2, 5])
def test_inverse_round_trips_at_any_point(float64, kind, context_dim, dim):
    """``t.inv`` at fresh points (no cache): f^{-1}(f(z)) = z and f(f^{-1}(y)) = y to 1e-6, layer by layer."""
    if kind == "nice" and dim < 2:
        pytest.skip("NICE needs dim >= 2")
    flow = build_flow(kind, dim, 3, context_dim=context_dim)
    randomise(flow, 0.3 if kind in ("nice", "iaf") else 1.5)
    context = torch.randn(4, context_dim) if context_dim else None
    z, y = torch.randn(2, 5, 4, dim) * 2.0
    for t in flow.transforms(context):
        torch.testing.assert_close(t.inv(t(z)), z.expand(5, 4, dim), rtol=0, atol=1e-6)
        torch.testing.assert_close(t(t.inv(y)), y.expand(5, 4, dim), rtol=0, atol=1e-6)
    torch.testing.assert_close(flow.inverse(flow(z, context)[0], context), z, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "along, perp, w_scale, b",
    [(1e3, 0.0, 1.0, 0.0), (5.0, 1e3, 1.0, 2.0), (1e3, 1.0, 1e-3, 0.0), (2.0, 1.0, 1e2, 5.0), (1e4, 1e2, 1e-2, 1.0)],
    ids=["big-u", "big-u-across-w", "tiny-w", "big-w", "huge-u-tiny-w"],
)
def test_planar_inverse_with_extreme_parameters(float64, along, perp, w_scale, b):
    """Large ``|u|`` (the bisection bracket is ``2 |w.u_hat|`` wide), tiny or large ``w``. With ``w.u_hat >= 0``,
    ``g' = 1 + w.u_hat sech^2 >= 1``: the 1-D problem is well conditioned and the round trip holds to 1e-6."""
    w = torch.randn(3) * w_scale
    w_hat = w / w.norm()
    noise = torch.randn(3)
    u = along * w_hat + perp * (noise - (noise * w_hat).sum() * w_hat)
    t = PlanarTransform(u, w, torch.tensor(b))
    assert (w * t.u_hat).sum() >= 0
    z = torch.randn(200, 3) * 5.0
    torch.testing.assert_close(t.inv(t(z)), z, rtol=0, atol=1e-6)


def test_householder_is_its_own_inverse_and_orthogonal(float64):
    t = HouseholderTransform(torch.randn(4, 3))
    z = torch.randn(6, 4, 3)
    torch.testing.assert_close(t(t(z)), z)
    torch.testing.assert_close(t.inv(z), t(z))
    torch.testing.assert_close(t(z).norm(dim=-1), z.norm(dim=-1))


@pytest.mark.parametrize("variant", ["orthogonal", "householder", "triangular"])
def test_sylvester_has_no_inverse(variant):
    flow = build_flow("sylvester", 2, 1, variant=variant)
    with pytest.raises(NotImplementedError, match="sylvester flows have no inverse; use rsample_and_log_prob"):
        flow.transforms()[0].inv(torch.zeros(2))
    with pytest.raises(NotImplementedError, match="no inverse"):
        flow.inverse(torch.zeros(2))


@pytest.mark.parametrize("kind", KINDS + list(NEW_SPECS))
@pytest.mark.parametrize("context_dim", [0, 4], ids=["global", "amortized"])
def test_extra_leading_sample_dimensions(float64, kind, context_dim):
    """z of shape (S, B, D) with context (B, C) equals applying the flow to each sample separately."""
    flow = build_flow(kind, 3, 3, context_dim=context_dim) if kind in KINDS else new_flow(kind, 3, 3, context_dim)
    randomise(flow, 0.7)
    z = torch.randn(5, 4, 3)
    context = torch.randn(4, context_dim) if context_dim else None
    z_k, log_det = flow(z, context)
    assert z_k.shape == (5, 4, 3) and log_det.shape == (5, 4)
    for s in range(5):
        z_s, ld_s = flow(z[s], context)
        torch.testing.assert_close(z_k[s], z_s)
        torch.testing.assert_close(log_det[s], ld_s)
