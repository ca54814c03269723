"""model=conv (nfvi.vae.conv): shapes for CIFAR-10 images, MNIST images and patches with every flow, the amortized
flow context, gradients, errors, a few training steps lowering the loss on generated 8-bit images, and the
importance-sampling estimator's chunking with the conv model."""

from __future__ import annotations

import pytest
import torch

from nfvi.config import FlowConfig
from nfvi.data.cifar import fake_color_images
from nfvi.errors import NfviError
from nfvi.estimators import elbo, log_marginal_likelihood, nats_to_bits_per_dim
from nfvi.vae.conv import ConvDecoder, ConvEncoder, downsamplings
from nfvi.vae.model import ModelConfig, build_model, model_input_shape
from nfvi.vae.objectives import annealed_loss, free_energy_terms
from tests.conftest import compose


@pytest.fixture(autouse=True)
def seeded(one_thread):
    """One thread (tests/conftest.py) and a fixed seed in a forked random stream."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


def conv_cfg(likelihood="discretized_logistic", **kw) -> ModelConfig:
    base = {"name": "conv", "activation": "relu", "latent_dim": 8, "hidden": 32, "channels": 8}
    return ModelConfig(likelihood=likelihood, **{**base, **kw})


@pytest.mark.parametrize(
    "shape, likelihood, params",
    [((3, 32, 32), "discretized_logistic", 6), ((1, 28, 28), "bernoulli", 1), ((3, 8, 8), "logit_normal", 3)],
    ids=["cifar", "mnist", "patches"],
)
@pytest.mark.parametrize("flow", ["none", "planar", "radial", "nice"])
def test_shapes_for_each_image_size_and_flow(shape, likelihood, params, flow):
    model = build_model(conv_cfg(likelihood), FlowConfig(kind=flow, length=3), shape)
    x = torch.randint(0, 256, (5, *shape), dtype=torch.uint8)
    if likelihood == "bernoulli":
        x = (x > 127).float()
    q0, h = model.encode(x.flatten(1))  # flat input is accepted and reshaped
    assert h.shape == (5, 32) and q0.batch_shape == (5,) and q0.event_shape == (8,)
    z, log_q = model.posterior(x, 4)
    assert z.shape == (4, 5, 8) and log_q.shape == (4, 5)
    assert model.decoder(z).shape == (4, 5, params, *shape[1:])
    log_pxz = model.log_joint(x, z)
    assert log_pxz.shape == (4, 5) and torch.isfinite(log_pxz).all()
    if flow in ("planar", "radial"):  # amortized: the encoder's features are the flow's context
        assert model.flow.context_dim == 32


def test_downsamplings_and_feature_sizes():
    assert [downsamplings(s, s) for s in (32, 28, 8, 16, 7, 4, 64)] == [3, 2, 1, 2, 0, 0, 3]
    cfg = conv_cfg()
    enc, dec = ConvEncoder((3, 32, 32), cfg), ConvDecoder((3, 32, 32), cfg)
    assert dec.start == (64, 4, 4) and enc.out_dim == 32 and dec.output_bias.shape == (6, 32, 32)


def test_gradients_reach_encoder_flow_head_and_decoder():
    model = build_model(conv_cfg(), FlowConfig(kind="planar", length=2), (3, 16, 16))
    x = fake_color_images(4, torch.Generator().manual_seed(1), side=16).flatten(1)
    (-free_energy_terms(model, x, 2)["elbo"].mean()).backward()
    for name, part in [("encoder", model.encoder), ("flow", model.flow), ("decoder", model.decoder)]:
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name


def test_input_shape_and_errors():
    assert model_input_shape(conv_cfg(), (3, 32, 32)) == (3, 32, 32)
    assert model_input_shape(ModelConfig(), (1, 28, 28)) == 784  # the MLP models stay flat (MNIST unchanged)
    with pytest.raises(NfviError, match="needs image-shaped data") as info:
        build_model(conv_cfg(), FlowConfig(kind="none", length=0), 3072)
    assert "\n" not in str(info.value)
    with pytest.raises(NfviError, match="no maxout layers"):
        build_model(conv_cfg(activation="maxout"), FlowConfig(kind="none", length=0), (3, 8, 8))
    with pytest.raises(NfviError, match="model.channels=0"):
        build_model(conv_cfg(channels=0), FlowConfig(kind="none", length=0), (3, 8, 8))


def test_conv_yaml_composes_with_the_schema():
    cfg = compose("train", ["model=conv", "model.likelihood=discretized_logistic"])
    assert cfg.model.name == "conv" and cfg.model.channels == 32 and cfg.model.activation == "relu"
    model = build_model(cfg.model, cfg.flow, model_input_shape(cfg.model, (3, 32, 32)))
    assert model.x_shape == (3, 32, 32)


def test_a_few_training_steps_lower_the_loss_on_generated_images():
    x_all = fake_color_images(64, torch.Generator().manual_seed(0), side=16).flatten(1)
    model = build_model(conv_cfg(latent_dim=8, hidden=64), FlowConfig(kind="planar", length=2), (3, 16, 16))
    model.init_output_bias(x_all.double().mean(0).float() / 255)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    before = -float(elbo(model, x_all, num_samples=4).mean())
    losses = []
    for _ in range(60):
        x = x_all[torch.randperm(64, generator=gen)[:32]]
        loss = annealed_loss(free_energy_terms(model, x), 1.0, "none").mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    torch.manual_seed(0)
    after = -float(elbo(model, x_all, num_samples=4).mean())
    assert sum(losses[-10:]) < sum(losses[:10])
    # measured: about 10.2 -> 7.9 bits/dim (the images carry +-3 levels of noise, about 2.6 bits/dim)
    assert nats_to_bits_per_dim(after, 768) < nats_to_bits_per_dim(before, 768) - 1.0


def test_importance_sampling_chunking_with_the_conv_model():
    model = build_model(conv_cfg(latent_dim=8), FlowConfig(kind="planar", length=3), (3, 8, 8)).double()
    x = torch.randint(0, 256, (6, 192), dtype=torch.uint8)
    results = []
    for batch_size in (16 * 6, 16 * 2, 8, 16):  # all points at once, 2 points per chunk, sample chunks of 8, 1 point
        torch.manual_seed(3)
        results.append(log_marginal_likelihood(model, x, 16, batch_size=batch_size))
    for other in results[1:]:
        assert torch.allclose(other, results[0], atol=1e-8)
    torch.manual_seed(3)
    bound = elbo(model, x, 16, batch_size=16)
    assert (results[0] >= bound - 1e-9).all() and results[0].dtype == torch.float64
