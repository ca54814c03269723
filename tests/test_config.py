"""Every command's primary config composes, with every option of every config group it uses; typos fail."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import OmegaConfBaseException

from nfvi.cli import COMMANDS
from nfvi.config import hydra_version_base
from tests.conftest import CONF_ROOT, compose

SKIP = ("hydra", "experiment", "__pycache__")


def group_dirs(command: str) -> dict[str, Path]:
    """The config groups ``command`` can see: its own root's folders, then nfvi/conf/shared/'s."""
    roots = [CONF_ROOT / command, CONF_ROOT / "shared"]
    return {p.name: p for root in roots for p in sorted(root.iterdir()) if p.is_dir() and p.name not in SKIP}


def group_options(command: str, group: str) -> list[str]:
    return sorted(p.stem for p in group_dirs(command)[group].glob("*.yaml"))


def command_groups(command: str) -> list[str]:
    cfg = compose(command)
    return [g for g in group_dirs(command) if g in cfg]


CASES = [(c, g, o) for c in COMMANDS for g in command_groups(c) for o in group_options(c, g)]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_primary_config_composes(command):
    cfg = compose(command)
    assert cfg is not None


@pytest.mark.parametrize("command, group, option", CASES, ids=[f"{c}-{g}={o}" for c, g, o in CASES])
def test_every_group_option_composes(command, group, option):
    cfg = compose(command, [f"{group}={option}"])
    assert group in cfg


def test_cde_and_train_have_their_own_dataset_and_model_options():
    assert group_options("cde", "dataset") == sorted(
        ["fish", "concrete", "energy", "skillcraft", "parkinsons", "temperature", "air", "sine", "bimodal"]
    )
    assert group_options("cde", "model") == ["flow", "gaussian", "mdn"]
    assert "mnist" in group_options("train", "dataset") and "maxout" in group_options("train", "model")
    assert compose("cde", ["dataset=fish", "model=mdn"]).dataset == "fish"


@pytest.mark.parametrize("command", [c for c in COMMANDS if "flow" in command_groups(c)])
def test_flow_length_is_typed_and_typos_fail(command):
    cfg = compose(command, ["flow=planar", "flow.length=80"])
    assert cfg.flow.length == 80 and isinstance(cfg.flow.length, int) and cfg.flow.kind == "planar"
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)):
        compose(command, ["flow.lenght=80"])
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)):
        compose(command, ["flow.length=eighty"])


def test_optimizer_gives_the_flow_its_own_learning_rate():
    """optim.flow_lr_factor: the flow's parameters form a second group at lr * factor; 1 keeps one group."""
    import torch

    from nfvi.config import FlowConfig, OptimConfig
    from nfvi.errors import NfviError
    from nfvi.training import optimizer_from_config
    from nfvi.vae.model import ModelConfig, build_model

    model = build_model(ModelConfig(latent_dim=4, hidden=8), FlowConfig(kind="planar", length=2), 12)
    flow_ids = {id(p) for p in model.flow.parameters()}
    opt = optimizer_from_config(OptimConfig(name="adam", lr=1e-3, flow_lr_factor=0.1), model.parameters(),
                                flow_params=model.flow.parameters())  # fmt: skip
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-4])
    assert {id(p) for p in opt.param_groups[1]["params"]} == flow_ids
    assert not flow_ids & {id(p) for p in opt.param_groups[0]["params"]}
    same = optimizer_from_config(OptimConfig(name="rmsprop"), model.parameters(), flow_params=model.flow.parameters())
    assert len(same.param_groups) == 1 and isinstance(same, torch.optim.RMSprop)
    with pytest.raises(NfviError, match="optim.flow_lr_factor=-1.0 is not allowed"):
        optimizer_from_config(OptimConfig(name="adam", flow_lr_factor=-1.0), model.parameters())


EXPERIMENTS = [(c, p.stem) for c in COMMANDS for p in sorted((CONF_ROOT / c / "experiment").glob("*.yaml"))]


@pytest.mark.parametrize("command, experiment", EXPERIMENTS, ids=[f"{c}-{e}" for c, e in EXPERIMENTS])
def test_every_experiment_composes_with_every_job_of_its_grid(command, experiment):
    """experiment=<task>_<profile>: each job of the grid in hydra.sweeper.params composes (as a sweep would)."""
    import itertools

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from nfvi.cli import conf_dir

    compose(command)  # registers the schemas
    with initialize_config_dir(config_dir=str(conf_dir(command)), **hydra_version_base()):
        cfg = hydra_compose(command, [f"experiment={experiment}"], return_hydra_config=True)
        params = dict(cfg.hydra.sweeper.params or {})
        grid = [[f"{k}={v}" for v in str(values).split(",")] for k, values in params.items()]
        jobs = list(itertools.product(*grid))
        for job in jobs:
            hydra_compose(command, [f"experiment={experiment}", *job])
    if experiment.startswith(("mnist_", "energy_", "cde_", "cifar10_", "sylvester_")):  # a reproduction profile
        # a hand-run sweep of a profile gets a folder of its own; make reproduce passes its fixed hydra.sweep.dir
        assert params and f"multirun/{command}/{experiment}/" in str(cfg.hydra.sweep.dir)


def test_reproduction_grids():
    """The profiles' grids: not products of flow x flow.length, so nfvi train sweeps `posterior` (Table 2 cells)."""

    def grid(command, experiment):
        from hydra import compose as hydra_compose
        from hydra import initialize_config_dir

        from nfvi.cli import conf_dir

        compose(command)
        with initialize_config_dir(config_dir=str(conf_dir(command)), **hydra_version_base()):
            return hydra_compose(command, [f"experiment={experiment}"], return_hydra_config=True)

    long = grid("train", "mnist_long")
    cells = long.hydra.sweeper.params.posterior.split(",")
    assert sorted(cells) == sorted(["gaussian", "planar_10", "planar_20", "planar_40", "planar_80", "nice_10",
                                    "nice_40", "nice_80"])  # fmt: skip
    assert long.trainer.steps == 80000 and long.trainer.lr_decay == "cosine" and long.eval.max_images == 0
    assert long.eval.num_samples == 200 and long.optim.lr == 1e-3 and long.optim.flow_lr_factor == 0.1
    quick = grid("train", "mnist_quick")
    assert quick.hydra.sweeper.params.posterior.split(",")[:2] == ["nice_80", "planar_80"]  # longest first
    assert compose("train", ["posterior=gaussian"]).flow.kind == "none"
    assert compose("train", ["posterior=nice_40"]).flow.length == 40
    energy = grid("energy", "energy_quick").hydra.sweeper.params
    assert (energy.target, energy.flow, energy["flow.length"]) == ("U1,U2,U3,U4", "planar,radial,nice,iaf", "2,8,32")
