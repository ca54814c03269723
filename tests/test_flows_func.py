"""Flows outside nfvi's own loops (issue 20 item 4): torch.func (vmap, jacrev, grad), double backward and
torch.jit.trace, for every kind, global and amortized; the fused planar and NICE chains give the numbers of their
plain (per-op) path there."""

import pytest
import torch
from torch.func import jacrev, vmap

from nfvi.flows import FLOW_KINDS, build_flow

KINDS = [k for k in FLOW_KINDS if k != "none"]
D, C = 3, 4


def _flow(kind, context_dim=0):
    torch.manual_seed(0)
    return build_flow(kind, D, 3, context_dim).double()


def _context(flow, n=None):
    if flow.context_dim == 0:
        return None
    return torch.randn(*(() if n is None else (n,)), C, dtype=torch.float64)


@pytest.mark.parametrize("context_dim", [0, C])
@pytest.mark.parametrize("kind", KINDS)
def test_vmap_equals_the_batched_call(kind, context_dim):
    flow = _flow(kind, context_dim)
    z = torch.randn(5, D, dtype=torch.float64)
    ctx = _context(flow, 5)
    want_z, want_ld = flow(z, ctx)
    if ctx is None:
        got_z, got_ld = vmap(flow)(z)
    else:
        got_z, got_ld = vmap(flow)(z, ctx)
    torch.testing.assert_close(got_z, want_z)
    torch.testing.assert_close(got_ld, want_ld)


