"""Shared fixtures: the repo's conf/ folder, a composed-config helper and a seeded float64 mode."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
SHARED_DATA = Path(os.environ.get("NFVI_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def float64():
    """Run the test in float64 with a fixed seed; restore the default dtype afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield
    torch.set_default_dtype(old)


def compose(config_name: str, overrides: list[str] | None = None):
    """Compose ``conf/<config_name>.yaml`` with ``overrides`` exactly as the CLI would (registers schemas)."""
    import importlib

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from nfvi.cli import COMMANDS

    if config_name in COMMANDS:
        importlib.import_module(COMMANDS[config_name][0])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [])
