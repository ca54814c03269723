"""Schema of ``nfvi cde`` (``base_cde``).

``dataset`` and ``model`` are plain strings in the config, but they are offered as Hydra config
groups whose options (``nfvi/conf/cde/{dataset,model}/*.yaml``, package ``_global_``) just set the
string; ``nfvi cde`` has its own config root, so ``nfvi train``'s image datasets are not among them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nfvi.cde.data import DATASETS
from nfvi.cde.model import ACTIVATIONS, MODELS
from nfvi.config import MAX_WIDTH, FlowConfig, OptimConfig, PathsConfig, store
from nfvi.errors import NfviError, check_choice, check_int_range, check_range, check_seed
from nfvi.precision import check_precision
from nfvi.trackers import LoggerConfig

__all__ = ["CDEConfig"]


@dataclass
class CDEConfig:
    """Schema of ``nfvi/conf/cde/cde.yaml`` (``base_cde``)."""

    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # logger=[tensorboard,wandb,mlflow]
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
    #: fp32 | bf16: bf16 runs the MLPs' matrix products under autocast (bfloat16) during training; every
    #: log-density and log-determinant stays float32, validation and test are float32 (nfvi/precision.py)
    precision: str = "fp32"
    #: the run folder holds this run: a finished one with the same settings is returned as is, an unfinished one re-run
    resume: bool = False
    #: the run folder holds another run: remove its files and start afresh
    overwrite: bool = False

    def __post_init__(self):
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("model", self.model, MODELS)
        check_choice("activation", self.activation, ACTIVATIONS)
        if not self.seeds:
            raise NfviError("seeds=[] is not allowed; give at least one seed, e.g. seeds=[0,1,2,3,4]")
        if len(set(self.seeds)) != len(self.seeds):
            raise NfviError(f"seeds={list(self.seeds)} repeats a seed; give distinct seeds")
        for seed in self.seeds:
            check_seed("seeds", seed)
        if not 1 <= len(self.hidden) <= 64:
            raise NfviError(f"hidden={list(self.hidden)} is not allowed; give 1 to 64 widths, e.g. hidden=[64,64]")
        for h in self.hidden:
            check_int_range("hidden", h, 1, MAX_WIDTH, kind="layer widths")
        check_int_range("synthetic_size", self.synthetic_size, 20, 10_000_000, kind="a number of rows")
        check_range("test_fraction", self.test_fraction, 0.05, 0.9, kind="a fraction")
        check_range("val_fraction", self.val_fraction, 0.05, 0.9, kind="a fraction")
        check_int_range("mdn_components", self.mdn_components, 1, 1000, kind="a number of mixture components")
        check_range("min_scale", self.min_scale, 0.0, 100.0, kind="a non-negative scale floor")
        check_int_range("batch_size", self.batch_size, 1, 1_000_000, kind="a positive batch size")
        check_int_range("max_epochs", self.max_epochs, 1, kind="a positive number of epochs")
        check_int_range("patience", self.patience, 1, kind="a positive number of epochs")
        check_int_range("lr_decay_patience", self.lr_decay_patience, 0, kind="a number of epochs (0: off)")
        check_range("grad_clip", self.grad_clip, 0.0, kind="a gradient-norm bound (0: off)")
        check_int_range("threads", self.threads, 0, 1024, kind="a number of threads (0: torch's default)")
        check_precision("precision", self.precision)


store("base_cde", CDEConfig)
