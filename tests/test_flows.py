"""Flow modules: builders, identity, amortization, gradients and the amortized-planar guard."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.distributions import Independent, Normal

from nfvi.errors import NfviError
from nfvi.flows import FLOW_KINDS, IdentityFlow, build_flow, rsample_and_log_prob


@pytest.mark.parametrize("kind", FLOW_KINDS)
def test_length_zero_is_identity(kind):
    flow = build_flow(kind, 3, 0)
    assert isinstance(flow, IdentityFlow)
    z = torch.randn(4, 3)
    z_k, log_det = flow(z)
    assert torch.equal(z_k, z) and torch.equal(log_det, torch.zeros(4))


@pytest.mark.parametrize(
    "kind, length, match",
    [
        ("maf", 2, "flow='maf' is not allowed; choose one of: none, planar, radial, nice, iaf, householder, sylvester"),
        ("planar", -1, "flow.length=-1 is not allowed"),
        ("planar", 2.5, "flow.length=2.5 is not allowed"),
    ],
)
def test_bad_arguments_raise_one_line_errors(kind, length, match):
    with pytest.raises(NfviError, match=match) as info:
        build_flow(kind, 2, length)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kind, dim, options, match",
    [
        ("iaf", 3, {"hidden": 0}, r"flow.hidden=0 is not allowed; use a whole number >= 1"),
        ("iaf", 3, {"num_hidden": 1.5}, r"flow.num_hidden=1.5 is not allowed"),
        ("iaf", 3, {"mix": "permute"}, r"flow option 'mix' is not allowed for flow='iaf'; options: hidden, num_hidden"),
        ("radial", 3, {"hidden": 4}, r"flow option 'hidden' is not allowed for flow='radial'; options: none"),
        ("sylvester", 3, {"variant": "qr"}, r"flow.variant='qr' is not allowed; choose one of: orthogonal, househ"),
        ("sylvester", 3, {"num_vectors": 4}, r"flow.num_vectors=4 is not allowed; use a whole number in \[1, 3\]"),
        ("sylvester", 3, {"num_vectors": 0}, r"flow.num_vectors=0 is not allowed"),
        ("sylvester", 3, {"variant": "triangular", "num_vectors": 2}, r"num_vectors=2 is not allowed with variant"),
        ("sylvester", 3, {"variant": "householder", "num_householder": 0}, r"flow.num_householder=0 is not allowed"),
        ("sylvester", 3, {"num_householder": 2}, r"flow.num_householder=2 is not allowed with variant='orthogonal'"),
        ("planar", 0, {}, r"flow.dim=0 is not allowed; use a whole number >= 1"),
    ],
)
def test_bad_options_raise_one_line_errors(kind, dim, options, match):
    with pytest.raises(NfviError, match=match) as info:
        build_flow(kind, dim, 2, **options)
    assert "\n" not in str(info.value)


def test_nice_needs_two_dimensions():
    with pytest.raises(NfviError, match="at least 2"):
        build_flow("nice", 1, 2)


@pytest.mark.parametrize("kind", FLOW_KINDS[1:])
def test_amortized_flow_needs_context_and_gradients_reach_head(kind):
    flow = build_flow(kind, 4, 3, context_dim=5)
    with torch.no_grad():  # NICE's last layers start at zero (identity); move every parameter off its init
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    with pytest.raises(NfviError, match="pass context"):
        flow(torch.randn(2, 4))
    context = torch.randn(2, 5, requires_grad=True)
    z_k, log_det = flow(torch.randn(2, 4), context)
    (z_k.sum() + log_det.sum()).backward()
    assert context.grad is not None and context.grad.abs().sum() > 0
    grads = [p.grad for p in flow.parameters()]
    assert all(g is not None for g in grads)


def test_amortized_parameters_differ_per_datapoint():
    flow = build_flow("planar", 2, 2, context_dim=3)
    with torch.no_grad():
        flow.head.weight.normal_()
    z = torch.zeros(2, 2) + 0.5
    z_k, _ = flow(z, torch.randn(2, 3))
    assert not torch.allclose(z_k[0], z_k[1])


def test_amortized_planar_w_floor_guards_against_w_through_zero():
    """docs/paper.md section 13: with an encoder emitting w = 0, u_hat ~ 1/||w|| explodes unless w is floored."""
    context = torch.zeros(1, 3)
    for w_floor, bounded in [(0.1, True), (None, False)]:
        torch.manual_seed(0)
        flow = build_flow("planar", 4, 1, context_dim=3, w_floor=w_floor)
        with torch.no_grad():
            flow.head.weight.zero_()
            bias = flow.head.bias.view(1, -1)
            bias[:, :4] = 1.0  # u
            bias[:, 4:8] = 1e-6 if w_floor is None else -30.0  # raw w: tiny (unguarded) / strongly negative (guarded)
        t = flow.transforms(context)[0]
        u_hat_norm = t.u_hat.norm().item()
        assert (u_hat_norm < 20) == bounded, (w_floor, u_hat_norm)
        if bounded:
            assert t.w.norm() >= 0.1


def test_rsample_and_log_prob_is_change_of_variables(float64):
    base = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
    flow = build_flow("radial", 2, 3)
    with torch.no_grad():
        flow.raw.normal_()
    torch.manual_seed(3)
    z_k, log_q = rsample_and_log_prob(base, flow, (7,))
    torch.manual_seed(3)
    z0 = base.rsample((7,))
    _, log_det = flow(z0)
    torch.testing.assert_close(log_q, base.log_prob(z0) - log_det)
    assert z_k.shape == (7, 2) and log_q.shape == (7,)


def test_flow_density_integrates_to_one_on_a_grid(float64):
    """q_K from a NICE flow (invertible) integrates to ~1 over a large 2-D grid."""
    flow = build_flow("nice", 2, 4)
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_(std=0.3)
    base = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
    g = torch.linspace(-9, 9, 301)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    z0 = grid
    for t in reversed(flow.transforms()):
        z0 = t.inv(z0)
    density = base.log_prob(z0).exp()  # log_det = 0 for NICE
    mass = density.sum() * (g[1] - g[0]) ** 2
    torch.testing.assert_close(mass, torch.tensor(1.0), atol=2e-3, rtol=0)


@pytest.mark.parametrize("kind", FLOW_KINDS[1:])
def test_amortized_flows_broadcast_z_against_the_context(kind):
    """z (7, 1, D) against a context (4, C): every kind broadcasts from the right, like planar."""
    flow = build_flow(kind, 2, 3, context_dim=3)
    z_k, log_det = flow(torch.zeros(7, 1, 2), torch.rand(4, 3))
    assert z_k.shape == (7, 4, 2) and log_det.shape == (7, 4)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")  # jit.trace is deprecated
@pytest.mark.parametrize("kind", ["planar", "radial", "householder", "sylvester"])
def test_num_params_is_a_plain_attribute(kind):
    """hasattr, inspect.getmembers and torch.jit.trace touch every attribute; none may raise."""
    flow = build_flow(kind, 3, 2)
    assert hasattr(flow, "num_params") and flow.num_params == flow.raw.shape[-1]
    assert dict(inspect.getmembers(flow))["num_params"] == flow.num_params
    traced = torch.jit.trace(flow, torch.randn(5, 3), check_trace=False)
    z = torch.randn(5, 3)
    torch.testing.assert_close(traced(z), flow(z))


@pytest.mark.parametrize("kind", ["planar", "radial", "nice", "iaf", "householder"])
@pytest.mark.parametrize("context_dim", [0, 3], ids=["global", "amortized"])
def test_flow_inverse_undoes_the_flow(float64, kind, context_dim):
    flow = build_flow(kind, 2, 4, context_dim=context_dim)
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_(std=0.3 if kind in ("nice", "iaf") else 1.0)
    context = torch.randn(6, 3) if context_dim else None
    z = torch.randn(6, 2)
    torch.testing.assert_close(flow.inverse(flow(z, context)[0], context), z, rtol=0, atol=1e-6)


def test_identity_flow_inverse_is_identity():
    z = torch.randn(3, 2)
    assert torch.equal(build_flow("none", 2, 0).inverse(z), z)
