"""Schemas of ``nfvi train`` (``base_train``) and ``nfvi evaluate`` (``base_evaluate``).

Defaults are the paper's protocol (Sec. 6.2): 500,000 RMSprop updates of batch 100 with Eq. 20 annealing,
and -ln p(x) by importance sampling with S = 200 (docs/paper.md, Table 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from nfvi.config import LR_DECAYS, FlowConfig, OptimConfig, PathsConfig, store
from nfvi.data import COLOR_DATASETS, DatasetConfig
from nfvi.errors import check_choice, check_int_range, check_range, check_seed
from nfvi.precision import check_precision
from nfvi.trackers import LoggerConfig
from nfvi.vae.model import ModelConfig, check_likelihood_fits
from nfvi.vae.objectives import ANNEALING

__all__ = ["TrainerConfig", "EvalConfig", "TrainConfig", "EvaluateConfig"]

#: z-samples pushed through the model per training update (trainer.samples * trainer.batch_size) at most:
#: 100,000 MNIST decoder passes already hold a few GB for autograd
MAX_SAMPLES_PER_UPDATE = 100_000
MAX_EVAL_SAMPLES = 10_000_000  # eval.num_samples, eval.elbo_samples (pushed in chunks of eval.batch_size)


@dataclass
class TrainerConfig:
    """The optimisation schedule. Defaults are the paper's (500,000 updates of batch 100, Eq. 20 annealing)."""

    steps: int = 500_000  # parameter updates
    batch_size: int = 100
    samples: int = 1  # z-samples per data point per update
    annealing: str = "eq20"  # eq20 (paper) | kl_warmup | none
    anneal_steps: int = 10_000  # updates for beta to reach 1
    beta0: float = 0.01  # beta at update 0
    grad_clip: float = 0.0  # max global gradient norm; 0 = off
    lr_decay: str = "none"  # none | cosine (to lr_final_factor * lr at the last update)
    lr_final_factor: float = 0.01
    init_output_bias: bool = True  # decoder output bias = logit(mean training image)
    log_every: int = 100  # metrics.csv row every N updates
    val_every: int = 1000  # validation -ELBO every N updates (and at the end)
    val_images: int = 0  # 0: the whole validation split; N: a fixed random subset
    ckpt_every: int = 1000  # checkpoint.pt every N updates (and at the end / on a signal)
    progress: bool = True  # tqdm bar (updates/s, running loss)
    #: early stopping: stop after this many validations (trainer.val_every updates each) without a better validation
    #: -ELBO, counted once beta has reached 1 (after trainer.anneal_steps); 0 = off (the 2015 fixed schedule)
    patience: int = 0
    #: fp32 | bf16: bf16 runs the networks' matrix products and convolutions under autocast (bfloat16); every
    #: log-density, log-determinant and loss stays float32 (nfvi/precision.py); validation and evaluation are fp32
    precision: str = "fp32"
    compile: bool = False  # torch.compile the update's forward and backward (minutes to compile; docs/performance.md)

    def __post_init__(self):
        check_precision("trainer.precision", self.precision)
        for key in ("steps", "log_every", "val_every", "ckpt_every"):
            check_int_range(f"trainer.{key}", getattr(self, key), 1, kind="a positive whole number")
        most = MAX_SAMPLES_PER_UPDATE
        check_int_range("trainer.batch_size", self.batch_size, 1, most, kind="a positive whole number")
        per_image = f"a whole number (trainer.samples * trainer.batch_size <= {most})"
        check_int_range("trainer.samples", self.samples, 1, max(1, most // self.batch_size), kind=per_image)
        check_choice("trainer.annealing", self.annealing, ANNEALING)
        check_choice("trainer.lr_decay", self.lr_decay, LR_DECAYS)
        check_int_range("trainer.anneal_steps", self.anneal_steps, 0, kind="a whole number of updates")
        check_range("trainer.beta0", self.beta0, 0.0, 1.0, kind="an inverse temperature")
        check_range("trainer.grad_clip", self.grad_clip, 0.0, kind="a gradient norm (0 = off)")
        check_range("trainer.lr_final_factor", self.lr_final_factor, 0.0, 1.0, kind="a fraction of optim.lr")
        check_int_range("trainer.val_images", self.val_images, 0, kind="a whole number (0 = all)")
        check_int_range("trainer.patience", self.patience, 0, kind="a whole number of validations (0 = off)")


@dataclass
class EvalConfig:
    """Test-set evaluation (end of ``nfvi train`` and ``nfvi evaluate``)."""

    num_samples: int = 200  # importance samples per image for -ln p(x) (paper Table 2: S=200; eval.num_samples=5000)
    elbo_samples: int = 100  # Monte Carlo draws per image for the -ELBO
    batch_size: Optional[int] = (
        None  # z-samples pushed through the model at once (bounds memory); null: 2000 CPU, 10000 GPU
    )
    max_images: int = 0  # 0: the whole test split; N: a fixed random subset of N images (quick checks)
    checkpoint: str = "best"  # best: best validation bound (best.pt) | last: checkpoint.pt
    seed: int = 0  # random stream of the estimates and of the subset
    at_end: bool = True  # nfvi train: evaluate when training finishes
    progress: bool = True  # tqdm bar over chunks (on a terminal; else a progress line with the ETA)
    update_results: bool = False  # nfvi evaluate: also replace results.json when the settings differ from its own

    def __post_init__(self):
        check_int_range("eval.num_samples", self.num_samples, 1, MAX_EVAL_SAMPLES, kind="a whole number of samples")
        check_int_range("eval.elbo_samples", self.elbo_samples, 1, MAX_EVAL_SAMPLES, kind="a whole number of samples")
        if self.batch_size is not None:
            check_int_range("eval.batch_size", self.batch_size, 1, MAX_SAMPLES_PER_UPDATE,
                            kind="a whole number of z-samples (null: automatic)")  # fmt: skip
        check_int_range("eval.max_images", self.max_images, 0, kind="a whole number (0 = all)")
        check_choice("eval.checkpoint", self.checkpoint, ("best", "last"))
        check_seed("eval.seed", self.seed)


@dataclass
class EvaluateConfig:
    """``nfvi evaluate run_dir=<run or folder of runs>``."""

    run_dir: str = ""  # a run folder, or a sweep folder whose runs lie one level below it (required)
    device: str = "auto"
    threads: int = 1  # torch CPU threads; 0 = torch's default (OMP_NUM_THREADS, else all cores); docs/performance.md
    resume: bool = False  # an evaluation with these settings exists (evaluations/<name>.json): return it as is
    overwrite: bool = False  # ... evaluate again and replace it
    eval: EvalConfig = field(default_factory=EvalConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self):
        check_int_range("threads", self.threads, 0, 1024, kind="a whole number (0 = torch's default)")


store("base_evaluate", EvaluateConfig)


@dataclass
class TrainConfig:
    """``nfvi train``: see the module docstring; ``nfvi/conf/train/train.yaml`` composes it."""

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 1  # torch CPU threads; 0 = torch's default (OMP_NUM_THREADS, else all cores); docs/performance.md
    resume: bool = False  # continue the checkpoint of the run folder (run_dir, hydra.run.dir or the sweep job's)
    overwrite: bool = False  # the run folder holds a run: remove its files and start afresh
    run_dir: str = ""  # the run directory (default: a new one from Hydra)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # logger=[tensorboard,wandb,mlflow]

    def __post_init__(self):
        check_seed("seed", self.seed)
        check_int_range("threads", self.threads, 0, 1024, kind="a whole number (0 = torch's default)")
        data_kind = "8bit" if self.dataset.name in COLOR_DATASETS else "binary"
        check_likelihood_fits(self.model.likelihood, data_kind, self.dataset.name)


store("base_train", TrainConfig)
