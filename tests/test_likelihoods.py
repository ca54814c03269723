"""nfvi.vae.likelihoods: the discretized logistic is a proper distribution over the 256 values of a pixel (in every
regime, with finite gradients), the logit-normal is the density of the scaled pixels, bits/dim, and how the model
uses them (parameter blocks, uint8 inputs, output-bias init, likelihood/data checks)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, SigmoidTransform, TransformedDistribution

from nfvi.config import FlowConfig
from nfvi.errors import NfviError
from nfvi.estimators import nats_to_bits_per_dim
from nfvi.vae.likelihoods import (
    LOGIT_NORMAL_LAMBDA,
    MIN_LOG_SCALE,
    SPECS,
    DiscretizedLogistic,
    LogitNormal,
    split_params,
)
from nfvi.vae.model import LIKELIHOODS, ModelConfig, build_model, check_likelihood_fits

LEVELS = torch.arange(256, dtype=torch.float64) / 255


def grid_log_probs(loc: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(k) for every k (first axis) and every (loc, log_scale) pair."""
    d = DiscretizedLogistic(loc, log_scale)
    return d.log_prob(LEVELS.view(-1, *([1] * loc.dim())))


@pytest.mark.parametrize(
    "loc, log_scale",
    [(0.5, -3.0), (0.0, -6.0), (1.0, -9.9), (-3.0, 0.0), (4.0, -2.0), (0.37, 2.0), (0.5, -30.0), (0.71, 8.0)],
    ids=["mid", "at-0-sharp", "at-1-sharp", "far-below", "far-above", "wide", "degenerate", "huge-scale"],
)
def test_discretized_logistic_sums_to_one_over_the_256_values(float64, loc, log_scale):
    log_p = grid_log_probs(torch.tensor([loc]), torch.tensor([log_scale]))
    assert torch.isfinite(log_p).all() and (log_p <= 1e-12).all()
    assert torch.logsumexp(log_p, 0).item() == pytest.approx(0.0, abs=1e-9)


def test_discretized_logistic_normalises_for_random_parameters(float64):
    loc, log_scale = torch.randn(500) * 1.5 + 0.5, torch.rand(500) * 12 - 9
    total = torch.logsumexp(grid_log_probs(loc, log_scale), 0)
    assert torch.allclose(total, torch.zeros_like(total), atol=1e-9)


def test_discretized_logistic_matches_cdf_differences(float64):
    loc, log_scale = torch.tensor(0.4), torch.tensor(-2.5)
    cdf = lambda v: torch.sigmoid((v - loc) / log_scale.exp())  # noqa: E731
    edges = (torch.arange(257, dtype=torch.float64) - 0.5) / 255
    mass = cdf(edges[1:]) - cdf(edges[:-1])
    mass[0], mass[-1] = cdf(edges[1]), 1 - cdf(edges[-2])
    assert torch.allclose(grid_log_probs(loc, log_scale).exp(), mass, atol=1e-12)
    # rounding: any x inside a bin gets that bin's mass
    d = DiscretizedLogistic(loc, log_scale)
    assert torch.allclose(d.log_prob(torch.tensor(100.4 / 255)), d.log_prob(torch.tensor(100 / 255)))


def test_discretized_logistic_gradients_are_finite_in_extreme_regimes():
    loc = torch.tensor([0.0, 1.0, -5.0, 6.0, 0.5, 0.5], requires_grad=True)
    log_scale = torch.tensor([-9.0, -9.0, -9.0, -9.0, 7.0, -12.0], requires_grad=True)
    x = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.5])
    DiscretizedLogistic(loc, log_scale).log_prob(x).sum().backward()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(log_scale.grad).all()


def test_discretized_logistic_samples_follow_the_probabilities():
    torch.manual_seed(0)
    d = DiscretizedLogistic(torch.tensor(0.02), torch.tensor(-4.0))
    x = d.sample((20000,))
    k = torch.round(x * 255).long()
    assert torch.allclose(x * 255, k.double().float(), atol=1e-4) and k.min() >= 0 and k.max() <= 255
    probs = grid_log_probs(torch.tensor(0.02, dtype=torch.float64), torch.tensor(-4.0, dtype=torch.float64)).exp()
    freq = torch.bincount(k, minlength=256).double() / len(k)
    assert (freq - probs).abs().max() < 0.015 and freq[0] > 0.2  # the open edge bin at 0 collects the tail