@pytest.mark.parametrize("context_dim", [0, C])
@pytest.mark.parametrize("kind", KINDS)
def test_jacrev_slogdet_is_the_log_det(kind, context_dim):
    flow = _flow(kind, context_dim)
    z = torch.randn(D, dtype=torch.float64)
    ctx = _context(flow)
    jac = jacrev(lambda x: flow(x, ctx)[0])(z)
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign != 0
    torch.testing.assert_close(logabsdet, flow(z, ctx)[1], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_grad_of_the_log_det_matches_autograd(kind):
    flow = _flow(kind)
    z = torch.randn(D, dtype=torch.float64, requires_grad=True)
    got = torch.func.grad(lambda x: flow(x)[1] + flow(x)[0].sum())(z.detach())
    (want,) = torch.autograd.grad(flow(z)[1] + flow(z)[0].sum(), z)
    torch.testing.assert_close(got, want)


def _plain_forward(flow, z, ctx):
    """The same flow's output with the fused chains bypassed: every op recorded by autograd."""
    from nfvi import transforms

    orig = transforms._plain
    transforms._plain = lambda: True
    try:
        return flow(z, ctx)
    finally:
        transforms._plain = orig


@pytest.mark.parametrize("context_dim", [0, C])
@pytest.mark.parametrize("kind", KINDS)
def test_double_backward_matches_the_plain_path(kind, context_dim):
    flow = _flow(kind, context_dim)
    z = torch.randn(6, D, dtype=torch.float64, requires_grad=True)
    ctx = _context(flow, 6)
    if ctx is not None:
        ctx.requires_grad_(True)
    params = [p for p in flow.parameters()]
    results = []
    for forward in (lambda: flow(z, ctx), lambda: _plain_forward(flow, z, ctx)):
        z_k, log_det = forward()
        loss = (z_k.sin().sum(-1) + log_det).sum()
        g_z, *g_p = torch.autograd.grad(loss, [z, *params], create_graph=True)
        # a gradient penalty: d/dtheta of |d loss / dz|^2 needs the second derivative through the chain
        penalty = (g_z * g_z).sum() + sum((g * g).sum() for g in g_p[:1])
        results.append(
            [g_z, *g_p, *torch.autograd.grad(penalty, [z, *params], allow_unused=True, materialize_grads=True)]
        )
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", ["planar", "nice"])
def test_first_order_gradients_unchanged_by_the_fused_node(kind):
    flow = _flow(kind, C)
    z = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    ctx = _context(flow, 5)
    params = list(flow.parameters())
    fused = torch.autograd.grad(sum(t.sum() for t in flow(z, ctx)), [z, *params])
    plain = torch.autograd.grad(sum(t.sum() for t in _plain_forward(flow, z, ctx)), [z, *params])
    for got, want in zip(fused, plain, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("kind", KINDS)
def test_jit_trace(kind):
    flow = _flow(kind)
    z = torch.randn(4, D, dtype=torch.float64)
    traced = torch.jit.trace(flow, (z,), check_trace=False)
    z2 = torch.randn(4, D, dtype=torch.float64)
    for got, want in zip(traced(z2), flow(z2), strict=True):
        torch.testing.assert_close(got, want)


# --- FlowDistribution: broadcasting, expand, entropy, repr -------------------------------------------------------


def _base(*batch):
    from torch.distributions import Independent, Normal

    return Independent(Normal(torch.zeros(*batch, 2), 1.0), 1)


@pytest.mark.parametrize("kind", KINDS)
def test_unbatched_base_broadcasts_against_a_batched_context(kind):
    from nfvi.distributions import FlowDistribution

    torch.manual_seed(0)
    q = FlowDistribution(_base(), build_flow(kind, 2, 3, context_dim=4), torch.randn(5, 4))
    assert q.batch_shape == (5,)
    z, lp = q.rsample_and_log_prob((7,))
    assert z.shape == (7, 5, 2) and lp.shape == (7, 5)
    assert q.rsample((7,)).shape == (7, 5, 2)
    assert torch.isfinite(lp).all()
    assert not torch.equal(z[:, 0], z[:, 1])  # one z_0 per context row, not one shared draw
    if kind != "sylvester":
        torch.testing.assert_close(q.log_prob(z), lp, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("context_dim", [0, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_expand(kind, context_dim):
    from nfvi.distributions import FlowDistribution

    torch.manual_seed(0)
    ctx = torch.randn(5, 4) if context_dim else None
    q = FlowDistribution(_base(5), build_flow(kind, 2, 3, context_dim=context_dim), ctx)
    e = q.expand((3, 5))
    assert e.batch_shape == (3, 5) and e.event_shape == (2,)
    z, lp = e.rsample_and_log_prob((4,))
    assert z.shape == (4, 3, 5, 2) and lp.shape == (4, 3, 5)
    with pytest.raises(ValueError, match=r"does not broadcast to \(4,\)"):
        q.expand((4,))


def test_entropy_says_how_to_estimate_it():
    from nfvi.distributions import FlowDistribution

    q = FlowDistribution(_base(), build_flow("planar", 2, 3))
    with pytest.raises(NotImplementedError, match="Monte Carlo"):
        q.entropy()


@pytest.mark.parametrize("kind", KINDS)
def test_repr_names_kind_dim_length_and_context(kind):
    from nfvi.distributions import FlowDistribution

    for context_dim in (0, 4):
        first = repr(build_flow(kind, 2, 3, context_dim)).splitlines()
        text = " ".join(line.strip() for line in first[:2])
        assert f"dim=2, length=3, context_dim={context_dim}" in text and kind in text.lower()
    assert repr(build_flow("planar", 2, 3)) == "PlanarFlow(dim=2, length=3, context_dim=0)"
    q = FlowDistribution(_base(), build_flow(kind, 2, 3))
    assert "length=3" in repr(q) and "event_shape=(2,)" in repr(q)


# --- TransformedDistribution: every kind scores its own sample; Sylvester through its cache ------------------------


@pytest.mark.parametrize("context_dim", [0, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_transformed_distribution_scores_its_own_sample(kind, context_dim):
    from torch.distributions import TransformedDistribution

    torch.manual_seed(0)
    flow = build_flow(kind, 2, 3, context_dim).double()
    ctx = torch.randn(5, 4, dtype=torch.float64) if context_dim else None
    base = _base(5)
    base = type(base)(type(base.base_dist)(base.base_dist.loc.double(), 1.0), 1)
    td = TransformedDistribution(base, flow.transforms(ctx))
    torch.manual_seed(1)
    z = td.rsample((7,))
    torch.manual_seed(1)
    z0 = base.rsample((7,))
    z_k, log_det = flow(z0, ctx)
    torch.testing.assert_close(z, z_k)
    torch.testing.assert_close(td.log_prob(z), base.log_prob(z0) - log_det, atol=1e-6, rtol=1e-6)
    if kind == "sylvester":  # no inverse: only the cached sample can be scored
        with pytest.raises(NotImplementedError, match="cache_size=1"):
            td.log_prob(z.clone())
        assert flow.transforms(ctx)[0].with_cache(0)._cache_size == 0
