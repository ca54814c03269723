"""The importance-sampling estimator of log p(x): exact cases, quadrature, bounds, chunking."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal

from nfvi.config import FlowConfig
from nfvi.errors import NfviError
from nfvi.estimators import _chunks, elbo, log_marginal_likelihood, log_weights, nats_to_bits_per_dim
from nfvi.vae.model import ModelConfig, build_model


class LinearGaussian(nn.Module):
    """p(z) = N(0, I_d), p(x|z) = N(Wz + b, s^2 I). Proposal q(z|x) = N(m(x) + shift, scale^2 Sigma(x)),
    which is the exact posterior N(m, Sigma) when shift = 0 and scale = 1. Exposes the estimator's
    interface: ``posterior(x, S) -> (z (S, B, d), log q (S, B))`` and ``log_joint(x, z)``."""

    def __init__(self, x_dim=4, z_dim=2, noise=0.5, shift=0.0, scale=1.0):
        super().__init__()
        gen = torch.Generator().manual_seed(11)
        self.W = torch.randn(x_dim, z_dim, generator=gen)
        self.b = torch.randn(x_dim, generator=gen)
        self.s, self.shift, self.scale = noise, shift, scale
        self.cov = torch.linalg.inv(torch.eye(z_dim) + self.W.T @ self.W / noise**2)

    def exact_log_px(self, x):
        return MultivariateNormal(self.b, self.W @ self.W.T + self.s**2 * torch.eye(self.W.shape[0])).log_prob(x)

    def proposal(self, x):
        mean = (x - self.b) @ self.W @ self.cov / self.s**2 + self.shift
        return MultivariateNormal(mean, self.scale**2 * self.cov)

    def posterior(self, x, num_samples):
        q = self.proposal(x)
        z = q.sample((num_samples,))
        return z, q.log_prob(z)

    def log_joint(self, x, z):
        prior = Independent(Normal(torch.zeros(z.shape[-1]), 1.0), 1)
        return Normal(z @ self.W.T + self.b, self.s).log_prob(x).sum(-1) + prior.log_prob(z)


def small_vae(kind="planar", latent_dim=4, x_dim=10, hidden=8, length=2):
    model = build_model(ModelConfig(latent_dim=latent_dim, hidden=hidden), FlowConfig(kind=kind, length=length), x_dim)
    with torch.no_grad():
        for p in model.flow.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def binary(n, dim=10, p=0.3):
    return torch.bernoulli(torch.full((n, dim), p))


@pytest.mark.parametrize("num_samples", [1, 5, 64])
@pytest.mark.parametrize("batch_size", [3, 50, None], ids=["chunk3", "chunk50", "default"])
def test_exact_posterior_proposal_is_exact_for_any_s(num_samples, batch_size, float64):
    model = LinearGaussian()
    x = torch.randn(7, 4) * 2
    estimate = log_marginal_likelihood(model, x, num_samples, batch_size=batch_size)
    assert estimate.shape == (7,)
    assert torch.allclose(estimate, model.exact_log_px(x), atol=1e-10)
    assert torch.allclose(elbo(model, x, num_samples, batch_size=batch_size), model.exact_log_px(x), atol=1e-10)


def test_poor_proposal_converges_from_below(float64):
    model = LinearGaussian(shift=0.2, scale=1.5)
    x = torch.randn(5, 4)
    exact = model.exact_log_px(x)
    repeats = 500
    xs = x.repeat(repeats, 1)
    means = {}
    for num_samples in (1, 10, 1000):
        estimate = log_marginal_likelihood(model, xs, num_samples, batch_size=20_000).view(repeats, 5)
        means[num_samples] = estimate.mean(0)
        # on average below log p(x) (a stochastic lower bound), up to Monte Carlo error
        assert (means[num_samples] < exact + 4 * estimate.std(0) / math.sqrt(repeats)).all()
    assert (means[1] < means[10]).all() and (means[10] < means[1000]).all()
    assert (exact - means[1] > 0.3).all()
    assert (exact - means[1000]).abs().max() < 0.02


def test_matches_quadrature_for_a_2d_bernoulli_vae(float64):
    """log p(x) = log sum_grid p(x|z) p(z) dA for a 2-D latent, against IS through the planar-flow proposal."""
    torch.manual_seed(5)
    model = small_vae("planar", latent_dim=2, x_dim=10, hidden=8)
    with torch.no_grad():
        model.decoder.net[-1].weight.mul_(3.0)  # a likelihood sharp enough for a non-trivial posterior
        model.gaussian_head.bias[2:] += 1.0  # q_0 wider than the posterior: importance weights with light tails
    x = binary(3)
    grid = torch.linspace(-8, 8, 401)
    step = (grid[1] - grid[0]).item()
    z = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), dim=-1).reshape(-1, 1, 2)  # (G, 1, 2)
    with torch.no_grad():
        quadrature = torch.logsumexp(model.log_joint(x, z), dim=0) + 2 * math.log(step)
    estimate = log_marginal_likelihood(model, x, 20_000, batch_size=8192)
    assert (estimate - quadrature).abs().max() < 0.03
    assert (elbo(model, x, 2000) < quadrature - 0.1).all()  # the proposal is not the posterior


def test_elbo_below_is_estimate_with_the_same_draws():
    model = small_vae()
    x = binary(8)
    torch.manual_seed(0)
    lower = elbo(model, x, 50)
    torch.manual_seed(0)
    upper = log_marginal_likelihood(model, x, 50)
    assert (lower <= upper + 1e-9).all() and (upper - lower).max() > 0


def test_one_sample_is_equals_one_sample_elbo(float64):
    model = small_vae()
    x = binary(4)
    torch.manual_seed(1)
    one = log_marginal_likelihood(model, x, 1)
    torch.manual_seed(1)
    assert torch.equal(one, elbo(model, x, 1))  # identical draws: log-mean-exp of one weight is that weight
    # in expectation: the mean of many independent S=1 estimates is the (many-sample) ELBO
    repeats = 3000
    single = log_marginal_likelihood(model, x.repeat(repeats, 1), 1).view(repeats, 4)
    reference = elbo(model, x, 20_000)
    assert ((single.mean(0) - reference).abs() < 4 * single.std(0) / math.sqrt(repeats) + 0.01).all()


@pytest.mark.parametrize("batch_size", [16, 40, 64, 200, 10_000])
def test_chunk_size_invariance_same_seed(batch_size, float64):
    """S * D = 32 * 4 and batch_size * D are multiples of 16, so the VAE's draws coincide across chunkings."""
    model = small_vae()
    x = binary(9)
    torch.manual_seed(2)
    reference = log_marginal_likelihood(model, x, 32, batch_size=32 * 9)
    torch.manual_seed(2)
    chunked = log_marginal_likelihood(model, x, 32, batch_size=batch_size)
    assert torch.allclose(chunked, reference, atol=1e-10)


