"""``nfvi train``: fit the DLGM/VAE with a flow posterior (paper Sec. 6.2), checkpoint, resume, evaluate.

::

    nfvi train flow=planar flow.length=80                            # paper settings except the length
    nfvi train -m flow=planar,nice flow.length=0,10,20,40,80         # a sweep (Hydra's basic launcher)
    nfvi train resume=true run_dir=outputs/train/<time>              # continue an interrupted run
    nfvi train experiment=mnist_quick flow.length=10                 # a profile of nfvi/conf/train/experiment/

Objective (``trainer.annealing``; :mod:`nfvi.vae.objectives`): ``eq20`` is the paper's annealed
free energy, ``beta_t = min(1, trainer.beta0 + t / trainer.anneal_steps)`` multiplying the whole log
joint ``log p(x|z_K) + log p(z_K)``; ``kl_warmup`` puts beta on the KL term only; ``none`` is the
plain negative ELBO. ``t`` counts parameter updates.

Run directory (Hydra's output dir, or ``run_dir=``): ``.hydra/``, ``train.log``, ``run_config.json``
(the resolved config), ``metrics.csv`` (training loss, beta, lr, gradient norm, updates/s and the
validation bound every ``trainer.val_every`` updates), ``checkpoint.pt`` / ``best.pt``
(:mod:`nfvi.vae.checkpoint`) and, after the test evaluation, ``results.json``
(:mod:`nfvi.vae.evaluate`).

Reproducibility: the parameters after N updates depend only on the config. The minibatch order and
the dynamic binarization come from one generator (``split_generator(seed, "train")``), the
posterior samples from torch's global RNG, and validation/evaluation draw from forked, separately
seeded streams. A checkpoint saves all of it (and the optimizer), so on the CPU a run interrupted
at any update and resumed ends at the same parameters as an uninterrupted one.

Stopping: SIGINT (Ctrl-C) or SIGTERM finishes the current update, saves ``checkpoint.pt`` and exits
with status 130 or 143 (a second Ctrl-C aborts at once). A NaN/inf loss, gradient or validation
bound stops the run with a one-line error naming the update; ``checkpoint.pt`` keeps the last good
state (a state with non-finite parameters is never saved).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from nfvi.config import FlowConfig, OptimConfig, PathsConfig, optimizer_from_config, select_device, store
from nfvi.data import DatasetConfig, binarize, load_dataset, split_generator
from nfvi.errors import NfviError, NonFiniteLossError, check_choice, check_range
from nfvi.runs import MetricsLog, run_dir, seed_everything, write_json
from nfvi.vae.checkpoint import BEST, CHECKPOINT, config_diff, load_checkpoint, save_checkpoint
from nfvi.vae.evaluate import EvalConfig, check_eval_config, evaluate_run, summary_line
from nfvi.vae.model import ModelConfig, build_model, check_likelihood_fits, model_input_shape
from nfvi.vae.objectives import ANNEALING, annealed_loss, beta_schedule, free_energy_terms

__all__ = ["TrainerConfig", "TrainConfig", "Trainer", "lr_factor", "newest_matching_run", "train", "run"]

RUN_CONFIG = "run_config.json"
LR_DECAYS = ("none", "cosine")


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


@dataclass
class TrainConfig:
    """``nfvi train``: see the module docstring; ``nfvi/conf/train/train.yaml`` composes it."""

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads; 0 = torch's default (OMP_NUM_THREADS, else all cores)
    resume: bool = False  # continue the checkpoint of run_dir (or of the newest run with this config)
    run_dir: str = ""  # the run directory (default: a new one from Hydra)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


store("base_train", TrainConfig)


# ---------------------------------------------------------------------------------------------------------------------
# Run directory selection (resolvers used by nfvi/conf/train/train.yaml's hydra.run.dir and hydra.output_subdir)


def _job_config(root) -> dict:
    keys = [k for k in root if k != "hydra"]
    return OmegaConf.to_container(OmegaConf.masked_copy(root, keys), resolve=True)


def newest_matching_run(search_root: str | Path, current: dict) -> Path | None:
    """The run under ``search_root`` (newest checkpoint first) whose config equals ``current`` up to resumable keys."""
    candidates = [p.parent for p in Path(search_root).glob(f"*/{CHECKPOINT}") if (p.parent / RUN_CONFIG).is_file()]
    candidates.sort(key=lambda p: (p / CHECKPOINT).stat().st_mtime, reverse=True)
    for path in candidates:
        try:
            saved = json.loads((path / RUN_CONFIG).read_text())
        except (OSError, ValueError):
            continue
        if not config_diff(saved, current):
            return path
    return None


def _resolve_train_dir(run_dir_value: str, resume, default: str, *, _root_) -> str:
    """``hydra.run.dir``: ``run_dir`` if given; with ``resume=true`` the newest run of this config; else ``default``."""
    resume = str(resume).lower() == "true"
    if run_dir_value:
        if resume and not (Path(str(run_dir_value)) / CHECKPOINT).is_file():
            raise NfviError(f"resume=true: run_dir={run_dir_value} holds no {CHECKPOINT} to continue")
        return str(run_dir_value)
    if resume:
        found = newest_matching_run(Path(default).parent, _job_config(_root_))
        if found is not None:
            return str(found)
    return default


def _resolve_output_subdir(resume, output_dir: str = "") -> str:
    """``hydra.output_subdir``: ``.hydra`` for a new run; a dated subfolder when resuming (the original is kept)."""
    if str(resume).lower() == "true" and (Path(str(output_dir)) / CHECKPOINT).is_file():
        return ".hydra/resume-" + time.strftime("%Y-%m-%d_%H-%M-%S")
    return ".hydra"


def _short_dirname(text: str, limit: int = 96) -> str:
    """``hydra.sweep.subdir``: the job's overrides, cut to ``limit`` characters plus a hash when longer."""
    import hashlib

    text = str(text).replace("/", "_")
    if len(text) <= limit:
        return text
    return text[: limit - 9] + "~" + hashlib.sha1(text.encode()).hexdigest()[:8]


