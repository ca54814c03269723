"""Issue 19, item 3: the Sylvester table's posteriors are the authors' models (riannevdberg/sylvester-flows).

Parameter counts of each posterior's flow at their defaults (z=64, K=4, 256 encoder features; O-SNF M=8, H-SNF 8
reflections, IAF width 320), the amortized IAF's structure, the Sylvester parameter layout, Björck at a fixed
number of steps, and the one-line error for a checkpoint of the older layout.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from nfvi.errors import NfviError
from nfvi.flows import IAF_GATE_BIAS, build_flow
from nfvi.reports.table1 import AUTHORS_FLOW_PARAMS
from nfvi.transforms import BJORCK_STEPS, bjorck_orthonormalize
from nfvi.vae.checkpoint import model_from_state
from nfvi.vae.model import build_model, model_input_shape
from tests.conftest import compose

#: the authors' counts, from their models/VAE.py and models/flows.py (the issue's audit: IAF 740,672,
#: H-SNF 4,934,400, T-SNF 4,408,064; O-SNF: 257 * 4 * (8^2 + 3 * 8 + 64 * 8); planar: 257 * 4 * (64 + 64 + 1))
AUTHORS = {
    "snf_none": ("no flow", 0),
    "snf_planar": ("planar", 132_612),
    "snf_iaf": ("IAF", 740_672),
    "snf_orthogonal": ("O-SNF", 616_800),
    "snf_householder": ("H-SNF", 4_934_400),
    "snf_triangular": ("T-SNF", 4_408_064),
}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("posterior", list(AUTHORS))
def test_each_posterior_has_the_authors_flow_parameter_count(posterior):
    cfg = compose("train", ["experiment=sylvester_paper", f"posterior={posterior}"])
    model = build_model(cfg.model, cfg.flow, model_input_shape(cfg.model, (1, 28, 28)))
    label, expected = AUTHORS[posterior]
    assert model.encoder.out_dim == 256 and cfg.model.latent_dim == 64
    assert count(model.flow) == expected == AUTHORS_FLOW_PARAMS[label]


def test_amortized_iaf_reads_the_context_through_one_shared_linear_after_the_first_elu():
    flow = build_flow("iaf", 3, 2, context_dim=5, hidden=6, num_hidden=2)
    assert isinstance(flow.context_layer, torch.nn.Linear) and flow.context_layer.weight.shape == (6, 5)
    assert all(len(net.hidden_layers) == 2 and not hasattr(net, "context_layer") for net in flow.nets)
    assert all(torch.equal(net.out.bias[3:], torch.full((3,), IAF_GATE_BIAS)) for net in flow.nets)
    assert IAF_GATE_BIAS == 1.0  # the authors' forget bias
    # the context term enters after the first ELU: h = ELU(W1 z + b1) + C c, then ELU(W2 h + b2)
    net, z, c = flow.nets[0], torch.randn(4, 3), torch.randn(4, 5)
    h = torch.nn.functional.elu(net.hidden_layers[0](z)) + flow.context_layer(c)
    m, s = net.out(torch.nn.functional.elu(net.hidden_layers[1](h))).chunk(2, -1)
    y = torch.sigmoid(s) * z + torch.sigmoid(-s) * m
    assert torch.allclose(flow.transforms(c)[0](z), y)


def test_sylvester_layout_one_matrix_for_both_strict_triangles():
    m = 3
    flow = build_flow("sylvester", m, 1, variant="triangular")
    assert flow.raw.shape == (1, m * m + 3 * m)  # the matrix, two diagonals, b (T-SNF: no Q parameters)
    raw = torch.arange(1.0, m * m + 3 * m + 1)
    t = flow.make_layer(raw, 0)
    full = raw[: m * m].view(m, m)
    assert torch.equal(torch.triu(t.r, 1), torch.triu(full, 1))
    assert torch.equal(torch.triu(t.r_tilde, 1), torch.triu(full.T, 1))  # R~'s strict upper: the strict lower
    assert torch.allclose(t.r.diagonal(), torch.tanh(raw[m * m : m * m + m]))
    assert torch.allclose(t.r_tilde.diagonal(), torch.tanh(raw[m * m + m : m * m + 2 * m]))
    assert torch.equal(t.b, raw[m * m + 2 * m :])


def test_bjorck_runs_a_fixed_number_of_steps_on_meta_tensors_and_under_vmap():
    assert BJORCK_STEPS == 30
    out = bjorck_orthonormalize(torch.empty(5, 6, 3, device="meta"))  # no data-dependent stop to evaluate
    assert out.shape == (5, 6, 3) and out.device.type == "meta"
    a = torch.randn(4, 6, 3, dtype=torch.float64)
    q = torch.func.vmap(bjorck_orthonormalize)(a)
    assert torch.allclose(q, bjorck_orthonormalize(a))
    assert torch.linalg.matrix_norm(q.transpose(-1, -2) @ q - torch.eye(3, dtype=torch.float64)).max() < 1e-12


def test_bjorck_orthonormalises_a_badly_conditioned_matrix_in_float32():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 8))
    a = u * torch.logspace(0, -4, 8)  # singular values from 1 down to 1e-4 (relative to ||A||_F: ~3e-5)
    q = bjorck_orthonormalize(a)
    assert torch.linalg.matrix_norm(q.T @ q - torch.eye(8)) < 1e-5


def test_checkpoint_of_the_older_iaf_layout_is_a_one_line_error():
    cfg = compose("train", ["dataset=fake", "model=mlp", "model.hidden=16", "model.latent_dim=4", "flow=iaf"])
    cfg.flow.length, cfg.flow.hidden = 2, 8
    model = build_model(cfg.model, cfg.flow, 784)
    weights = model.state_dict()
    old = {k: v for k, v in weights.items() if not k.startswith("flow.context_layer")}
    for k in range(2):  # the older layout: one context Linear per step, inside each MADE
        old[f"flow.nets.{k}.context_layer.weight"] = torch.zeros(8, 16)
        old[f"flow.nets.{k}.context_layer.bias"] = torch.zeros(8)
    state = {"config": OmegaConf.to_container(cfg, resolve=True), "model": old, "x_dim": 784}
    with pytest.raises(NfviError) as info:
        model_from_state(state)
    message = str(info.value)
    assert "\n" not in message and "flow=iaf" in message and "flow.context_layer.weight is missing" in message
    assert "authors' parameter layout" in message and "train the run again" in message
    model_from_state({**state, "model": weights})  # the current layout loads


def test_results_record_the_flow_parameter_count(tmp_path):
    import json

    from nfvi.vae import task as train_mod
    from tests.test_train import cfg_of

    cfg = cfg_of("flow=iaf", "flow.hidden=8", "trainer.steps=2", "eval.at_end=true", "eval.max_images=20")
    train_mod.train(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    model = build_model(cfg.model, cfg.flow, 784)
    assert saved["flow_params"] == count(model.flow) > 0 and saved["num_params"] == count(model)


def test_resuming_a_checkpoint_of_the_older_layout_is_a_one_line_error(tmp_path):
    from nfvi.vae import task as train_mod
    from nfvi.vae.checkpoint import load_checkpoint, save_checkpoint
    from tests.test_train import cfg_of

    overrides = ("flow=iaf", "flow.hidden=8", "trainer.steps=2", "trainer.ckpt_every=1")
    train_mod.train(cfg_of(*overrides), tmp_path)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    state["model"]["flow.context_layer.weight"] = torch.zeros(8, 3)  # a shape this model does not have
    save_checkpoint(tmp_path / "checkpoint.pt", {k: v for k, v in state.items() if k not in ("format", "version")})
    with pytest.raises(NfviError) as info:
        train_mod.train(cfg_of(*overrides[:2], "trainer.steps=4", "resume=true"), tmp_path)
    message = str(info.value)
    assert "\n" not in message and "cannot be restored" in message
    assert "flow.context_layer.weight is (8, 3) in the checkpoint but (8, 16) here" in message
