"""Schemas of ``nfvi energy`` (``base_energy``): the target, the wall, the schedule and the final estimates."""

from __future__ import annotations

from dataclasses import dataclass, field

from nfvi import energies
from nfvi.config import FlowConfig, OptimConfig, PathsConfig, store

__all__ = ["EnergyTrainerConfig", "EnergyEvalConfig", "EnergyConfig"]


@dataclass
class EnergyTrainerConfig:
    """Optimisation schedule. ``anneal_steps``: updates for beta to go from ``beta0`` to 1 (paper: 10000)."""

    steps: int = 4000
    samples: int = 256  # Monte Carlo draws of z_0 per update
    anneal: bool = True
    anneal_steps: int = 1000
    beta0: float = 0.01
    lr_decay: str = "cosine"  # none | cosine (to lr_final_factor * lr at the last step)
    lr_final_factor: float = 0.01
    clip_grad: float = 0.0  # max gradient norm; 0 = off
    log_every: int = 100


@dataclass
class EnergyEvalConfig:
    """Final estimates: ``samples`` draws for the bound; quadrature on ``[-box, box]^2`` with ``grid^2`` cells."""

    samples: int = 100000
    box: float = energies.DEFAULT_BOX
    grid: int = 400
    chunk: int = 25000


@dataclass
class EnergyConfig:
    """``nfvi energy target=U1 flow=planar flow.length=32``: see :mod:`nfvi.energy`."""

    target: str = "U1"
    #: width of a soft wall at the box edge (eval.box) added to U for training; 0 = the paper's U (see energies.confine)
    wall: float = 0.1
    seed: int = 0
    device: str = "auto"
    #: the run folder holds this run: a finished one with the same settings is returned as is, an unfinished one re-run
    resume: bool = False
    #: the run folder holds another run: remove its files and start afresh
    overwrite: bool = False
    trainer: EnergyTrainerConfig = field(default_factory=EnergyTrainerConfig)
    eval: EnergyEvalConfig = field(default_factory=EnergyEvalConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


store("base_energy", EnergyConfig)
