"""Every command's primary config composes, with every option of every config group it uses; typos fail."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from nfvi.cli import COMMANDS
from tests.conftest import CONF_DIR, compose

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("hydra", "experiment"))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def command_groups(command: str) -> list[str]:
    cfg = compose(command)
    return [g for g in GROUPS if isinstance(cfg.get(g), DictConfig)]


CASES = [(c, g, o) for c in COMMANDS for g in command_groups(c) for o in group_options(g)]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_primary_config_composes(command):
    cfg = compose(command)
    assert cfg is not None


@pytest.mark.parametrize("command, group, option", CASES, ids=[f"{c}-{g}={o}" for c, g, o in CASES])
def test_every_group_option_composes(command, group, option):
    cfg = compose(command, [f"{group}={option}"])
    assert group in cfg


@pytest.mark.parametrize("command", [c for c in COMMANDS if "flow" in command_groups(c)])
def test_flow_length_is_typed_and_typos_fail(command):
    cfg = compose(command, ["flow=planar", "flow.length=80"])
    assert cfg.flow.length == 80 and isinstance(cfg.flow.length, int) and cfg.flow.kind == "planar"
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)):
        compose(command, ["flow.lenght=80"])
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)):
        compose(command, ["flow.length=eighty"])
