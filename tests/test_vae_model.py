"""The DLGM/VAE: shapes for every flow kind, gradients, log q_K along the path, configs, the planar guard."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

from nfvi.config import FlowConfig, hydra_version_base
from nfvi.errors import NfviError
from nfvi.vae.model import VAE, Maxout, ModelConfig, build_model
from nfvi.vae.objectives import annealed_loss, free_energy_terms
from tests.conftest import CONF_DIR

KINDS = ["none", "planar", "radial", "nice"]
X_DIM, D, H = 12, 4, 8


def small(kind: str, length: int = 2, **model) -> VAE:
    cfg = ModelConfig(latent_dim=D, hidden=H, **model)
    return build_model(cfg, FlowConfig(kind=kind, length=length, hidden=16), X_DIM)


def binary(batch: int, dim: int = X_DIM) -> torch.Tensor:
    return torch.bernoulli(torch.full((batch, dim), 0.4))


def perturb(model: VAE, scale: float = 0.3) -> VAE:
    """Move every flow parameter off its near-identity initialisation."""
    with torch.no_grad():
        for p in model.flow.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_for_every_flow_kind(kind):
    model, x = small(kind), binary(5)
    q0, h = model.encode(x)
    assert q0.batch_shape == (5,) and q0.event_shape == (D,) and h.shape == (5, H)
    z, log_q = model.posterior(x, 3)
    assert z.shape == (3, 5, D) and log_q.shape == (3, 5)
    px = model.decode(z)
    assert px.batch_shape == (3, 5) and px.event_shape == (X_DIM,)
    assert model.log_joint(x, z).shape == (3, 5)
    assert model.prior.log_prob(z).shape == (3, 5)
    # image-shaped and integer input is flattened and cast to the model's dtype
    z, log_q = model.posterior(x.reshape(5, 1, 3, 4).to(torch.uint8), 2)
    assert z.shape == (2, 5, D) and torch.isfinite(log_q).all()


@pytest.mark.parametrize("kind", ["planar", "radial", "nice"])
def test_flow_amortized_false_gives_global_flow_parameters(kind):
    """flow.amortized=false: the flow reads no context, so two data points share the same transformation."""
    cfg = ModelConfig(latent_dim=D, hidden=H)
    model = perturb(build_model(cfg, FlowConfig(kind=kind, length=2, hidden=16, amortized=False), X_DIM))
    assert model.flow.context_dim == 0 and not hasattr(model.flow, "head")
    amortized = build_model(cfg, FlowConfig(kind=kind, length=2, hidden=16), X_DIM)
    assert amortized.flow.context_dim == H
    x = binary(2)
    z0 = torch.randn(3, 1, D).expand(3, 2, D)  # the same z_0 for both data points
    _, h = model.encode(x)
    z_k, log_det = model.flow(z0, h)
    assert torch.allclose(z_k[:, 0], z_k[:, 1]) and torch.allclose(log_det[:, 0], log_det[:, 1])
    assert not torch.allclose(z_k, z0)
    z, log_q = model.posterior(x, 4)
    assert z.shape == (4, 2, D) and torch.isfinite(log_q).all()


def test_default_model_is_the_papers():
    model = build_model(ModelConfig(), FlowConfig(kind="planar", length=10), 784)
    first = model.encoder.net[0]
    assert isinstance(first, Maxout) and first.linear.weight.shape == (400 * 4, 784)
    assert model.encoder.out_dim == 400 and model.latent_dim == 40
    assert model.decoder.net[0].linear.weight.shape == (1600, 40) and model.decoder.net[-1].weight.shape == (784, 400)
    # one fused head: 400 features -> K * (u, w, b) = 10 * (40 + 40 + 1)
    assert model.flow.head.weight.shape == (10 * 81, 400)
    assert model.prior.event_shape == (40,)


def test_maxout_takes_max_over_consecutive_windows():
    layer = Maxout(3, 2, 4)
    x = torch.randn(5, 3)
    expected = layer.linear(x).reshape(5, 2, 4).max(-1).values
    assert torch.equal(layer(x), expected)


def test_maxout_with_many_rows_gives_the_same_units_and_gradients():
    """The many-rows path (piece-major weight) against the plain one, in float64."""
    layer = Maxout(3, 2, 4).double()
    x = torch.randn(50, 2, 3, dtype=torch.float64, requires_grad=True)  # 100 rows > 2 * n_in
    expected = layer.linear(x).unflatten(-1, (2, 4)).amax(-1)
    grads = torch.autograd.grad(expected.square().sum(), [x, *layer.parameters()])
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    for g, e in zip(torch.autograd.grad(out.square().sum(), [x, *layer.parameters()]), grads, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)


def test_bernoulli_log_likelihood_and_its_gradients_match_torch_distributions(float64):
    """log p(x | z) through the fast softplus node against Bernoulli(logits).log_prob, with and without gradients,
    including logits beyond exp's float32 range (+-100) and either side of the switch to l itself (36); second
    derivatives too."""
    model = small("planar")
    x, z = binary(6), torch.randn(3, 6, D, dtype=torch.float64)
    logits = model.decoder(z).detach().clone()
    logits[0, 0, :6] = torch.tensor([100.0, -100.0, 20.0, 20.5, 36.0, 36.5])
    model.decoder.forward = lambda _z: logits  # the likelihood of these logits
    leaf = logits.requires_grad_()
    expected = torch.distributions.Bernoulli(logits=leaf).log_prob(x).sum(-1)
    (g_expected,) = torch.autograd.grad(expected.sum(), leaf, create_graph=True)
    out = model.log_likelihood(x, z)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    (g_out,) = torch.autograd.grad(out.sum(), leaf, create_graph=True)
    torch.testing.assert_close(g_out, g_expected, rtol=0, atol=1e-12)
    (h_out,) = torch.autograd.grad(g_out.square().sum(), leaf)
    (h_expected,) = torch.autograd.grad(g_expected.square().sum(), leaf)
    torch.testing.assert_close(h_out, h_expected, rtol=0, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(model.log_likelihood(x, z), expected.detach(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_mlp_model_builds(activation):
    model = small("planar", name="mlp", activation=activation, layers=2)
    assert isinstance(model.encoder.net[1][1], torch.nn.Tanh if activation == "tanh" else torch.nn.ReLU)
    assert model.posterior(binary(2), 1)[0].shape == (1, 2, D)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"name": "resnet"}, "model='resnet' is not allowed"),
        ({"activation": "tanh"}, "model=maxout needs model.activation=maxout"),
        ({"name": "mlp", "activation": "sigmoid"}, "model.activation='sigmoid' is not allowed"),
        ({"likelihood": "gaussian"}, "model.likelihood='gaussian' is not allowed"),
        ({"latent_dim": 0}, "model.latent_dim=0 is not allowed"),
    ],
    ids=["name", "maxout-activation", "activation", "likelihood", "latent-dim"],
)
def test_bad_model_config_is_a_one_line_error(overrides, match):
    with pytest.raises(NfviError, match=match) as info:
        build_model(ModelConfig(**overrides), FlowConfig(kind="none", length=0), X_DIM)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["maxout", "mlp"])
def test_yaml_options_compose_against_the_schema(name):
    from hydra import compose, initialize_config_dir

    import nfvi.vae.model  # noqa: F401  registers base_model

    with initialize_config_dir(config_dir=str(CONF_DIR), **hydra_version_base()):
        cfg = compose(config_name=f"model/{name}").model
    assert cfg.name == name and cfg.latent_dim == 40 and cfg.hidden == 400
    model = build_model(cfg, FlowConfig(kind="planar", length=1), 784)
    assert model.latent_dim == 40


@pytest.mark.parametrize("kind", ["planar", "radial", "nice"])
def test_gradients_reach_encoder_flow_head_and_decoder(kind):
    model = perturb(small(kind))
    loss = annealed_loss(free_energy_terms(model, binary(6), num_samples=2), 0.3, "eq20").mean()
    loss.backward()
    groups = {
        "encoder": model.encoder,
        "gaussian_head": model.gaussian_head,
        "flow": model.flow,
        "decoder": model.decoder,
    }
    for name, module in groups.items():
        grads = [p.grad for p in module.parameters()]
        assert grads and all(g is not None for g in grads), name
        assert sum(g.abs().sum() for g in grads) > 0, name
    if kind != "nice":  # the fused amortization head reads the encoder's features
        assert model.flow.head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_log_qk_is_change_of_variables_along_the_path(kind, float64):
    """log q_K(z_K|x) = log q_0(z_0|x) - log|det dz_K/dz_0|, the Jacobian taken by autograd per sample."""
    model = perturb(small(kind, length=3))
    x = binary(2)
    torch.manual_seed(1)
    sample = model.sample_posterior(x, 3)
    torch.manual_seed(1)
    z_k, log_qk = model.posterior(x, 3)
    assert torch.equal(z_k, sample.z_k) and torch.allclose(log_qk, sample.log_q0 - sample.log_det)
    q0, h = model.encode(x)
    assert torch.allclose(sample.log_q0, q0.log_prob(sample.z_0))
    for s in range(3):
        for b in range(2):
            jac = jacobian(lambda z, b=b: model.flow(z, h[b])[0], sample.z_0[s, b])
            expected = q0.log_prob(sample.z_0)[s, b] - torch.linalg.slogdet(jac).logabsdet
            assert torch.allclose(log_qk[s, b], expected, atol=1e-10), (s, b)


def test_noise_is_drawn_per_data_point():
    """A data point's draws do not depend on the batch it is in (basis of the estimator's chunk invariance).

    Exact on the CPU generator when every draw's size S*D is a multiple of 16 (PyTorch's block size
    for normal sampling), as here: 8 samples of 4 dimensions.
    """
    model = small("planar")
    x = binary(4)
    torch.manual_seed(3)
    whole = model.posterior(x, 8)[0]
    torch.manual_seed(3)
    parts = torch.cat([model.posterior(x[:1], 8)[0], model.posterior(x[1:], 8)[0]], dim=1)
    assert torch.allclose(whole, parts, atol=1e-6)


def test_init_output_bias_sets_logit_of_mean():
    model = small("none")
    mean = torch.linspace(0.1, 0.9, X_DIM)
    model.init_output_bias(mean)
    assert torch.allclose(torch.sigmoid(model.decoder.output_bias), mean, atol=1e-6)


# ---- the amortized-planar guard (docs/paper.md section 13) ----------------------------------------------------------


def drive_w_to_zero(model: VAE, scale: float, first: float | None = None) -> VAE:
    """Make the encoder emit raw ``w = scale * d`` (for every x) and ``b = 1``; optionally raw ``w_1 = first``."""
    flow, dim = model.flow, model.latent_dim
    width = 2 * dim + 1  # [u, w, b] per layer
    direction = torch.nn.functional.normalize(torch.randn(dim), dim=0)
    with torch.no_grad():
        for k in range(flow.length):
            w = slice(k * width + dim, k * width + 2 * dim)
            flow.head.weight[w] = 0.0
            flow.head.bias[w] = scale * direction
            if first is not None:
                flow.head.bias[k * width + dim] = first
            flow.head.weight[k * width + 2 * dim] = 0.0
            flow.head.bias[k * width + 2 * dim] = 1.0
    return model


def guard_case(w_floor, scale, first=None):
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(latent_dim=D, hidden=H), FlowConfig(kind="planar", length=2, w_floor=w_floor), X_DIM
    )
    drive_w_to_zero(model, scale, first)
    x = binary(16)
    _, h = model.encode(x)
    u_hat = max(float(t.u_hat.detach().norm(dim=-1).max()) for t in model.flow.transforms(h))
    loss = -free_energy_terms(model, x, num_samples=4)["elbo"].mean()
    loss.backward()
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    return u_hat, loss.item(), grads_finite


@pytest.mark.parametrize("scale", [1e-1, 1e-3, 1e-5], ids=["w=1e-1", "w=1e-3", "w=1e-5"])
@pytest.mark.parametrize("first", [None, -30.0], ids=["raw-w-to-0", "raw-w1-to-minus-inf"])
def test_planar_guard_keeps_u_hat_and_loss_bounded(scale, first):
    u_hat, loss, grads_finite = guard_case(0.1, scale, first)
    # ||w|| >= 0.1, so ||u_hat|| <= ||u|| + |softplus(-w.u) - 1| / 0.1 stays O(10)
    assert u_hat < 15.0 and grads_finite
    assert 0 < loss < 200.0  # an untrained 12-pixel model: a few nats per pixel at most


def test_without_guard_the_same_encoder_output_blows_up():
    results = {scale: guard_case(None, scale) for scale in (1e-1, 1e-3, 1e-5)}
    u_hats = [results[s][0] for s in (1e-1, 1e-3, 1e-5)]
    losses = [results[s][1] for s in (1e-1, 1e-3, 1e-5)]
    assert u_hats[2] > 1e4 and u_hats[2] > 50 * u_hats[1] > 2500 * u_hats[0]  # u_hat ~ 1/||w||
    assert losses[2] > 1e6 and losses[2] > 100 * losses[1]  # z_K ~ tanh(b) u_hat: the loss grows like 1/||w||^2