@pytest.mark.parametrize("points", [1, 3])
def test_decoding_in_blocks_gives_the_same_log_weights(points, float64):
    """log_weights(block=n): log_joint takes at most n z-samples at a time (samples x points), same numbers."""
    model = small_vae()
    x = binary(points)
    seen = []
    log_joint = model.log_joint
    model.log_joint = lambda x, z: seen.append(z.shape[0] * z.shape[1]) or log_joint(x, z)
    torch.manual_seed(3)
    whole = log_weights(model, x, 50)
    torch.manual_seed(3)
    blocked = log_weights(model, x, 50, block=7)
    assert seen[0] == 50 * points and max(seen[1:]) <= 7 and sum(seen[1:]) == 50 * points
    assert blocked.shape == whole.shape == (50, points) and torch.allclose(blocked, whole, atol=1e-12)


def test_cpu_evaluation_decodes_at_most_the_cpu_block_at_once(monkeypatch):
    """The default CPU chunk (5,000 samples: one posterior draw per image at S=5000) is decoded in blocks."""
    import nfvi.estimators as estimators

    monkeypatch.setattr(estimators, "CPU_DECODE_BLOCK", 300)
    model = small_vae()
    seen = []
    log_joint = model.log_joint
    model.log_joint = lambda x, z: seen.append(z.shape[0] * z.shape[1]) or log_joint(x, z)
    out = log_marginal_likelihood(model, binary(2), 1000)
    assert out.shape == (2,) and torch.isfinite(out).all()
    assert estimators.default_batch_size(torch.device("cpu")) == 5000
    assert max(seen) <= 300 and sum(seen) == 2 * 1000
    seen.clear()  # one sample per image (the trainer's validation): at most 300 images per chunk, decoded at once
    encoded = []
    encoder = model.encoder.forward
    model.encoder.forward = lambda x: encoded.append(x.shape[0]) or encoder(x)
    assert elbo(model, binary(700), 1).shape == (700,)
    assert max(seen) <= 300 and max(encoded) <= 300 and sum(encoded) == 700


def test_chunk_size_statistical_consistency(float64):
    """Sizes that do not line up with the generator's blocks: different draws, same distribution."""
    model = small_vae()
    x = binary(2)
    repeats = 200
    xs = x.repeat(repeats, 1)
    a = log_marginal_likelihood(model, xs, 7, batch_size=3).view(repeats, 2)  # 1 point, samples in 3+3+1
    b = log_marginal_likelihood(model, xs, 7, batch_size=10_000).view(repeats, 2)  # 1428 points at once
    se = ((a.var(0) + b.var(0)) / repeats).sqrt()
    assert ((a.mean(0) - b.mean(0)).abs() < 4 * se).all()


@pytest.mark.parametrize("max_points", [None, 2])
def test_chunks_cover_everything_within_budget(max_points):
    for n, s, budget in [(10, 7, 3), (10, 7, 7), (10, 7, 20), (1, 5000, 1000), (3, 5001, 1000), (0, 5, 10)]:
        covered = []
        for start, stop, sizes in _chunks(n, s, budget, max_points):
            assert sum(sizes) == s and (stop - start) * max(sizes) <= budget
            assert max_points is None or stop - start <= max_points
            covered.extend(range(start, stop))
        assert covered == list(range(n))


def test_runs_in_inference_mode_returns_cpu_float64_and_restores_train_mode():
    model = small_vae().train()
    x = binary(3).reshape(3, 1, 2, 5)  # image-shaped input is flattened by the model
    out = log_marginal_likelihood(model, x, 4)
    assert out.device.type == "cpu" and out.dtype == torch.float64 and not out.requires_grad
    assert model.training and torch.isfinite(out).all()
    with torch.inference_mode():
        assert log_weights(model, x, 4).shape == (4, 3)


def test_bad_arguments():
    model = small_vae()
    with pytest.raises(NfviError, match="num_samples=0"):
        log_marginal_likelihood(model, binary(2), 0)
    with pytest.raises(NfviError, match="batch_size=0"):
        elbo(model, binary(2), 1, batch_size=0)


def test_bits_per_dim():
    assert nats_to_bits_per_dim(784 * math.log(2.0), 784) == pytest.approx(1.0)
