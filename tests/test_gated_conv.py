"""model=gated_conv (nfvi.vae.gated_conv): the Sylvester-flows gated convnet. Layer shapes, the gate formula against a
manual computation, the parameter count against the Sylvester code's, a VAE with a planar flow (free energy, one
Adamax step, importance sampling), refusals, the composed config and a two-step `nfvi train` run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nfvi.config import FlowConfig
from nfvi.estimators import log_marginal_likelihood
from nfvi.vae.gated_conv import (
    GatedConv2d,
    GatedConvDecoder,
    GatedConvEncoder,
    GatedConvTranspose2d,
    gated_conv_architecture,
    unit_variance_init,
)
from nfvi.vae.model import IMAGE_ARCHITECTURES, ModelConfig, build_model, model_input_shape
from nfvi.vae.objectives import free_energy_terms
from tests.conftest import compose, one_line_error

X_SHAPE = (1, 28, 28)


@pytest.fixture(autouse=True)
def seeded(one_thread):
    """One thread (tests/conftest.py) and a fixed seed in a forked random stream."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


def cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"name": "gated_conv", "latent_dim": 8, "likelihood": "bernoulli", "activation": "relu", **kw})


def binary_images(n: int, seed: int = 1) -> torch.Tensor:
    return (torch.rand(n, *X_SHAPE, generator=torch.Generator().manual_seed(seed)) < 0.3).float()


def test_encoder_and_decoder_shapes_with_leading_sample_dims():
    enc, dec = gated_conv_architecture(X_SHAPE, cfg())
    h = enc(binary_images(5))
    assert enc.out_dim == 256 and h.shape == (5, 256)
    assert dec(torch.randn(4, 5, 8)).shape == (4, 5, 1, 28, 28)
    assert dec(torch.randn(5, 8)).shape == (5, 1, 28, 28)
    assert dec(torch.randn(2, 3, 5, 8)).shape == (2, 3, 5, 1, 28, 28)
    assert dec.output_bias.shape == X_SHAPE
    assert "gated_conv" in IMAGE_ARCHITECTURES and model_input_shape(cfg(), X_SHAPE) == X_SHAPE


def test_every_layer_has_the_documented_output_shape():
    enc, dec = GatedConvEncoder(), GatedConvDecoder(X_SHAPE, 8)
    shapes = []
    for layer in [*enc.net, *dec.net]:
        layer.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape[1:])))
    enc(binary_images(2))
    dec(torch.randn(2, 8))
    assert shapes == [
        (32, 28, 28), (32, 14, 14), (64, 14, 14), (64, 7, 7), (64, 7, 7), (256, 1, 1),  # encoder
        (64, 7, 7), (64, 7, 7), (32, 14, 14), (32, 14, 14), (32, 28, 28), (32, 28, 28), (1, 28, 28),  # decoder
    ]  # fmt: skip


