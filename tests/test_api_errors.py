"""Issue 21, point 9: the Python API names its bad arguments (ValueError/TypeError, one line, argument and expected)."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Independent, Normal

from nfvi.config import FlowConfig
from nfvi.estimators import log_marginal_likelihood
from nfvi.flows import FlowDistribution, build_flow
from nfvi.vae.checkpoint import load_model
from nfvi.vae.model import ModelConfig, build_model


def raises(exc_type, call, *names):
    """Run ``call``; assert it raises ``exc_type`` in one line whose message holds every one of ``names``."""
    with pytest.raises(exc_type) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    return message


def test_planar_flow_on_points_of_the_wrong_width():
    flow = build_flow("planar", 2, 2)
    raises(ValueError, lambda: flow(torch.randn(5, 3)), "z has shape (5, 3)", "R^2", "expected (..., 2)")


def test_flow_input_that_is_not_a_tensor():
    flow = build_flow("radial", 2, 2)
    raises(TypeError, lambda: flow([[0.0, 1.0]]), "z must be a torch.Tensor", "(..., 2)", "list")


def test_amortized_radial_flow_given_a_context_of_the_wrong_width():
    flow = build_flow("radial", 2, 2, context_dim=3)
    message = raises(ValueError, lambda: flow(torch.randn(5, 2), torch.randn(5, 4)), "context has shape (5, 4)")
    assert "context_dim=3" in message and "expected (*batch, 3)" in message


@pytest.mark.parametrize("kind", ["planar", "radial", "nice", "iaf", "sylvester"])
def test_z_batch_and_context_batch_that_do_not_broadcast(kind):
    flow = build_flow(kind, 2, 2, context_dim=3)
    message = raises(ValueError, lambda: flow(torch.randn(5, 2), torch.randn(6, 3)), "z of shape (5, 2)", "(6, 3)")
    assert "do not broadcast" in message and "(*batch, 3)" in message
    z_k, _ = flow(torch.randn(4, 6, 2), torch.randn(6, 3))  # (*sample, *batch, D) with (*batch, C) is fine
    assert z_k.shape == (4, 6, 2)


def test_nice_inverse_of_points_of_the_wrong_width():
    flow = build_flow("nice", 4, 2)
    raises(ValueError, lambda: flow.inverse(torch.randn(5, 3)), "z_k has shape (5, 3)", "R^4", "expected (..., 4)")


def test_flow_distribution_whose_base_and_flow_dimensions_differ_is_refused_at_construction():
    base = Independent(Normal(torch.zeros(3), 1.0), 1)
    raises(ValueError, lambda: FlowDistribution(base, build_flow("planar", 2, 2)), "event shape (3,)", "R^2", "(2,)")


def test_flow_distribution_without_a_base():
    raises(TypeError, lambda: FlowDistribution(None, build_flow("planar", 2, 2)), "base", "Distribution", "NoneType")


def test_flow_distribution_without_a_flow():
    base = Independent(Normal(torch.zeros(2), 1.0), 1)
    raises(TypeError, lambda: FlowDistribution(base, None), "flow", "nfvi.flows.Flow", "NoneType")


def test_flow_distribution_of_an_amortized_flow_checks_its_context():
    base = Independent(Normal(torch.zeros(6, 2), 1.0), 1)
    flow = build_flow("planar", 2, 2, context_dim=3)
    raises(ValueError, lambda: FlowDistribution(base, flow), "amortized", "pass context")
    raises(ValueError, lambda: FlowDistribution(base, flow, torch.randn(6, 4)), "context has shape (6, 4)")
    raises(ValueError, lambda: FlowDistribution(base, flow, torch.randn(5, 3)), "(5, 3)", "do not broadcast")
    assert FlowDistribution(base, flow, torch.randn(6, 3)).rsample((4,)).shape == (4, 6, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a GPU can load onto cuda")
def test_load_model_onto_cuda_without_a_gpu(tmp_path):
    raises(ValueError, lambda: load_model(tmp_path, device="cuda"), "device='cuda'", "CUDA is not available", "cpu")


@pytest.mark.parametrize("device", ["bogus", "cuda:99" if torch.cuda.is_available() else "meta"])
def test_load_model_onto_an_unknown_device(tmp_path, device):
    raises(ValueError, lambda: load_model(tmp_path, device=device), f"device={device!r}", "use auto, cpu, cuda")


def test_load_model_device_of_the_wrong_type(tmp_path):
    raises(TypeError, lambda: load_model(tmp_path, device=0.5), "device must be", "float")


def test_log_marginal_likelihood_with_data_of_the_wrong_width():
    model = build_model(ModelConfig(name="mlp", activation="tanh", hidden=8, latent_dim=2), FlowConfig(length=1), 784)
    message = raises(ValueError, lambda: log_marginal_likelihood(model, torch.rand(3, 100), 3), "x has shape (3, 100)")
    assert "(784,)" in message and "expected (N, 784)" in message
    raises(TypeError, lambda: log_marginal_likelihood(model, [[0.0] * 784], 3), "x must be a torch.Tensor")
    assert log_marginal_likelihood(model, torch.rand(3, 1, 28, 28), 3).shape == (3,)  # shaped images are fine
