"""Free-energy terms (Eq. 15) and annealing (Eq. 20): schedule values, loss modes, prior at z_K."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal

from nfvi.config import FlowConfig
from nfvi.errors import NfviError
from nfvi.vae.config import TrainerConfig
from nfvi.vae.model import ModelConfig, PosteriorSample, build_model
from nfvi.vae.objectives import ANNEALING, TERMS, annealed_loss, beta_schedule, free_energy_terms


class AffineFlowLinearGaussian(nn.Module):
    """p(z) = N(0, I), p(x|z) = N(Wz + b, s^2 I); q_0 = N(0, I) and a one-layer affine "flow"
    z_K = m(x) + shift + scale L z_0 with L L^T = posterior covariance: q_K is the exact posterior
    when shift = 0 and scale = 1, and otherwise KL(q_K || posterior) is known in closed form."""

    def __init__(self, x_dim: int = 5, z_dim: int = 3, noise: float = 0.7, shift: float = 0.0, scale: float = 1.0):
        super().__init__()
        self.W, self.b, self.s = torch.randn(x_dim, z_dim), torch.randn(x_dim), noise
        self.shift, self.scale = torch.full((z_dim,), shift), scale
        self.cov = torch.linalg.inv(torch.eye(z_dim) + self.W.T @ self.W / noise**2)
        self.chol = torch.linalg.cholesky(self.cov)

    @property
    def prior(self):
        z_dim = self.W.shape[1]
        return Independent(Normal(torch.zeros(z_dim), torch.ones(z_dim)), 1)

    def exact_log_px(self, x):
        cov = self.W @ self.W.T + self.s**2 * torch.eye(self.W.shape[0])
        return MultivariateNormal(self.b, cov).log_prob(x)

    def sample_posterior(self, x, num_samples):
        mean = (x - self.b) @ self.W @ self.cov / self.s**2  # (B, d)
        z_0 = torch.randn(num_samples, *mean.shape)
        z_k = mean + self.shift + self.scale * z_0 @ self.chol.T
        log_det = (self.chol.diagonal().log().sum() + z_0.shape[-1] * math.log(self.scale)).expand(z_0.shape[:-1])
        return PosteriorSample(z_0, z_k, self.prior.log_prob(z_0), log_det)

    def log_likelihood(self, x, z):
        return Normal(z @ self.W.T + self.b, self.s).log_prob(x).sum(-1)

    def kl_to_posterior(self):
        d = self.shift.shape[0]
        mahalanobis = self.shift @ torch.linalg.solve(self.cov, self.shift)
        return 0.5 * (d * self.scale**2 + mahalanobis - d - 2 * d * math.log(self.scale))


@pytest.mark.parametrize(
    "step, expected", [(0, 0.01), (1, 0.0101), (5000, 0.51), (9899, 0.9999), (9900, 1.0), (10_000, 1.0), (500_000, 1.0)]
)
@pytest.mark.parametrize("mode", ["eq20", "kl_warmup"])
def test_beta_schedule_is_eq20(step, expected, mode):
    assert beta_schedule(step, mode) == pytest.approx(expected, abs=1e-12)


def test_beta_schedule_options():
    assert beta_schedule(0, "none") == 1.0 and beta_schedule(3, "eq20", steps=0) == 1.0
    assert beta_schedule(50, "eq20", start=0.1, steps=100) == pytest.approx(0.6)
    with pytest.raises(NfviError, match="trainer.annealing='std' is not allowed; choose one of: eq20, kl_warmup, none"):
        TrainerConfig(annealing="std")  # checked once, in the schema, not at every update


def test_annealed_loss_formulas():
    terms = {"log_px_z": torch.tensor([-80.0]), "log_pz": torch.tensor([-30.0]), "log_qk": torch.tensor([-10.0])}
    terms["elbo"] = terms["log_px_z"] + terms["log_pz"] - terms["log_qk"]
    # Eq. 20: beta multiplies the whole log joint; KL warm-up: beta multiplies log q_K - log p(z_K) only
    assert annealed_loss(terms, 0.5, "eq20").item() == pytest.approx(-10.0 + 0.5 * 110.0)
    assert annealed_loss(terms, 0.5, "kl_warmup").item() == pytest.approx(80.0 + 0.5 * 20.0)
    assert annealed_loss(terms, 0.5, "none").item() == pytest.approx(100.0)


@pytest.mark.parametrize("kind", ["none", "planar", "radial", "nice"])
def test_terms_shapes_and_identities(kind, float64):
    model = build_model(ModelConfig(latent_dim=4, hidden=8), FlowConfig(kind=kind, length=2), 10)
    x = torch.bernoulli(torch.full((6, 10), 0.3))
    terms = free_energy_terms(model, x, num_samples=3)
    assert set(terms) == set(TERMS) and all(v.shape == (6,) for v in terms.values())
    assert torch.allclose(terms["log_qk"], terms["log_q0"] - terms["log_det"])
    assert torch.allclose(terms["elbo"], terms["log_px_z"] + terms["log_pz"] - terms["log_qk"])
    for mode in ANNEALING:  # at beta = 1 every mode is the negative ELBO
        assert torch.allclose(annealed_loss(terms, 1.0, mode), -terms["elbo"])


def test_exact_posterior_flow_gives_exact_elbo_per_sample(float64):
    """With q_K equal to the true posterior, log p(x, z_K) - log q_K(z_K) = log p(x) for every draw.

    This fails if the prior were taken at z_0 (or the log-det had the wrong sign)."""
    model = AffineFlowLinearGaussian()
    x = torch.randn(4, 5) * 2
    exact = model.exact_log_px(x)
    for num_samples in (1, 3):
        terms = free_energy_terms(model, x, num_samples)
        assert torch.allclose(terms["elbo"], exact, atol=1e-10)
    sample = model.sample_posterior(x, 1)
    wrong = model.log_likelihood(x, sample.z_k) + model.prior.log_prob(sample.z_0) - sample.log_q0 + sample.log_det
    assert (wrong[0] - exact).abs().max() > 0.1


def test_vae_prior_is_taken_at_z_k(float64):
    model = build_model(ModelConfig(latent_dim=4, hidden=8), FlowConfig(kind="planar", length=3), 10)
    with torch.no_grad():
        model.flow.head.bias.add_(torch.randn_like(model.flow.head.bias))  # a flow that moves z
    x = torch.bernoulli(torch.full((5, 10), 0.3))
    torch.manual_seed(7)
    sample = model.sample_posterior(x, 2)
    torch.manual_seed(7)
    terms = free_energy_terms(model, x, 2)
    assert torch.allclose(terms["log_pz"], model.prior.log_prob(sample.z_k).mean(0))
    assert not torch.allclose(terms["log_pz"], model.prior.log_prob(sample.z_0).mean(0), atol=1e-3)
    assert torch.allclose(terms["log_px_z"], model.decode(sample.z_k).log_prob(x).mean(0))
    assert torch.allclose(terms["log_q0"], model.encode(x)[0].log_prob(sample.z_0).mean(0))


def test_elbo_gap_is_the_kl_to_the_posterior(float64):
    """With a shifted, widened q_K: E[elbo] = log p(x) - KL(q_K || p(z|x)) < log p(x)."""
    model = AffineFlowLinearGaussian(shift=0.5, scale=1.5)
    x = torch.randn(3, 5)
    num_samples = 20_000
    terms = free_energy_terms(model, x, num_samples)
    exact, kl = model.exact_log_px(x), model.kl_to_posterior()
    sample = model.sample_posterior(x, 2000)
    log_w = model.log_likelihood(x, sample.z_k) + model.prior.log_prob(sample.z_k) - sample.log_q0 + sample.log_det
    std = log_w.std(0)
    assert ((terms["elbo"] - (exact - kl)).abs() < 4 * std / math.sqrt(num_samples)).all()
    assert (terms["elbo"] < exact).all() and kl > 0.5
