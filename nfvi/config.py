"""Typed config schemas shared by every command, registered in Hydra's ConfigStore.

Each YAML option under ``conf/<group>/`` lists its schema (``base_<group>``) first in its defaults,
so a misspelled key or a value of the wrong type fails at composition with Hydra's message. Each
task package (``nfvi.energy``, ``nfvi.vae``, ``nfvi.cde``) defines its own schemas in its ``config.py``
and registers its primary schema as ``base_<command>`` with :func:`store`. No torch here: the data
layer and the reports import this module without dragging in the flows (factories: :mod:`nfvi.training`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore

__all__ = ["FlowConfig", "OptimConfig", "PathsConfig", "store"]


@dataclass
class FlowConfig:
    """``flow=<kind>`` picks the option; ``flow.length=K`` the number of layers (0 = identity)."""

    kind: str = "planar"
    length: int = 10
    hidden: int = 64  # nice: width of each coupling MLP
    mix: str = "alternate"  # nice: alternate | permute
    w_floor: Optional[float] = 0.1  # planar, amortized only: ||w|| >= w_floor (paper.md section 13); null = off
    amortized: bool = True  # train/cde: parameters computed per data point from the encoder (Sec. 4.3); false = global


@dataclass
class OptimConfig:
    """``optim=rmsprop|adam|adamax``; ``momentum`` is used by rmsprop only."""

    name: str = "rmsprop"
    lr: float = 1e-5
    momentum: float = 0.9
    eps: float = 1e-8
    weight_decay: float = 0.0
    flow_lr_factor: float = 1.0  # the flow's own parameters (e.g. its amortization head) learn at lr * this factor


@dataclass
class PathsConfig:
    """Where data live and where runs go. ``NFVI_DATA`` sets the default data root."""

    data_dir: str = "${oc.env:NFVI_DATA,./data}"
    output_dir: str = "outputs"


def store(name: str, node, group: str | None = None) -> None:
    """Register a schema ``node`` under ``name`` (and ``group``) in Hydra's ConfigStore."""
    ConfigStore.instance().store(name=name, node=node, group=group)


store("base_flow", FlowConfig, group="flow")
store("base_optim", OptimConfig, group="optim")
store("base_paths", PathsConfig, group="paths")
