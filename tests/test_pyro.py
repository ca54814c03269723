"""nfvi flows in pyro (issue 20 item 4): a FlowDistribution as a guide's distribution, for every flow kind."""

import math

import pytest
import torch
from torch.distributions import Independent, Normal

pyro = pytest.importorskip("pyro", reason="pyro-ppl is not installed (pip install 'nfvi[pyro]')")
import pyro.distributions as pdist  # noqa: E402
from pyro.distributions.torch_distribution import TorchDistributionMixin  # noqa: E402
from pyro.infer import SVI, Trace_ELBO  # noqa: E402

from nfvi.distributions import FlowDistribution  # noqa: E402
from nfvi.flows import FLOW_KINDS, build_flow  # noqa: E402
from nfvi.pyro import PyroFlowDistribution, to_pyro  # noqa: E402

KINDS = [k for k in FLOW_KINDS if k != "none"]


@pytest.fixture(autouse=True)
def _fresh_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def _svi_losses(kind, context_dim=0, steps=3):
    """Three SVI steps on ``z ~ N(0, I)``, ``x ~ N(z, I)`` with a flow guide; returns the losses (-ELBO)."""
    torch.manual_seed(0)
    n, dim = 5, 2
    x = torch.randn(n, dim) + 1.0
    flow = build_flow(kind, dim, 2, context_dim)

    def model(x):
        with pyro.plate("data", n):
            z = pyro.sample("z", pdist.Normal(torch.zeros(dim), 1.0).to_event(1))
            pyro.sample("x", pdist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.module("flow", flow)
        loc = pyro.param("loc", torch.zeros(n, dim))
        with pyro.plate("data", n):
            q = FlowDistribution(Independent(Normal(loc, 1.0), 1), flow, x if context_dim else None)
            pyro.sample("z", q.to_pyro())

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    return [svi.step(x) for _ in range(steps)]


@pytest.mark.parametrize("context_dim", [0, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_svi_with_a_flow_guide(kind, context_dim):
    losses = _svi_losses(kind, context_dim)
    assert all(math.isfinite(loss) for loss in losses)


def test_svi_moves_the_flow_parameters():
    flow = build_flow("planar", 2, 2)
    before = [p.detach().clone() for p in flow.parameters()]
    torch.manual_seed(0)
    x = torch.randn(5, 2)

    def model(x):
        with pyro.plate("data", 5):
            z = pyro.sample("z", pdist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", pdist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.module("flow", flow)
        with pyro.plate("data", 5):
            pyro.sample("z", FlowDistribution(Independent(Normal(torch.zeros(5, 2), 1.0), 1), flow).to_pyro())

    SVI(model, guide, pyro.optim.Adam({"lr": 1e-1}), Trace_ELBO()).step(x)
    assert any(not torch.equal(a, b) for a, b in zip(before, flow.parameters(), strict=True))


@pytest.mark.parametrize("kind", KINDS)
def test_pyro_distribution_interface(kind):
    torch.manual_seed(0)
    q = to_pyro(
        FlowDistribution(Independent(Normal(torch.zeros(2), 1.0), 1), build_flow(kind, 2, 3, 4), torch.randn(5, 4))
    )
    assert isinstance(q, TorchDistributionMixin) and q.has_rsample
    assert q.event_shape == (2,) and q.event_dim == 1 and q.batch_shape == (5,)
    z = q((7,))  # callable, as pyro.sample calls it
    assert z.shape == (7, 5, 2)
    lp = q.log_prob(z)  # its own sample: exact along the sampling path, also for Sylvester (no inverse)
    assert lp.shape == (7, 5) and torch.isfinite(lp).all()
    e = q.expand((3, 5))
    assert isinstance(e, PyroFlowDistribution) and e.batch_shape == (3, 5)
    assert q.to_event(1).event_shape == (5, 2)
    if kind == "sylvester":
        with pytest.raises(NotImplementedError, match="no inverse"):
            q.log_prob(z.clone())
    else:
        torch.testing.assert_close(q.log_prob(z.clone()), lp, atol=1e-3, rtol=1e-4)


def test_to_pyro_refuses_other_distributions():
    with pytest.raises(TypeError, match="FlowDistribution, got Normal"):
        to_pyro(Normal(0.0, 1.0))
