"""experiment=sylvester_*: the Sylvester-flows protocol (van den Berg et al. 2018) as reproduction profiles."""

from __future__ import annotations

import json

import pytest

from nfvi.config import hydra_version_base
from nfvi.vae import task as train_mod
from tests.conftest import compose

POSTERIORS = ["snf_none", "snf_planar", "snf_iaf", "snf_orthogonal", "snf_householder", "snf_triangular"]


def hydra_cfg(experiment: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from nfvi.cli import conf_dir

    compose("train")  # registers the schemas
    with initialize_config_dir(config_dir=str(conf_dir("train")), **hydra_version_base()):
        return hydra_compose("train", [f"experiment={experiment}"], return_hydra_config=True)


def test_the_paper_profile_is_the_protocol_with_one_job_per_posterior_and_dataset():
    cfg = hydra_cfg("sylvester_paper")
    params = cfg.hydra.sweeper.params
    assert params.posterior.split(",") == POSTERIORS and params.dataset.split(",") == ["mnist_static", "omniglot"]
    assert (cfg.dataset.name, cfg.model.name, cfg.model.latent_dim) == ("mnist_static", "gated_conv", 64)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.eps) == ("adamax", 5e-4, 1e-7)
    t = cfg.trainer
    assert (t.batch_size, t.steps, t.annealing, t.beta0, t.anneal_steps) == (100, 1_000_000, "kl_warmup", 0.0, 50_000)
    assert (t.val_every, t.patience, t.val_images, t.lr_decay, t.grad_clip) == (500, 100, 0, "none", 0.0)
    assert (cfg.eval.num_samples, cfg.eval.max_images, cfg.eval.checkpoint) == (5000, 0, "best")
    assert cfg.model.init == "torch"  # their code's (PyTorch's) initialisation


@pytest.mark.parametrize(
    "posterior, kind, length, options",
    [
        ("snf_none", "none", 0, {}),
        ("snf_planar", "planar", 4, {}),
        ("snf_iaf", "iaf", 4, {"hidden": 320, "num_hidden": 2}),  # their IAF(num_hidden=1): two masked layers
        ("snf_orthogonal", "sylvester", 4, {"variant": "orthogonal", "num_vectors": 8}),
        ("snf_householder", "sylvester", 4, {"variant": "householder", "num_householder": 8}),
        ("snf_triangular", "sylvester", 4, {"variant": "triangular"}),
    ],
)
def test_each_posterior_sets_the_sylvester_codes_defaults(posterior, kind, length, options):
    flow = compose("train", ["experiment=sylvester_paper", f"posterior={posterior}"]).flow
    assert (flow.kind, flow.length) == (kind, length)
    assert {k: flow[k] for k in options} == options


def test_the_cpu_profiles_cut_the_schedule_and_the_grid():
    quick, smoke = hydra_cfg("sylvester_quick"), hydra_cfg("sylvester_smoke")
    assert quick.hydra.sweeper.params.posterior.split(",") == POSTERIORS and "dataset" not in quick.hydra.sweeper.params
    assert (quick.trainer.steps, quick.trainer.anneal_steps, quick.trainer.patience) == (600, 300, 0)
    assert (quick.eval.num_samples, quick.eval.max_images, quick.trainer.val_images) == (100, 500, 1000)
    assert quick.model.init == "unit_variance"  # else 600 updates stay at the independent-pixel plateau
    assert smoke.hydra.sweeper.params.posterior.split(",") == ["snf_none", "snf_planar", "snf_orthogonal"]
    assert smoke.trainer.steps <= 10 and smoke.eval.num_samples <= 10 and smoke.dataset.name == "mnist_static"


def test_the_smoke_profile_trains_on_fake_data_and_records_the_flow_variant(tmp_path):
    overrides = ["experiment=sylvester_smoke", "posterior=snf_orthogonal", "dataset=fake", "dataset.fake_size=40"]
    cfg = compose("train", [*overrides, "trainer.steps=2", "trainer.val_every=2", "trainer.val_images=20",
                            "trainer.batch_size=4", "eval.max_images=4", "device=cpu"])  # fmt: skip
    train_mod.train(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (saved["model"], saved["latent_dim"], saved["flow"]) == ("gated_conv", 64, "sylvester")
    assert (saved["flow_variant"], saved["flow_num_vectors"], saved["flow_length"]) == ("orthogonal", 8, 4)
    assert saved["steps"] == 2 and saved["num_importance_samples"] == 10 and saved["num_test_images"] == 4
    assert saved["annealing"] == "kl_warmup" and saved["finished"]


@pytest.mark.parametrize("profile", ["long", "huge"])
def test_the_script_refuses_a_profile_it_has_not_in_one_line(profile):
    import subprocess

    from tests.conftest import REPO

    bad = subprocess.run(["bash", str(REPO / "scripts" / "reproduce_sylvester.sh"), profile], capture_output=True,
                         text=True, timeout=30)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert f"PROFILE={profile} is not allowed; choose one of: smoke, quick, paper" in bad.stderr