OmegaConf.register_new_resolver("nfvi.dirname", _short_dirname, replace=True, use_cache=True)
OmegaConf.register_new_resolver("nfvi.train_dir", _resolve_train_dir, replace=True)
OmegaConf.register_new_resolver("nfvi.hydra_subdir", _resolve_output_subdir, replace=True, use_cache=True)


# ---------------------------------------------------------------------------------------------------------------------


def lr_factor(step: int, steps: int, decay: str, final: float) -> float:
    """Learning-rate multiplier at update ``step`` (0-based) of ``steps``: 1, or a cosine from 1 to ``final``."""
    if decay == "none" or steps <= 1:
        return 1.0
    progress = min(1.0, step / (steps - 1))
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_train_config(cfg) -> None:
    t = cfg.trainer
    for key in ("steps", "batch_size", "samples", "log_every", "val_every", "ckpt_every"):
        check_range(f"trainer.{key}", getattr(t, key), low=1, kind="a positive whole number")
    check_choice("trainer.annealing", t.annealing, ANNEALING)
    check_choice("trainer.lr_decay", t.lr_decay, LR_DECAYS)
    check_range("trainer.anneal_steps", t.anneal_steps, low=0, kind="a whole number of updates")
    check_range("trainer.beta0", t.beta0, low=0.0, high=1.0, kind="an inverse temperature")
    check_range("trainer.grad_clip", t.grad_clip, low=0.0, kind="a gradient norm (0 = off)")
    check_range("trainer.lr_final_factor", t.lr_final_factor, low=0.0, high=1.0, kind="a fraction of optim.lr")
    check_range("trainer.val_images", t.val_images, low=0, kind="a whole number (0 = all)")
    check_eval_config(cfg.eval)
    check_range("threads", cfg.threads, low=0, kind="a whole number (0 = torch's default)")


def _x_dim_value(x_dim) -> int | list[int]:
    """``x_dim`` as stored in checkpoints: an int (flat models) or a list (image shape)."""
    return int(x_dim) if isinstance(x_dim, int) else [int(n) for n in x_dim]


