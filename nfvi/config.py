"""Typed config schemas shared by every command, registered in Hydra's ConfigStore.

Each YAML option under ``nfvi/conf/*/<group>/`` lists its schema (``base_<group>``) first in its defaults,
so a misspelled key or a value of the wrong type fails at composition with Hydra's message. Each
task package (``nfvi.energy``, ``nfvi.vae``, ``nfvi.cde``) defines its own schemas in its ``config.py``
and registers its primary schema as ``base_<command>`` with :func:`store`. No torch here: the data
layer and the reports import this module without dragging in the flows (factories: :mod:`nfvi.training`).

Validation happens once, at the edge: every schema's ``__post_init__`` checks its own fields (the primary
schema of a command also checks the fields that depend on each other), and :func:`validate` runs them all
on a composed config when a command starts (``nfvi.cli``). Task code then trusts its config. Each schema is
mounted at one fixed key in every command (``flow``, ``optim``, ``paths``, ``trainer``, ``eval``, ``model``,
``dataset``), so its messages name the full key (``trainer.beta0=nan is not allowed; ...``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nfvi.errors import NfviError, check_choice, check_int_range, check_range

__all__ = [
    "hydra_version_base",
    "register_resolver",
    "FLOW_KINDS",
    "SYLVESTER_VARIANTS",
    "MAX_FLOW_LENGTH",
    "MAX_WIDTH",
    "OPTIMIZERS",
    "LR_DECAYS",
    "FlowConfig",
    "OptimConfig",
    "PathsConfig",
    "store",
    "validate",
]


def hydra_version_base() -> dict:
    """The ``version_base`` argument of ``hydra.main`` and ``initialize_config_dir``, as keyword arguments: ``"1.3"``
    under hydra-core 1.3 (its defaults: no change of working directory, ...); none under 1.4, which deprecates the
    parameter (a ``Hydra15MigrationWarning`` on stderr) and always behaves as 1.3 did."""
    from hydra import __version__

    return {} if tuple(int(p) for p in __version__.split(".")[:2]) >= (1, 4) else {"version_base": "1.3"}


def register_resolver(name: str, resolver, *, use_cache: bool = False) -> None:
    """Register an OmegaConf resolver (replacing one of that name): ``register_resolver`` on omegaconf 2.4, where
    ``register_new_resolver`` is deprecated; ``register_new_resolver`` on 2.3, where ``register_resolver`` is the
    older, deprecated API."""
    import inspect

    if "replace" in inspect.signature(OmegaConf.register_resolver).parameters:  # omegaconf >= 2.4
        OmegaConf.register_resolver(name, resolver, replace=True, use_cache=use_cache)
    else:
        OmegaConf.register_new_resolver(name, resolver, replace=True, use_cache=use_cache)


#: the flows (``nfvi.flows.FLOW_KINDS``, kept torch-free here) and the optimizers (``nfvi.training.OPTIMIZERS``)
FLOW_KINDS = ("none", "planar", "radial", "nice", "iaf", "householder", "sylvester")
SYLVESTER_VARIANTS = ("orthogonal", "householder", "triangular")
OPTIMIZERS = ("rmsprop", "adam", "adamax")
#: trainer.lr_decay of nfvi energy and nfvi train (nfvi.training.cosine_factor / cosine_scheduler)
LR_DECAYS = ("none", "cosine")
#: upper bounds of sizes, so that a typo (flow.length=100000000) is refused before it allocates gigabytes
MAX_FLOW_LENGTH = 1000
MAX_WIDTH = 16384  # hidden-layer widths
MAX_LR = 10.0  # larger learning rates only diverge (the loss guard would stop them a step later)


@dataclass
class FlowConfig:
    """``flow=<kind>`` picks the option; ``flow.length=K`` the number of layers (0 = identity)."""

    kind: str = "planar"
    length: int = 10
    hidden: int = 64  # nice: width of each coupling MLP; iaf: width of each MADE hidden layer
    mix: str = "alternate"  # nice: alternate | permute
    w_floor: Optional[float] = 0.1  # planar, amortized only: ||w|| >= w_floor (docs/paper.md section 13); null = off
    amortized: bool = True  # train/cde: parameters computed per data point from the encoder (Sec. 4.3); false = global
    num_hidden: int = 1  # iaf: MADE hidden layers
    variant: str = "orthogonal"  # sylvester: orthogonal | householder | triangular (O-, H-, T-SNF)
    num_vectors: Optional[int] = None  # sylvester orthogonal: columns M <= D of Q; null = D
    num_householder: int = 4  # sylvester householder: reflections whose product is Q

    def __post_init__(self):
        check_choice("flow", self.kind, FLOW_KINDS)
        check_int_range("flow.length", self.length, 0, MAX_FLOW_LENGTH, kind="a whole number of layers")
        check_int_range("flow.hidden", self.hidden, 1, MAX_WIDTH, kind="a layer width")
        check_choice("flow.mix", self.mix, ("alternate", "permute"))
        check_int_range("flow.num_hidden", self.num_hidden, 1, 16, kind="a number of MADE hidden layers")
        check_choice("flow.variant", self.variant, SYLVESTER_VARIANTS)
        if self.num_vectors is not None:
            check_int_range("flow.num_vectors", self.num_vectors, 1, MAX_WIDTH, kind="a number of columns of Q (<= D)")
        check_int_range("flow.num_householder", self.num_householder, 1, MAX_WIDTH, kind="a number of reflections")
        if self.w_floor is not None:
            check_range("flow.w_floor", self.w_floor, 0.0, 100.0, kind="a floor on ||w|| (null: off)")


@dataclass
class OptimConfig:
    """``optim=rmsprop|adam|adamax``; ``momentum`` is used by rmsprop only; ``compile``: the step through
    ``torch.compile`` (:func:`nfvi.training.compile_optimizer_step`)."""

    name: str = "rmsprop"
    lr: float = 1e-5
    momentum: float = 0.9
    eps: float = 1e-8
    weight_decay: float = 0.0
    flow_lr_factor: float = 1.0  # the flow's own parameters (e.g. its amortization head) learn at lr * this factor
    #: run the step through torch.compile: one generated kernel for all parameters (rmsprop, adamax; adam's fused
    #: kernel is one pass already); seconds to compile once, eager again where compiling fails (docs/performance.md)
    compile: bool = False

    def __post_init__(self):
        """torch's own ranges (lr > 0, eps >= 0, weight_decay >= 0, momentum in [0, 1)), plus finite upper bounds."""
        check_choice("optim.name", self.name, OPTIMIZERS)
        check_range("optim.lr", self.lr, 0.0, MAX_LR, kind="a positive learning rate", low_open=True)
        check_range("optim.momentum", self.momentum, 0.0, 1.0, kind="a momentum (rmsprop)", high_open=True)
        check_range("optim.eps", self.eps, 0.0, 1.0, kind="a denominator term")
        check_range("optim.weight_decay", self.weight_decay, 0.0, 1.0, kind="an L2 penalty")
        check_range("optim.flow_lr_factor", self.flow_lr_factor, 0.0, 100.0, kind="a multiplier of optim.lr")


