"""nfvi.cde.model: exact normalized densities, log-dets, the planar w-floor guard (docs/paper.md section 13)."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from nfvi.cde.model import FlowCDE, MixtureDensityNetwork, build_model, model_label
from nfvi.config import FlowConfig
from nfvi.errors import NfviError
from nfvi.flows import PlanarFlow


@pytest.fixture(autouse=True)
def _float64_and_seed():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield
    torch.set_default_dtype(old)


def make(model: str, y_dim: int, kind: str = "none", length: int = 0, x_dim: int = 3, perturb: float = 0.3):
    """A model with randomly perturbed parameters, so it is far from its identity initialisation."""
    cfg = OmegaConf.structured(FlowConfig(kind=kind, length=length))
    net = build_model(model, x_dim, y_dim, cfg, hidden=[16, 16], activation="tanh", mdn_components=3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(perturb * torch.randn_like(p))
    return net.eval()


CASES = [
    ("gaussian", "none", 0),
    ("mdn", "none", 0),
    ("flow", "planar", 4),
    ("flow", "radial", 4),
]


@pytest.mark.parametrize("model,kind,length", CASES, ids=[c[1] if c[0] == "flow" else c[0] for c in CASES])
def test_density_integrates_to_one_in_1d(model, kind, length):
    net = make(model, 1, kind, length)
    x = torch.randn(4, 3)
    y = torch.linspace(-25, 25, 20001)[:, None, None]  # (G, 1, 1) broadcasts against x's batch of 4
    with torch.no_grad():
        p = net.log_prob(y, x).exp()  # (G, 4)
    mass = torch.trapezoid(p, y[:, 0, 0], dim=0)
    torch.testing.assert_close(mass, torch.ones(4), atol=2e-3, rtol=0)


@pytest.mark.parametrize(
    "model,kind,length", [*CASES, ("flow", "nice", 2)], ids=["gaussian", "mdn", "planar", "radial", "nice"]
)
def test_density_integrates_to_one_in_2d(model, kind, length):
    net = make(model, 2, kind, length, perturb=0.2)
    x = torch.randn(2, 3)
    g = torch.linspace(-12, 12, 321)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 1, 2)  # (G*G, 1, 2)
    with torch.no_grad():
        p = net.log_prob(grid, x).exp().reshape(len(g), len(g), 2)
    mass = torch.trapezoid(torch.trapezoid(p, g, dim=0), g, dim=0)
    torch.testing.assert_close(mass, torch.ones(2), atol=5e-3, rtol=0)


@pytest.mark.parametrize("kind,length", [("none", 0), ("planar", 3), ("radial", 3), ("nice", 2)])
def test_flow_cde_logdet_matches_autograd_jacobian(kind, length):
    net = make("flow", 3, kind, length)
    x, y = torch.randn(3), torch.randn(3)
    jac = torch.autograd.functional.jacobian(lambda v: net.normalize(v, x)[0], y)
    _, ladj = net.normalize(y, x)
    torch.testing.assert_close(ladj, torch.linalg.slogdet(jac).logabsdet, atol=1e-9, rtol=1e-9)


def test_log_prob_shapes_broadcast_over_leading_sample_dims():
    for net in (make("flow", 2, "radial", 2), make("mdn", 2)):
        x, y = torch.randn(5, 3), torch.randn(7, 5, 2)
        assert net.log_prob(y, x).shape == (7, 5)
        assert net.log_prob(y[0], x).shape == (5,)


def _amortized_planar_w(net: FlowCDE, x: torch.Tensor) -> torch.Tensor:
    """||w_k(x)|| of every layer: ``(K, N)``."""
    h = net.context(x)
    return torch.stack([t.w.norm(dim=-1) for t in net.flow.transforms(h)])


@pytest.mark.parametrize("y_dim", [1, 2])
def test_planar_w_floor_guard_holds_where_the_raw_w_crosses_zero(y_dim):
    """docs/paper.md section 13: a network's w crosses zero somewhere in x; the guard keeps ||w|| >= floor."""
    net = make("flow", y_dim, "planar", 3, x_dim=1, perturb=0.0)
    assert isinstance(net.flow, PlanarFlow) and net.flow.w_floor == pytest.approx(0.1)
    with torch.no_grad():  # make the head's raw w swing widely with x, through zero
        net.flow.head.weight.normal_(0, 3.0)
        for lin in (m for m in net.context.modules() if isinstance(m, torch.nn.Linear)):
            lin.weight.normal_(0, 2.0)
    x = torch.linspace(-4, 4, 4001)[:, None]
    h = net.context(x)
    raw = net.flow.raw_params(h)  # (N, K, P): the w block of layer k is raw[:, k, D:2D]
    raw_w_first = raw[:, :, y_dim]
    assert (raw_w_first.min(0).values < 0).all() and (raw_w_first.max(0).values > 0).all()  # it does cross zero
    norms = _amortized_planar_w(net, x)
    assert norms.min() >= 0.1 - 1e-12
    u_hat = torch.stack([t.u_hat.norm(dim=-1) for t in net.flow.transforms(h)])
    assert u_hat.max() < 1e3
    y = torch.randn(len(x), y_dim)
    assert torch.isfinite(net.log_prob(y, x)).all()