class _StopRequest:
    """SIGINT/SIGTERM set a flag that the loop checks after each update; a second SIGINT aborts at once."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class Trainer:
    """One training run in ``out``: build or restore the state, loop, checkpoint. See the module docstring."""

    def __init__(self, cfg: DictConfig, out: Path, device: torch.device, data=None):
        self.cfg, self.out, self.device = cfg, Path(out), device
        self.t = cfg.trainer
        self.data = data if data is not None else load_dataset(cfg.dataset, root=cfg.paths.data_dir)
        check_likelihood_fits(cfg.model.likelihood, getattr(self.data, "kind", "binary"), cfg.dataset.name)
        self.x_dim = model_input_shape(cfg.model, self.data.image_shape)
        if len(self.data.train) < self.t.batch_size:
            raise NfviError(
                f"trainer.batch_size={self.t.batch_size} exceeds the {len(self.data.train)} training images "
                f"of dataset={cfg.dataset.name}"
            )
        seed_everything(int(cfg.seed))
        self.model = build_model(cfg.model, cfg.flow, self.x_dim).to(device)
        if self.t.init_output_bias:
            self.model.init_output_bias(self.data.pixel_mean())
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = optimizer_from_config(cfg.optim, self.params, flow_params=self.model.flow.parameters())
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.data_gen = split_generator(int(cfg.seed), "train")
        self.step, self.epoch, self.pos = 0, 0, 0
        self.perm: torch.Tensor | None = None
        self.best: dict = {}
        self.train_time = 0.0
        self.valid = self.data.valid
        if self.t.val_images and self.t.val_images < len(self.valid):
            gen = torch.Generator().manual_seed(int(cfg.seed))
            self.valid = self.valid[torch.randperm(len(self.valid), generator=gen)[: self.t.val_images].sort().values]

    # -- state ---------------------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "kind": "last",
            "step": self.step,
            "epoch": self.epoch,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "x_dim": _x_dim_value(self.x_dim),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
                "data": self.data_gen.get_state(),
            },
            "data": {"perm": self.perm, "pos": self.pos},
            "best": dict(self.best),
            "train_time_s": self.train_time,
            "torch_version": str(torch.__version__),
        }

    def restore(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"]["torch"])
            if self.device.type == "cuda" and state["rng"]["cuda"]:
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
            self.data_gen.set_state(state["rng"]["data"])
            self.perm, self.pos = state["data"]["perm"], int(state["data"]["pos"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise NfviError(f"checkpoint {self.out / CHECKPOINT} cannot be restored: {first[:200]}") from None
        self.step, self.epoch = int(state["step"]), int(state.get("epoch", 0))
        self.best = dict(state.get("best") or {})
        self.train_time = float(state.get("train_time_s", 0.0))

    def params_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())

    def save(self) -> None:
        """Write ``checkpoint.pt``, unless the parameters are not finite (then the last good one stays)."""
        if not self.params_finite():
            raise NonFiniteLossError(self._nonfinite("the parameters became non-finite", step=self.step))
        save_checkpoint(self.out / CHECKPOINT, self.state())

    def _nonfinite(self, what: str, step: int | None = None) -> str:
        step = self.step + 1 if step is None else step
        path = self.out / CHECKPOINT
        if path.is_file():
            try:
                kept = f"step {int(load_checkpoint(path)['step'])}"
            except NfviError:
                kept = "an unreadable one"
            where = f"the last good checkpoint ({kept}) is kept in {path}"
        else:
            where = f"no checkpoint was saved yet in {self.out}"
        return f"{what} at step {step}; stopping; {where}"

    # -- data ----------------------------------------------------------------------------------------------------------
    def next_batch(self) -> torch.Tensor:
        n, bs = len(self.data.train), self.t.batch_size
        if self.perm is None or self.pos + bs > n:  # a new epoch; the last incomplete batch is dropped
            if self.perm is not None:
                self.epoch += 1
            self.perm, self.pos = torch.randperm(n, generator=self.data_gen), 0
        idx = self.perm[self.pos : self.pos + bs]
        self.pos += bs
        x = self.data.train[idx]
        if self.data.dynamic:
            x = binarize(x, self.data_gen)
        return x.to(self.device, non_blocking=True)

    # -- validation ----------------------------------------------------------------------------------------------------
    def validate(self) -> float:
        """Validation -ELBO (1 sample per image, a fixed random stream that leaves the training RNG untouched)."""
        from nfvi.evaluate import elbo

        if len(self.valid) == 0:
            return float("nan")
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(self.cfg.seed) + 1)
            value = -float(elbo(self.model, self.valid, num_samples=1, batch_size=self.cfg.eval.batch_size).mean())
        if not math.isfinite(value):
            raise NonFiniteLossError(self._nonfinite(f"the validation bound became {value}", step=self.step))
        if not self.best or value < self.best["val_neg_elbo"]:
            self.best = {"val_neg_elbo": value, "step": self.step}
            state = {
                "kind": "best",
                "step": self.step,
                "val_neg_elbo": value,
                "config": OmegaConf.to_container(self.cfg, resolve=True),
                "x_dim": _x_dim_value(self.x_dim),
                "model": self.model.state_dict(),
            }
            save_checkpoint(self.out / BEST, state)
        return value

    # -- loop ----------------------------------------------------------------------------------------------------------
    def fit(self) -> None:
        t, steps = self.t, self.t.steps
        metrics = MetricsLog(self.out / "metrics.csv")
        metrics.truncate_after(self.step)
        window = {"loss": 0.0, "neg_elbo": 0.0, "n": 0, "t0": time.time(), "grad_norm": 0.0}
        bar = tqdm(
            total=steps,
            initial=self.step,
            unit="upd",
            desc="train",
            disable=not t.progress,
            dynamic_ncols=True,
            mininterval=1.0,
            smoothing=0.05,
        )
        self.model.train()
        max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
        with _StopRequest() as stop, bar:
            while self.step < steps:
                tick = time.time()
                beta = beta_schedule(self.step, t.annealing, start=t.beta0, steps=t.anneal_steps)
                factor = lr_factor(self.step, steps, t.lr_decay, t.lr_final_factor)
                for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
                    group["lr"] = base * factor
                x = self.next_batch()
                terms = free_energy_terms(self.model, x, num_samples=t.samples)
                loss = annealed_loss(terms, beta, t.annealing).mean()
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(self._nonfinite(f"the loss became {loss_value}"))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
                if not math.isfinite(grad_norm):
                    raise NonFiniteLossError(self._nonfinite(f"the gradient norm became {grad_norm}"))
                self.optimizer.step()
                self.step += 1
                self.train_time += time.time() - tick

                window["loss"] += loss_value
                window["neg_elbo"] += -float(terms["elbo"].detach().mean())
                window["grad_norm"] = max(window["grad_norm"], grad_norm)
                window["n"] += 1
                bar.update(1)
                if self.step % 10 == 0 and t.progress:
                    bar.set_postfix(loss=f"{window['loss'] / window['n']:.2f}", beta=f"{beta:.3f}", refresh=False)

                last = self.step == steps
                do_val = self.step % t.val_every == 0 or last
                if self.step % t.log_every == 0 or do_val or stop.signum is not None:
                    elapsed = time.time() - window["t0"]
                    row = {
                        "step": self.step,
                        "epoch": self.epoch,
                        "beta": beta,
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "loss": window["loss"] / window["n"],
                        "train_neg_elbo": window["neg_elbo"] / window["n"],
                        "grad_norm_max": window["grad_norm"],
                        "updates_per_s": window["n"] / elapsed if elapsed > 0 else float("nan"),
                        "val_neg_elbo": self.validate() if do_val else "",
                        "train_time_s": round(self.train_time, 3),
                    }
                    metrics.log(**row)
                    if do_val and t.progress:
                        bar.write(
                            f"step {self.step}: train loss {row['loss']:.2f}, val -ELBO {row['val_neg_elbo']:.2f}"
                        )
                    window = {"loss": 0.0, "neg_elbo": 0.0, "n": 0, "t0": time.time(), "grad_norm": 0.0}
                if self.step % t.ckpt_every == 0 or last or stop.signum is not None:
                    self.save()
                if stop.signum is not None and not last:
                    name = signal.Signals(stop.signum).name
                    bar.close()
                    print(
                        f"nfvi train: {name} at step {self.step}: checkpoint saved in {self.out / CHECKPOINT}; "
                        f"continue with: nfvi train resume=true run_dir={self.out}",
                        file=sys.stderr,
                    )
                    raise SystemExit(128 + stop.signum)


def _same_evaluation(results: dict, eval_cfg, step: int, out: Path) -> bool:
    """Whether ``results`` (a finished run's results.json) is what evaluating with ``eval_cfg`` would give.

    A ``best`` request is met by ``last`` weights only when the run has no ``best.pt`` (evaluation falls back
    to them); ``eval.max_images=0`` is met only by an evaluation on the whole test split.
    """
    checkpoint = results.get("checkpoint")
    same_weights = checkpoint == eval_cfg.checkpoint or (
        eval_cfg.checkpoint == "best" and checkpoint == "last" and not (out / BEST).is_file()
    )
    if eval_cfg.max_images == 0:
        same_images = results.get("test_images") == "all"
    else:  # a subset of that size, or the whole split when it has no more images than that
        n = results.get("num_test_images")
        same_images = n == eval_cfg.max_images or (results.get("test_images") == "all" and n <= eval_cfg.max_images)
    return (
        results.get("steps") == step
        and results.get("num_importance_samples") == eval_cfg.num_samples
        and results.get("num_elbo_samples") == eval_cfg.elbo_samples
        and results.get("eval_seed") == eval_cfg.seed
        and same_weights
        and same_images
    )


def train(cfg: DictConfig, out: str | Path, device: torch.device | None = None) -> dict:
    """Train (or resume) the run in ``out``; evaluate it at the end (``eval.at_end``). Returns ``results.json``'s dict.

    Without evaluation the dict holds the training summary only (``results.json`` is not written).
    """
    started = time.time()
    check_train_config(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = device or select_device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(int(cfg.threads))
    ckpt_path = out / CHECKPOINT
    current = OmegaConf.to_container(cfg, resolve=True)

    state = None
    if ckpt_path.is_file():
        if not cfg.resume:
            raise NfviError(
                f"{out} already holds a checkpoint; pass resume=true to continue it, or use a new run directory"
            )
        state = load_checkpoint(ckpt_path)
        diff = config_diff(state["config"], current)
        if diff:
            saved = OmegaConf.create(state["config"])
            shown = ", ".join(f"{k} ({OmegaConf.select(saved, k)} -> {OmegaConf.select(cfg, k)})" for k in diff[:8])
            more = f" and {len(diff) - 8} more" if len(diff) > 8 else ""
            raise NfviError(
                f"cannot resume {out}: the config differs from the checkpoint's in {shown}{more}; "
                f"restore those values or start a new run"
            )
        saved_t = state["config"]["trainer"]
        if saved_t["lr_decay"] != "none" and saved_t["steps"] != cfg.trainer.steps:
            raise NfviError(
                f"cannot resume {out} with trainer.steps={cfg.trainer.steps}: its learning rate decays over "
                f"trainer.steps={saved_t['steps']} (trainer.lr_decay={saved_t['lr_decay']})"
            )
        if int(state["step"]) > cfg.trainer.steps:
            raise NfviError(
                f"cannot resume {out} with trainer.steps={cfg.trainer.steps}: the checkpoint is at step {state['step']}"
            )
    elif cfg.resume and cfg.run_dir:
        raise NfviError(f"resume=true: run_dir={cfg.run_dir} holds no {CHECKPOINT} to continue")
    elif cfg.resume:
        print(f"nfvi train: resume=true but {out} holds no checkpoint yet; starting a new run there", file=sys.stderr)

    write_json(out / RUN_CONFIG, current)
    if state is not None and int(state["step"]) == cfg.trainer.steps and (out / "results.json").is_file():
        try:
            done = json.loads((out / "results.json").read_text())
        except ValueError:
            done = {}
        if not cfg.eval.at_end or _same_evaluation(done, cfg.eval, int(state["step"]), out):
            print(f"nfvi train: {out} is complete (step {state['step']}); nothing to do", file=sys.stderr)
            return done

    trainer = Trainer(cfg, out, device)
    if state is not None:
        trainer.restore(state)
        del state
        print(f"nfvi train: resuming {out} at step {trainer.step} of {cfg.trainer.steps}", file=sys.stderr)
    if trainer.step < cfg.trainer.steps:
        trainer.fit()
    summary = {
        "task": "vae",
        "run_dir": str(out),
        "steps": trainer.step,
        "train_time_s": round(trainer.train_time, 3),
        "val_neg_elbo_best": trainer.best.get("val_neg_elbo"),
        "best_step": trainer.best.get("step"),
    }
    if not cfg.eval.at_end:
        return summary
    data = trainer.data
    del trainer
    try:
        results = evaluate_run(out, cfg.eval, cfg.paths.data_dir, device, data=data, started=started)
    except KeyboardInterrupt:
        print(
            f"nfvi train: interrupted during the test evaluation; training is complete and saved; "
            f"evaluate with: nfvi evaluate run_dir={out}",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    print(f"nfvi train: {out}: {summary_line(results)}")
    return results


def run(cfg: DictConfig) -> dict:
    """``nfvi train`` (Hydra task): the run directory is ``run_dir`` when given, else Hydra's output directory."""
    out = run_dir()
    if cfg.run_dir:
        with contextlib.suppress(ValueError, ImportError):
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode

            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                raise NfviError(
                    "run_dir= names one run and cannot be used in a sweep (-m); to resume a sweep, pass "
                    "hydra.sweep.dir=<its folder> and resume=true (each job continues its own folder)"
                )
        out = Path(cfg.run_dir)
    return train(cfg, out)