def _manual(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The convolution ``conv`` by the functional API, from its weights and settings."""
    if isinstance(conv, nn.ConvTranspose2d):
        return F.conv_transpose2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.output_padding)
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)


def test_each_gated_layer_is_a_times_sigmoid_b():
    """A(x) * sigmoid(B(x)) with A linear (the Sylvester binary model), for every layer of both networks."""
    enc, dec = GatedConvEncoder(), GatedConvDecoder(X_SHAPE, 8)
    seen = []

    def check(layer, inputs, out):
        x = inputs[0]
        a, b = _manual(layer.h, x), _manual(layer.g, x)
        assert torch.allclose(out, a * (1 / (1 + torch.exp(-b))), atol=1e-5)
        assert not torch.allclose(out, a) and not torch.allclose(out, torch.sigmoid(b))
        seen.append(type(layer))

    for layer in [*enc.net, *dec.net[:-1]]:
        layer.register_forward_hook(check)
    enc(binary_images(2))
    dec(torch.randn(3, 8))
    assert seen == [GatedConv2d] * 6 + [GatedConvTranspose2d] * 6
    # with an activation on A (not used by gated_conv, available to other callers): tanh(A(x)) * sigmoid(B(x))
    layer, x = GatedConv2d(2, 3, 3, 1, 1, activation=nn.Tanh()), torch.randn(2, 2, 5, 5)
    assert torch.allclose(layer(x), torch.tanh(_manual(layer.h, x)) * torch.sigmoid(_manual(layer.g, x)), atol=1e-6)


def _sylvester_count(z: int) -> int:
    """Parameters of the Sylvester code's binary VAE (models/VAE.py) for 1x28x28 input, by hand."""

    def gated(c_in, c_out, k):  # two convolutions with bias
        return 2 * (c_in * c_out * k * k + c_out)

    encoder = [(1, 32, 5), (32, 32, 5), (32, 64, 5), (64, 64, 5), (64, 64, 5), (64, 256, 7)]
    decoder = [(z, 64, 7), (64, 64, 5), (64, 32, 5), (32, 32, 5), (32, 32, 5), (32, 32, 5)]
    heads = 2 * (256 * z + z)  # q_z_mean, q_z_var: Linear(256, z) each
    output = 32 * 1 + 1  # p_x_mean: Conv2d(32, 1, 1) with bias
    return sum(gated(*layer) for layer in encoder + decoder) + heads + output


def test_parameter_count_matches_the_sylvester_code_but_for_the_per_pixel_bias():
    model = build_model(cfg(latent_dim=64), FlowConfig(kind="none", length=0), X_SHAPE)
    ours = sum(p.numel() for p in model.parameters())
    assert _sylvester_count(64) == 3_067_105
    assert ours - _sylvester_count(64) == 28 * 28 - 1 == 783  # per-pixel output bias instead of one per channel


def test_vae_free_energy_one_adamax_step_and_importance_sampling():
    model = build_model(cfg(), FlowConfig(kind="planar", length=2), x_dim=X_SHAPE)
    assert model.flow.context_dim == 256
    x = binary_images(4)
    model.init_output_bias(x.mean(0))
    assert torch.allclose(torch.sigmoid(model.decoder.output_bias), x.mean(0).clamp(1e-3, 1 - 1e-3), atol=1e-5)
    terms = free_energy_terms(model, x.flatten(1), num_samples=1)  # flat input is reshaped
    assert set(terms) >= {"elbo", "log_px_z", "log_det"}
    assert all(t.shape == (4,) and torch.isfinite(t).all() for t in terms.values())
    opt = torch.optim.Adamax(model.parameters(), lr=5e-4, eps=1e-7)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt.zero_grad()
    (-terms["elbo"].mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    opt.step()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all() and not torch.equal(p, before[name]), name
    nll = -log_marginal_likelihood(model, x[:3], num_samples=4)
    assert nll.shape == (3,) and torch.isfinite(nll).all() and (nll > 0).all()


def _signal_across_inputs(model) -> tuple[float, float]:
    """Mean std across 16 inputs of the encoder's features (binary images) and of the decoder's logits (z ~ N(0, I))."""
    x = (torch.rand(16, *X_SHAPE) < 0.13).float()
    h = model.encoder(x)
    logits = model.decoder(torch.randn(16, model.latent_dim))
    return h.std(0).mean().item(), logits.std(0).mean().item()


def test_torch_init_vanishes_along_the_gates_and_unit_variance_keeps_the_signal():
    # the reason sylvester_quick sets model.init=unit_variance: with PyTorch's init neither the images nor z reach
    # the other end (docs: ~1e-4 and ~1e-5), with LSUV both do at order one
    flow = FlowConfig(kind="none", length=0)
    h_torch, logits_torch = _signal_across_inputs(build_model(cfg(), flow, X_SHAPE))
    h_unit, logits_unit = _signal_across_inputs(build_model(cfg(init="unit_variance"), flow, X_SHAPE))
    assert h_torch < 1e-3 and logits_torch < 1e-3
    assert 0.1 < h_unit < 3 and 0.1 < logits_unit < 3


def test_unit_variance_gives_each_gated_layer_unit_rms_on_its_probe():
    encoder = GatedConvEncoder(X_SHAPE)
    probe = torch.rand(32, *X_SHAPE).round()
    gates_before = [layer.g.weight.clone() for layer in encoder.net]
    unit_variance_init(encoder.net, probe)
    h = probe
    for layer, gate in zip(encoder.net, gates_before, strict=True):
        h = layer(h)
        assert h.square().mean().sqrt().item() == pytest.approx(1.0, rel=1e-4)
        assert torch.equal(layer.g.weight, gate) and not layer.h.bias.any()  # only A is rescaled, its bias zeroed


@pytest.mark.parametrize(
    "kw, x_dim, fragment",
    [
        ({}, 784, "takes binary 1x28x28 images (x_dim=(1, 28, 28)), got x_dim=784"),
        ({}, (3, 28, 28), "got x_dim=(3, 28, 28)"),
        ({}, (1, 32, 32), "got x_dim=(1, 32, 32)"),
        ({"likelihood": "discretized_logistic"}, X_SHAPE, "supports model.likelihood=bernoulli"),
        ({"activation": "maxout"}, X_SHAPE, "model=gated_conv has no maxout layers"),
        ({"init": "xavier"}, X_SHAPE, "model.init='xavier' is not allowed; choose one of: torch, unit_variance"),
    ],
)
def test_other_shapes_and_likelihoods_are_refused_in_one_line(kw, x_dim, fragment):
    # the schema refuses some of these itself (at validation), the builder the rest
    message = one_line_error(lambda: build_model(cfg(**kw), FlowConfig(kind="none", length=0), x_dim))
    assert fragment in message


def test_unit_variance_is_refused_for_other_architectures_in_one_line():
    message = one_line_error(lambda: ModelConfig(name="mlp", activation="relu", init="unit_variance"))
    assert "model.init=unit_variance is for model=gated_conv only (model=mlp)" in message


def test_gated_conv_yaml_composes_with_the_schema():
    cfg_ = compose("train", ["model=gated_conv"])
    assert cfg_.model.name == "gated_conv" and cfg_.model.latent_dim == 64 and cfg_.model.likelihood == "bernoulli"
    model = build_model(cfg_.model, FlowConfig(kind="planar", length=2), model_input_shape(cfg_.model, X_SHAPE))
    assert model.x_shape == X_SHAPE and model.latent_dim == 64 and model.encoder.out_dim == 256


def test_two_training_steps_and_the_test_evaluation_run(tmp_path):
    from nfvi.vae import task as train_mod

    overrides = [
        "dataset=fake", "dataset.fake_size=60", "model=gated_conv", "model.latent_dim=4", "flow=planar",
        "flow.length=2", "optim=adamax", "optim.lr=5e-4", "trainer.steps=2", "trainer.batch_size=4",
        "trainer.log_every=1", "trainer.val_every=2", "trainer.val_images=4", "trainer.ckpt_every=2",
        "trainer.progress=false", "eval.num_samples=4", "eval.elbo_samples=2", "eval.max_images=3",
        "eval.progress=false", "device=cpu",
    ]  # fmt: skip
    train_mod.train(compose("train", overrides), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["model"] == "gated_conv" and results["num_test_images"] == 3 and results["steps"] == 2
    assert results["test_nll"] > 0 and math.isfinite(results["test_neg_elbo"]) and results["finished"]