def test_without_the_guard_the_same_network_gets_w_near_zero():
    """The counterfactual: the guard test above would fail without the floor."""
    net = make("flow", 1, "planar", 3, x_dim=1, perturb=0.0)
    unguarded = PlanarFlow(1, 3, context_dim=net.flow.context_dim, w_floor=None)
    with torch.no_grad():
        unguarded.head.weight.normal_(0, 3.0)
        unguarded.head.bias.zero_()
    h = torch.linspace(-1, 1, 4001)[:, None].expand(-1, net.flow.context_dim)
    norms = torch.stack([t.w.norm(dim=-1) for t in unguarded.transforms(h)])
    assert norms.min() < 1e-2


def test_gaussian_model_is_a_flow_cde_with_an_identity_flow_and_matches_normal_log_prob():
    net = make("gaussian", 2)
    assert isinstance(net, FlowCDE) and net.flow.length == 0
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    m, s_raw = net.affine(net.context(x)).chunk(2, -1)
    s = net.min_scale + torch.nn.functional.softplus(s_raw)
    expected = torch.distributions.Normal(m, s).log_prob(y).sum(-1)
    torch.testing.assert_close(net.log_prob(y, x), expected)


def test_mdn_matches_a_torch_mixture():
    net = make("mdn", 2)
    assert isinstance(net, MixtureDensityNetwork)
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    c, d = 3, 2
    logits, mu, s_raw = net.head(net.context(x)).split([c, c * d, c * d], -1)
    sigma = net.min_scale + torch.nn.functional.softplus(s_raw.unflatten(-1, (c, d)))
    comp = torch.distributions.Independent(torch.distributions.Normal(mu.unflatten(-1, (c, d)), sigma), 1)
    mix = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(logits=logits), comp)
    torch.testing.assert_close(net.log_prob(y, x), mix.log_prob(y))


def test_identity_initialisation_is_standard_normal():
    net = build_model("flow", 3, 1, OmegaConf.structured(FlowConfig(kind="radial", length=2)), hidden=[8])
    x, y = torch.randn(5, 3), torch.randn(5, 1)
    expected = -0.5 * y[:, 0] ** 2 - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(net.log_prob(y, x), expected, atol=0.1, rtol=0)


def test_nice_needs_two_dimensional_y():
    with pytest.raises(NfviError, match="flow=nice needs y of dimension >= 2"):
        build_model("flow", 3, 1, OmegaConf.structured(FlowConfig(kind="nice", length=2)))


@pytest.mark.parametrize(
    "args,label",
    [
        (("gaussian", "radial", 4), "gaussian"),
        (("flow", "none", 0), "gaussian"),
        (("flow", "radial", 0), "gaussian"),
        (("flow", "planar", 8), "planar (K=8)"),
        (("mdn", "none", 0, 7), "mdn (C=7)"),
    ],
)
def test_model_label(args, label):
    assert model_label(*args) == label