def test_logit_normal_is_the_density_of_the_scaled_pixels(float64):
    loc = torch.randn(7)
    x = torch.rand(7)
    y = LOGIT_NORMAL_LAMBDA + (1 - 2 * LOGIT_NORMAL_LAMBDA) * x
    reference = TransformedDistribution(Normal(loc, 1.0), [SigmoidTransform()]).log_prob(y)
    assert torch.allclose(LogitNormal(loc).log_prob(x), reference, atol=1e-10)
    # a density on (0, 1): integrates to one (quadrature in logit space covers the edges)
    t = torch.linspace(-12, 12, 200001)
    yy = torch.sigmoid(t)
    xx = (yy - LOGIT_NORMAL_LAMBDA) / (1 - 2 * LOGIT_NORMAL_LAMBDA)
    dens = LogitNormal(torch.tensor(0.3)).log_prob(xx).exp() * yy * (1 - yy)  # dy = y (1 - y) dt
    assert torch.trapezoid(dens, t).item() == pytest.approx(1.0, abs=1e-6)
    # pixel 0 or 255 has a finite, large density (scaled into [1e-4, 1 - 1e-4])
    assert torch.isfinite(LogitNormal(torch.tensor([-9.0, 9.0])).log_prob(torch.tensor([0.0, 1.0]))).all()


def test_bits_per_dim_conversion():
    assert nats_to_bits_per_dim(3072 * math.log(256), 3072) == pytest.approx(8.0)
    assert nats_to_bits_per_dim(torch.tensor([192 * math.log(2)]), 192).item() == pytest.approx(1.0)
    # a discretized logistic as wide as the pixel range costs a little more than 8 bits per value on uniform data
    d = DiscretizedLogistic(torch.full((30720,), 0.5), torch.full((30720,), -2.0))
    nll = -d.log_prob(torch.randint(0, 256, (30720,), generator=torch.Generator().manual_seed(0)) / 255).sum()
    assert 8.0 < nats_to_bits_per_dim(float(nll), 30720) < 8.5


def test_registered_likelihoods_and_parameter_blocks():
    assert set(LIKELIHOODS) == {"bernoulli", "discretized_logistic", "logit_normal"}
    assert {n: (s.num_params, s.data_kind, s.discrete) for n, s in SPECS.items()} == {
        "bernoulli": (1, "binary", True),
        "discretized_logistic": (2, "8bit", True),
        "logit_normal": (1, "8bit", False),
    }
    params = torch.randn(4, 5, 6, 8, 8)  # (S, B, 2*C, H, W)
    loc, raw = split_params(params, 2, 3)
    assert torch.equal(loc, params[:, :, :3]) and torch.equal(raw, params[:, :, 3:])
    dist = LIKELIHOODS["discretized_logistic"](params, 3)
    assert dist.batch_shape == (4, 5) and dist.event_shape == (3, 8, 8)
    assert (dist.base_dist.log_scale >= MIN_LOG_SCALE).all()
    flat = LIKELIHOODS["discretized_logistic"](torch.randn(5, 2 * 192), 1)
    assert flat.event_shape == (192,)


def test_mlp_decoder_emits_p_blocks_and_the_model_reads_uint8_as_k_over_255(float64):
    model_cfg = ModelConfig(name="mlp", activation="tanh", hidden=32, latent_dim=4, likelihood="discretized_logistic")
    model = build_model(model_cfg, FlowConfig(kind="planar", length=2), 192)
    x = torch.randint(0, 256, (6, 192), dtype=torch.uint8)
    assert torch.equal(model.prepare(x), x.double() / 255)
    z, log_q = model.posterior(x, 3)
    assert model.decoder(z).shape == (3, 6, 384) and model.log_joint(x, z).shape == (3, 6)
    # same numbers from uint8 values and from k/255 floats
    assert torch.allclose(model.log_likelihood(x, z), model.log_likelihood(x.double() / 255, z))


def test_output_bias_starts_at_the_mean_image(float64):
    model_cfg = ModelConfig(name="mlp", activation="tanh", hidden=16, latent_dim=3, likelihood="discretized_logistic")
    model = build_model(model_cfg, FlowConfig(kind="none", length=0), 12)
    mean = torch.rand(12)
    with torch.no_grad():
        model.decoder.net[-1].weight.zero_()
    model.init_output_bias(mean)
    dist = model.decode(torch.zeros(1, 3)).base_dist
    assert torch.allclose(dist.loc, mean[None]) and torch.allclose(dist.log_scale, torch.full((1, 12), math.log(0.05)))
    model_cfg.likelihood = "logit_normal"
    model = build_model(model_cfg, FlowConfig(kind="none", length=0), 12)
    with torch.no_grad():
        model.decoder.net[-1].weight.zero_()
    model.init_output_bias(mean)
    y = LOGIT_NORMAL_LAMBDA + (1 - 2 * LOGIT_NORMAL_LAMBDA) * mean
    assert torch.allclose(torch.sigmoid(model.decode(torch.zeros(1, 3)).base_dist.loc), y[None])


def test_likelihood_must_fit_the_data_kind():
    check_likelihood_fits("bernoulli", "binary")
    check_likelihood_fits("discretized_logistic", "8bit")
    with pytest.raises(NfviError, match="use model.likelihood=discretized_logistic") as info:
        check_likelihood_fits("bernoulli", "8bit", "cifar10")
    assert "dataset=cifar10" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(NfviError, match="use model.likelihood=bernoulli"):
        check_likelihood_fits("logit_normal", "binary", "mnist")