@dataclass
class PathsConfig:
    """Where data live and where runs go. ``NFVI_DATA`` sets the default data root."""

    data_dir: str = "${oc.env:NFVI_DATA,./data}"
    output_dir: str = "outputs"

    def __post_init__(self):
        if not str(self.output_dir).strip():  # runs would go to /<command>/... at the filesystem root
            raise NfviError("paths.output_dir='' is not allowed; give a folder, e.g. paths.output_dir=outputs")


def store(name: str, node, group: str | None = None) -> None:
    """Register a schema ``node`` under ``name`` (and ``group``) in Hydra's ConfigStore."""
    ConfigStore.instance().store(name=name, node=node, group=group)


store("base_flow", FlowConfig, group="flow")
store("base_optim", OptimConfig, group="optim")
store("base_paths", PathsConfig, group="paths")


def validate(cfg) -> None:
    """Check every value of a composed command config once, when the command starts; else a one-line NfviError.

    ``OmegaConf.to_object`` builds the schema's dataclasses, which runs the ``__post_init__`` of every nested
    schema (then of the primary one). OmegaConf may wrap what ``__post_init__`` raised; the :class:`NfviError`
    inside is re-raised as is. OmegaConf's own errors (a missing mandatory value) propagate: the CLI reports
    them in one line too.
    """
    try:
        OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, NfviError):
            raise NfviError(str(cause)) from None
        raise
