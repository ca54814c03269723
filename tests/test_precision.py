"""``trainer.precision`` / ``precision`` (nfvi/precision.py): bf16 networks, float32 log-densities, fp32 default."""

from __future__ import annotations

import pytest
import torch

from nfvi.config import FlowConfig, validate
from nfvi.errors import NfviError
from nfvi.precision import AutocastForward, set_precision
from nfvi.vae import task as train_mod
from nfvi.vae.checkpoint import load_checkpoint
from nfvi.vae.model import ModelConfig, build_model
from nfvi.vae.objectives import free_energy_terms
from tests.conftest import compose
from tests.test_train import cfg_of, states_equal


def _vae(kind="planar", length=3):
    torch.manual_seed(0)
    cfg = ModelConfig(name="mlp", activation="tanh", hidden=16, latent_dim=4)
    return build_model(cfg, FlowConfig(kind=kind, length=length), 784)


@pytest.mark.parametrize("kind", ["planar", "sylvester", "nice"])
def test_bf16_runs_the_networks_in_bfloat16_and_keeps_every_log_density_float32(kind):
    model = set_precision(_vae(kind), "bf16")
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = output.dtype

        return hook

    model.encoder.net[0][0].register_forward_hook(record("encoder"))
    model.decoder.net[-1].register_forward_hook(record("decoder"))
    x = (torch.rand(5, 784) < 0.3).float()
    terms = free_energy_terms(model, x, num_samples=2)
    assert seen == {"encoder": torch.bfloat16, "decoder": torch.bfloat16}
    assert {k: v.dtype for k, v in terms.items()} == {k: torch.float32 for k in terms}
    z_k, log_q = model.posterior(x, 2)
    assert z_k.dtype == log_q.dtype == torch.float32
    terms["elbo"].mean().backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())


def test_fp32_restores_the_networks_and_the_state_dict_is_unchanged():
    model = _vae()
    x = (torch.rand(3, 784) < 0.3).float()
    keys = list(model.state_dict())
    set_precision(model, "bf16")
    assert isinstance(model.encoder.forward, AutocastForward) and list(model.state_dict()) == keys
    set_precision(model, "fp32")
    assert "forward" not in model.encoder.__dict__
    fresh = _vae()
    torch.manual_seed(1)
    a = model.posterior(x, 2)[1]
    torch.manual_seed(1)
    b = fresh.posterior(x, 2)[1]
    assert torch.equal(a, b)


def test_a_bad_precision_is_refused_in_one_line():
    with pytest.raises(NfviError, match=r"trainer.precision='fp16' is not allowed; choose one of: fp32, bf16"):
        validate(cfg_of("trainer.precision=fp16"))
    with pytest.raises(NfviError, match=r"^precision='half' is not allowed; choose one of: fp32, bf16$"):
        validate(compose("cde", ["precision=half"]))
    with pytest.raises(ValueError, match="fp32, bf16"):
        set_precision(_vae(), "fp16")


def test_bf16_training_runs_a_few_updates_on_fake_data(tmp_path):
    out = train_mod.train(cfg_of("trainer.steps=6", "trainer.precision=bf16"), tmp_path / "bf16")
    train_mod.train(cfg_of("trainer.steps=6"), tmp_path / "fp32")
    a, b = (load_checkpoint(tmp_path / n / "checkpoint.pt")["model"] for n in ("bf16", "fp32"))
    assert out["steps"] == 6 and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in a.values())
    assert not states_equal(a, b)  # bf16 did change the arithmetic


def test_cde_bf16_fits_and_reports_its_precision(tmp_path):
    from nfvi.cde.task import run_cde

    overrides = ["dataset=sine", "synthetic_size=200", "seeds=[0]", "max_epochs=2", "flow=planar", "flow.length=2"]
    res = run_cde(compose("cde", [*overrides, "precision=bf16"]), tmp_path)
    assert res["precision"] == "bf16" and res["test_nll_mean"] == res["test_nll_mean"]
