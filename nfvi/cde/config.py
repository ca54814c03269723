"""Schema of ``nfvi cde`` (``base_cde``).

``dataset`` and ``model`` are plain strings in the config, but they are offered as Hydra config
groups whose options (registered below in the ConfigStore, package ``_global_``) just set the
string.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from nfvi.cde.data import DATASETS
from nfvi.cde.model import MODELS
from nfvi.config import FlowConfig, OptimConfig, PathsConfig, store

__all__ = ["CDEConfig"]


@dataclass
class CDEConfig:
    """Schema of ``conf/cde.yaml`` (``base_cde``)."""

    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    #: fish | concrete | energy | skillcraft | parkinsons | temperature | air | sine | bimodal
    dataset: str = "concrete"
    #: flow (affine base + `flow` layers) | gaussian (affine only) | mdn (mixture density network)
    model: str = "flow"
    #: the data file; default <paths.data_dir>/uci/<UCI's file name>
    data_file: str = ""
    #: fetch a missing file from UCI (checked against the reference checksums)
    download: bool = True
    #: the cleaned table must match the UCI release's checksum (false: accept a modified copy)
    verify: bool = True
    #: download from here instead of UCI (a zip holding the UCI file, or the file itself)
    data_url: str = ""
    synthetic_size: int = 2000
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    test_fraction: float = 0.3
    #: part of the training split held out for early stopping
    val_fraction: float = 0.2
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    activation: str = "tanh"
    mdn_components: int = 5
    #: lower bound of the scales s(x), sigma(x) (standardised units)
    min_scale: float = 1e-3
    batch_size: int = 128
    max_epochs: int = 1000
    #: early stopping: epochs without a better validation NLL
    patience: int = 100
    #: halve the learning rate after this many epochs without a better validation NLL (0: off)
    lr_decay_patience: int = 0
    #: global gradient-norm clipping (0: off)
    grad_clip: float = 10.0
    #: torch CPU threads (small MLPs gain nothing from more; 0: torch's default)
    threads: int = 1
    device: str = "cpu"
    #: the run folder holds this run: a finished one with the same settings is returned as is, an unfinished one re-run
    resume: bool = False
    #: the run folder holds another run: remove its files and start afresh
    overwrite: bool = False


store("base_cde", CDEConfig)
#: the options of the groups ``nfvi cde`` shares by name with ``nfvi train`` (checked by :mod:`nfvi.cli`)
GROUP_CHOICES = {"dataset": DATASETS, "model": MODELS}
for _group, _names in GROUP_CHOICES.items():
    for _name in _names:  # options that only set the string at the top level (see the module docstring)
        ConfigStore.instance().store(name=_name, node={_group: _name}, group=_group, package="_global_")
