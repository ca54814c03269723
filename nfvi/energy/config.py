"""Schemas of ``nfvi energy`` (``base_energy``): the target, the wall, the schedule and the final estimates."""

from __future__ import annotations

from dataclasses import dataclass, field

from nfvi import energies
from nfvi.config import LR_DECAYS, FlowConfig, OptimConfig, PathsConfig, store
from nfvi.errors import NfviError, check_choice, check_int_range, check_range, check_seed
from nfvi.trackers import LoggerConfig

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

    def __post_init__(self):
        check_int_range("trainer.steps", self.steps, 1, kind="a whole number")
        # (samples, 2) per layer kept for autograd: 100,000 x 1000 layers is already ~3 GB
        check_int_range("trainer.samples", self.samples, 1, 100_000, kind="a whole number")
        check_int_range("trainer.anneal_steps", self.anneal_steps, 1, kind="a whole number")
        check_range("trainer.beta0", self.beta0, 0.0, 1.0)
        check_choice("trainer.lr_decay", self.lr_decay, LR_DECAYS)
        check_range("trainer.lr_final_factor", self.lr_final_factor, 0.0, 1.0)
        check_range("trainer.clip_grad", self.clip_grad, 0.0, kind="a gradient norm (0 = off)")
        check_int_range("trainer.log_every", self.log_every, 1, kind="a whole number")


@dataclass
class EnergyEvalConfig:
    """Final estimates: ``samples`` draws for the bound; quadrature on ``[-box, box]^2`` with ``grid^2`` cells."""

    samples: int = 100000
    box: float = energies.DEFAULT_BOX
    grid: int = 400
    chunk: int = 25000

    def __post_init__(self):
        check_int_range("eval.samples", self.samples, 1, 10_000_000, kind="a whole number")
        check_range("eval.box", self.box, 1e-6, 1000.0, kind="a positive half-width")
        check_int_range("eval.grid", self.grid, 2, 10_000, kind="a whole number")
        check_int_range("eval.chunk", self.chunk, 1, 1_000_000, kind="a whole number of points at once")


@dataclass
class EnergyConfig:
    """``nfvi energy target=U1 flow=planar flow.length=32``: see :mod:`nfvi.energy`."""

    target: str = "U1"
    #: width of a soft wall at the box edge (eval.box) added to U for training; 0 = the paper's U (see energies.confine)
    wall: float = 0.1
    seed: int = 0
    device: str = "auto"
    #: torch CPU threads; 0 = torch's default (OMP_NUM_THREADS, else all cores); docs/performance.md
    threads: int = 1
    #: the run folder holds this run: a finished one with the same settings is returned as is, an unfinished one re-run
    resume: bool = False
    #: the run folder holds another run: remove its files and start afresh
    overwrite: bool = False
    trainer: EnergyTrainerConfig = field(default_factory=EnergyTrainerConfig)
    eval: EnergyEvalConfig = field(default_factory=EnergyEvalConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # logger=[tensorboard,wandb,mlflow]

    def __post_init__(self):
        check_choice("target", self.target, energies.ENERGIES)
        check_range("wall", self.wall, 0.0, 1000.0, kind="a width >= 0 (0 = off)")
        check_seed("seed", self.seed)
        check_int_range("threads", self.threads, 0, 1024, kind="a whole number (0 = torch's default)")
        if self.flow.kind == "sylvester" and self.flow.length > 0:
            raise NfviError(
                "flow=sylvester is not allowed in nfvi energy: it has no inverse, and the KL on the box needs q_K's "
                "density at every grid point; choose planar, radial, nice, iaf or householder"
            )


store("base_energy", EnergyConfig)
