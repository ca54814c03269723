"""FlowDistribution: sampling path vs inverse path, normalisation on a grid, TransformedDistribution interop."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Distribution, Independent, Normal, TransformedDistribution, constraints

from nfvi.flows import FlowDistribution, build_flow, rsample_and_log_prob

# many small tensors: one intra-op thread is several times faster on a shared machine
pytestmark = pytest.mark.usefixtures("one_thread")

INVERTIBLE = ["planar", "radial", "nice", "iaf", "householder"]


def random_flow(kind: str, dim: int, length: int, context_dim: int = 0, std: float | None = None, **options):
    """Random parameters; NICE's and IAF's networks compound over layers, so they get smaller weights."""
    flow = build_flow(kind, dim, length, context_dim=context_dim, **options)
    std = std or (0.3 if kind in ("nice", "iaf") else 1.0)
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_(std=std)
    return flow


def base(dim: int, batch: tuple = ()) -> Independent:
    return Independent(Normal(0.3 * torch.randn(*batch, dim), torch.rand(*batch, dim) + 0.5), 1)


@pytest.mark.parametrize("kind", INVERTIBLE)
@pytest.mark.parametrize("context_dim", [0, 3], ids=["global", "amortized"])
def test_log_prob_equals_the_sampling_path(float64, kind, context_dim):
    """log_prob (invert, then forward) = rsample_and_log_prob's log q_K (Eq. 7) on sampled points, to 1e-6."""
    flow = random_flow(kind, 3, 4, context_dim)
    context = torch.randn(5, context_dim) if context_dim else None
    q = FlowDistribution(base(3, (5,)), flow, context)
    z_k, log_q = q.rsample_and_log_prob((8,))
    assert z_k.shape == (8, 5, 3) and log_q.shape == (8, 5)
    torch.testing.assert_close(q.log_prob(z_k), log_q, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kind, std, options",
    [
        ("planar", 1.0, {}),
        ("radial", 1.0, {}),
        ("nice", 0.2, {}),
        ("iaf", 0.2, {"hidden": 16}),
        ("householder", 1.0, {}),
    ],
    ids=["planar", "radial", "nice", "iaf", "householder"],
)
def test_density_integrates_to_one_on_a_grid(float64, kind, std, options):
    """q_K on [-8, 8]^2 by the midpoint rule on 400^2 cells: mass ~ 1."""
    flow = random_flow(kind, 2, 3, std=std, **options)
    q = FlowDistribution(Independent(Normal(torch.zeros(2), torch.full((2,), 0.8)), 1), flow)
    # the flow must keep q_K's mass inside the box for the test to mean anything
    assert (q.sample((4000,)).abs() > 8).any(-1).float().mean() < 1e-3
    edges = torch.linspace(-8, 8, 401)
    g = 0.5 * (edges[1:] + edges[:-1])
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        mass = q.log_prob(grid).exp().sum() * (edges[1] - edges[0]) ** 2
    torch.testing.assert_close(mass, torch.tensor(1.0), atol=1e-3, rtol=0)


@pytest.mark.parametrize("kind", ["planar", "radial"])
def test_transformed_distribution_log_prob_at_fresh_points(float64, kind):
    """torch's own TransformedDistribution inverts the planar/radial transforms (no cache) at any point."""
    flow = random_flow(kind, 2, 3)
    b = base(2)
    td = TransformedDistribution(b, flow.transforms())
    q = FlowDistribution(b, flow)
    y = torch.randn(50, 2) * 2.0  # never produced by the transforms: nothing is cached
    torch.testing.assert_close(td.log_prob(y), q.log_prob(y), rtol=0, atol=1e-9)
    z0 = b.sample((20,))
    z_k, log_det = flow(z0)
    torch.testing.assert_close(td.log_prob(z_k.clone()), b.log_prob(z0) - log_det, rtol=0, atol=1e-8)


def test_distribution_shapes_and_flags():
    flow = build_flow("planar", 3, 2, context_dim=4)
    q = FlowDistribution(base(3, (1,)), flow, torch.randn(6, 4))
    assert isinstance(q, Distribution) and q.has_rsample and q.arg_constraints == {}
    assert q.support is constraints.real_vector
    assert q.batch_shape == (6,) and q.event_shape == (3,)
    assert q.rsample((2,)).shape == (2, 6, 3) and q.sample().shape == (6, 3)
    assert not q.sample().requires_grad
    z, log_q = q.rsample_and_log_prob((2, 7))
    assert z.shape == (2, 7, 6, 3) and log_q.shape == (2, 7, 6)
    global_q = FlowDistribution(base(3, (5,)), build_flow("nice", 3, 2), torch.randn(9, 4))  # context ignored
    assert global_q.batch_shape == (5,)


def test_rsample_is_reparameterised():
    flow = build_flow("iaf", 2, 2)
    mu = torch.zeros(2, requires_grad=True)
    q = FlowDistribution(Independent(Normal(mu, torch.ones(2)), 1), flow)
    z, log_q = q.rsample_and_log_prob((4,))
    (z.sum() + log_q.sum()).backward()
    assert mu.grad is not None and mu.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", ["orthogonal", "householder", "triangular"])
def test_sylvester_samples_with_log_prob_but_has_no_log_prob(float64, variant):
    flow = random_flow("sylvester", 3, 2, variant=variant)
    b = base(3)
    q = FlowDistribution(b, flow)
    torch.manual_seed(1)
    z_k, log_q = q.rsample_and_log_prob((5,))
    torch.manual_seed(1)
    z_k2, log_q2 = rsample_and_log_prob(b, flow, (5,))  # the module-level function agrees
    torch.testing.assert_close(z_k, z_k2)
    torch.testing.assert_close(log_q, log_q2)
    with pytest.raises(NotImplementedError, match="sylvester flows have no inverse; use rsample_and_log_prob") as info:
        q.log_prob(z_k)
    assert "\n" not in str(info.value)


def test_base_must_have_vector_events():
    with pytest.raises(ValueError, match="event shape"):
        FlowDistribution(Normal(torch.zeros(2), torch.ones(2)), build_flow("planar", 2, 1))
