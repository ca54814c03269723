"""``nfvi train``: fit the DLGM/VAE with a flow posterior (paper Sec. 6.2), checkpoint, resume, evaluate.

::

    nfvi train flow=planar flow.length=80                            # paper settings except the length
    nfvi train -m flow=planar,nice flow.length=0,10,20,40,80         # a sweep (Hydra's basic launcher)
    nfvi train resume=true run_dir=outputs/train/<time>              # continue the run in that folder
    nfvi train experiment=mnist_quick flow.length=10                 # a profile of nfvi/conf/train/experiment/

Objective (``trainer.annealing``; :mod:`nfvi.vae.objectives`): ``eq20`` is the paper's annealed
free energy, ``beta_t = min(1, trainer.beta0 + t / trainer.anneal_steps)`` multiplying the whole log
joint ``log p(x|z_K) + log p(z_K)``; ``kl_warmup`` puts beta on the KL term only; ``none`` is the
plain negative ELBO. ``t`` counts parameter updates.

Run directory (Hydra's output dir, or ``run_dir=``; :class:`nfvi.runs.Run`): ``.hydra/`` (the latest launch),
``train.log``, ``run_config.json`` (the resolved config of the first launch, what ``resume=true`` is checked
against), ``metrics.csv`` (training loss, beta, lr, gradient norm, updates/s and the
validation bound every ``trainer.val_every`` updates), ``checkpoint.pt`` / ``best.pt``
(:mod:`nfvi.vae.checkpoint`) and, after the test evaluation, ``results.json``
(:mod:`nfvi.vae.evaluate`).

Reproducibility: the parameters after N updates depend only on the config. The minibatch order and
the dynamic binarization come from one generator (``split_generator(seed, "train")``), the
posterior samples from torch's global RNG, and validation/evaluation draw from forked, separately
seeded streams. A checkpoint saves all of it (and the optimizer), so on the CPU a run interrupted
at any update and resumed ends at the same parameters as an uninterrupted one. On CUDA the training set is
resident on the device and its batches come from a device generator (:mod:`nfvi.data.resident`; another stream,
saved in the checkpoint too; a run moved between CUDA and the CPU continues from a fresh epoch of the new stream).

Precision and speed (docs/performance.md): ``trainer.precision=bf16`` runs the networks under autocast (the
log-densities and the loss stay float32; validation and evaluation are float32); ``trainer.compile=true`` compiles
the update's forward and backward with ``torch.compile``. The update reads nothing back from the device: the
losses are summed there and read every ``trainer.log_every`` updates (:class:`nfvi.training.LossWindow`).

Stopping: SIGINT (Ctrl-C) or SIGTERM finishes the current update, saves ``checkpoint.pt`` and exits
with status 130 or 143 (a second Ctrl-C aborts at once). A NaN/inf loss, gradient or validation
bound stops the run with a one-line error naming the update; ``checkpoint.pt`` keeps the last good
state (a state with non-finite parameters is never saved). So does divergence: a logged training -ELBO (each
``metrics.csv`` row) or validation -ELBO more than 10 nats per pixel above the -ELBO of the run's first update
(:func:`nfvi.training.check_divergence`; the CLI exits 1, no results.json is written).

Identity: ``run_config.json`` records the run's ``run_id``; every checkpoint records it with the resolved config,
and ``resume=true`` refuses a checkpoint of another run (:func:`nfvi.vae.checkpoint.check_identity`). Before the
model is allocated, :mod:`nfvi.sizes` refuses a config that needs more memory than the device has.
On a GPU the non-finite check runs at each log point and before each checkpoint (still naming the first bad
update), so no state reached through a non-finite loss is saved.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import shlex
import signal
import threading
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from nfvi.config import register_resolver
from nfvi.data import binarize, load_dataset, split_generator
from nfvi.data.resident import ResidentBatches
from nfvi.errors import NfviError, NonFiniteLossError, RunRefused
from nfvi.precision import set_precision
from nfvi.runs import MetricsLog, Run, run_dir, seed_everything
from nfvi.training import (
    LossWindow,
    check_divergence,
    clip_gradients,
    cosine_factor,
    early_stop_due,
    match_state_layout,
    optimizer_from_config,
    step_with_norm,
)
from nfvi.vae.checkpoint import (
    BEST,
    CHECKPOINT,
    check_identity,
    config_diff,
    load_checkpoint,
    save_checkpoint,
    weights_mismatch,
)
from nfvi.vae.config import TrainConfig, TrainerConfig
from nfvi.vae.evaluate import evaluate_run, same_settings, summary_line
from nfvi.vae.model import build_model, check_likelihood_fits, model_input_shape
from nfvi.vae.objectives import annealed_loss, beta_schedule, free_energy_terms

__all__ = ["TrainerConfig", "TrainConfig", "Trainer", "lr_factor", "resume_command", "train", "run"]

RUN_CONFIG = "run_config.json"
#: torch.compile's backend for trainer.compile=true (tests set "eager" to check the plumbing in seconds)
COMPILE_BACKEND = "inductor"
#: LossWindow's deferred checks: None = on any device but the CPU (tests set True to run the GPU's way on the CPU)
DEFER_CHECKS: bool | None = None


def data_on_device(device: torch.device) -> bool:
    """Whether the training set lives on ``device`` (:class:`nfvi.data.resident.ResidentBatches`): on CUDA.

    On the CPU the host path is the device path already; it keeps its own random stream (published runs).
    """
    return device.type == "cuda"


log = logging.getLogger("nfvi.train")


# ---------------------------------------------------------------------------------------------------------------------
# Config resolvers of nfvi/conf/train/train.yaml (pure functions of their arguments: no file-system look-ups)


def _first_given(*values) -> str:
    """``hydra.run.dir``: the first non-empty value (``run_dir`` when given, else Hydra's dated folder)."""
    return next((str(v) for v in values if str(v)), "")


def _short_dirname(text: str, limit: int = 96) -> str:
    """``hydra.sweep.subdir``: the job's overrides, cut to ``limit`` characters plus a hash when longer."""
    import hashlib

    text = str(text).replace("/", "_")
    if len(text) <= limit:
        return text
    return text[: limit - 9] + "~" + hashlib.sha1(text.encode()).hexdigest()[:8]


register_resolver("nfvi.dirname", _short_dirname, use_cache=True)
register_resolver("nfvi.either", _first_given)


# ---------------------------------------------------------------------------------------------------------------------


def lr_factor(step: int, steps: int, decay: str, final: float) -> float:
    """Learning-rate multiplier at update ``step`` (0-based) of ``steps``: 1, or a cosine from 1 (first update) to
    ``final`` (last update): :func:`nfvi.training.cosine_factor` over ``steps - 1``. A pure function of the step,
    so a resumed run continues the schedule exactly."""
    if decay == "none":
        return 1.0
    return cosine_factor(step, steps - 1, final)


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

    def __init__(self, cfg: DictConfig, out: Path, device: torch.device, data=None, metrics: MetricsLog | None = None):
        self.cfg, self.out, self.device = cfg, Path(out), device
        self.metrics = metrics if metrics is not None else MetricsLog(self.out / "metrics.csv")  # the Run's
        self.t = cfg.trainer
        self.data = data if data is not None else load_dataset(cfg.dataset, root=cfg.paths.data_dir)
        check_likelihood_fits(cfg.model.likelihood, getattr(self.data, "kind", "binary"), cfg.dataset.name)
        self.x_dim = model_input_shape(cfg.model, self.data.image_shape)
        self.num_dims = math.prod(self.x_dim) if isinstance(self.x_dim, tuple | list) else int(self.x_dim)
        if len(self.data.train) < self.t.batch_size:
            raise NfviError(
                f"trainer.batch_size={self.t.batch_size} exceeds the {len(self.data.train)} training images "
                f"of dataset={cfg.dataset.name}"
            )
        self.check_size()
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
        self.resident: ResidentBatches | None = None  # the training set on the device (CUDA; data_on_device)
        if data_on_device(device):
            self.resident = ResidentBatches(
                self.data.train,
                self.t.batch_size,
                self.data.dynamic,
                device,
                seed=int(self.data_gen.initial_seed()),
                eight_bit=getattr(self.data, "kind", "binary") == "8bit",
            )
        set_precision(self.model, self.t.precision)
        self._loss_fn = self._loss
        if self.t.compile:
            self._loss_fn = torch.compile(self._loss, backend=COMPILE_BACKEND)
        self.best: dict = {}
        #: the training -ELBO of the run's first update: the divergence guard's reference (nfvi.training)
        self.reference: float | None = None
        #: the run's id (run_config.json), recorded in every checkpoint (nfvi.vae.checkpoint)
        self.run_id: str | None = None
        self.train_time = 0.0
        self.last_beta = float("nan")  # beta of the last update
        self.valid = self.data.valid
        if self.t.val_images and self.t.val_images < len(self.valid):
            gen = torch.Generator().manual_seed(int(cfg.seed))
            self.valid = self.valid[torch.randperm(len(self.valid), generator=gen)[: self.t.val_images].sort().values]

    def check_size(self) -> None:
        """Refuse in one line a model and batch that need more memory than the device has (:mod:`nfvi.sizes`)."""
        from nfvi.sizes import check_memory, flow_size_keys, with_length

        cfg, t, shape = self.cfg, self.t, tuple(self.data.train.shape[1:])

        def make(length: int):
            model = build_model(cfg.model, with_length(cfg.flow, length), self.x_dim)
            return model, lambda n: free_energy_terms(model, torch.zeros(n, *shape), num_samples=t.samples)

        m = cfg.model
        model_keys = {"model.hidden": m.hidden, "model.layers": m.layers, "model.latent_dim": m.latent_dim}
        if m.name in ("conv", "gated_conv"):
            model_keys["model.channels"] = m.channels
        keys = {
            "model": model_keys,
            "flow": flow_size_keys(cfg.flow),
            "batch": {"trainer.batch_size": t.batch_size, "trainer.samples": t.samples},
        }
        check_memory("train", make, cfg.flow.length, t.batch_size, keys, self.device)

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
            "data": {"perm": self.perm, "pos": self.pos}
            if self.resident is None
            else {"resident": self.resident.state(), "perm": None, "pos": 0},
            "best": dict(self.best),
            "reference_neg_elbo": self.reference,
            "run_id": self.run_id,
            "train_time_s": self.train_time,
            "torch_version": str(torch.__version__),
        }

    def restore(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:  # a layout this nfvi no longer builds: name the first differing parameter
            why = weights_mismatch(self.model.state_dict(), state["model"], self.cfg.flow.kind, exc)
            raise NfviError(f"checkpoint {self.out / CHECKPOINT} cannot be restored: {why}") from None
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            match_state_layout(self.optimizer)
            torch.set_rng_state(state["rng"]["torch"])
            if self.device.type == "cuda" and state["rng"]["cuda"]:
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
            self.data_gen.set_state(state["rng"]["data"])
            self.perm, self.pos = state["data"]["perm"], int(state["data"]["pos"])
            resident = state["data"].get("resident")
            if resident is not None and self.resident is not None:
                self.resident.load_state(resident)
            elif (resident is None) != (self.resident is None):  # the device changed between CUDA and the CPU
                log.warning(
                    "%s was trained with the training set %s the device; this run (device=%s) draws its batches "
                    "%s, from a fresh epoch: the batch order differs from an uninterrupted run",
                    *(self.out, "on" if resident is not None else "off", self.device),
                    "on the device" if self.resident is not None else "on the host",
                )
                if self.resident is not None:
                    self.resident.epoch = int(state.get("epoch", 0))
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise NfviError(f"checkpoint {self.out / CHECKPOINT} cannot be restored: {first[:200]}") from None
        self.step, self.epoch = int(state["step"]), int(state.get("epoch", 0))
        self.best = dict(state.get("best") or {})
        self.reference = state.get("reference_neg_elbo")
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
        return f"{what} at step {step}; stopping; {self._kept()}"

    def _kept(self) -> str:
        """What a stopped run keeps: the last good checkpoint (for the non-finite guard's message)."""
        path = self.out / CHECKPOINT
        if path.is_file():
            try:
                kept = f"step {int(load_checkpoint(path)['step'])}"
            except NfviError:
                kept = "an unreadable one"
            where = f"the last good checkpoint ({kept}) is kept in {path}"
        else:
            where = f"no checkpoint was saved yet in {self.out}"
        return where

    # -- data ----------------------------------------------------------------------------------------------------------
    def next_batch(self) -> torch.Tensor:
        """The next training batch on the device (drawn there when the training set is resident)."""
        if self.resident is not None:
            x = self.resident.next()
            self.epoch = self.resident.epoch
            return x
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
        from nfvi.estimators import elbo

        if len(self.valid) == 0:
            return float("nan")
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        set_precision(self.model, "fp32")  # validation is float32, whatever trainer.precision is
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(int(self.cfg.seed) + 1)
                value = -float(elbo(self.model, self.valid, num_samples=1, batch_size=self.cfg.eval.batch_size).mean())
        finally:
            set_precision(self.model, self.t.precision)
        self.check_bound(value, "the validation -ELBO", self.step)  # before best.pt: a diverged state is never saved
        if not self.best or value < self.best["val_neg_elbo"]:
            self.best = {"val_neg_elbo": value, "step": self.step}
            state = {
                "kind": "best",
                "step": self.step,
                "val_neg_elbo": value,
                "reference_neg_elbo": self.reference,
                "run_id": self.run_id,
                "config": OmegaConf.to_container(self.cfg, resolve=True),
                "x_dim": _x_dim_value(self.x_dim),
                "model": self.model.state_dict(),
            }
            save_checkpoint(self.out / BEST, state)
        return value

    def check_bound(self, value: float, what: str, step: int) -> None:
        """The non-finite and divergence guards on a logged bound (:func:`nfvi.training.check_divergence`): more
        than 10 nats per pixel above the -ELBO of the run's first update stops the run (exit 1); the last good
        checkpoint is kept."""
        check_divergence(value, self.reference, self.num_dims, step, self._kept, what=what)

    # -- loop ----------------------------------------------------------------------------------------------------------
    def _loss(self, x: torch.Tensor, beta) -> tuple[torch.Tensor, torch.Tensor]:
        """The update's objective on batch ``x``: the mean annealed loss and the mean -ELBO (0-dim, float32)."""
        terms = free_energy_terms(self.model, x, num_samples=self.t.samples)
        loss = annealed_loss(terms, beta, self.t.annealing).mean()
        return loss, -terms["elbo"].detach().mean()

    def train_step(self) -> dict[str, torch.Tensor]:
        """One parameter update (update ``self.step + 1``): the learning rate and beta of the schedule, a batch,
        the loss, its gradient (clipped when ``trainer.grad_clip > 0``) and the optimizer's step.

        Returns the update's ``loss``, ``neg_elbo`` and ``grad_norm`` as 0-dim tensors on the device: nothing here
        reads a value back, so on a GPU the host never waits for the device (the loop checks them at log points,
        :class:`nfvi.training.LossWindow`).
        """
        t = self.t
        beta = beta_schedule(self.step, t.annealing, start=t.beta0, steps=t.anneal_steps)
        factor = lr_factor(self.step, t.steps, t.lr_decay, t.lr_final_factor)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        x = self.next_batch()
        self.last_beta = beta
        if t.compile:  # a tensor, so that a new beta does not recompile (a fill: no host-to-device copy)
            beta = torch.full((), beta, device=self.device)
        loss, neg_elbo = self._loss_fn(x, beta)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            grad_norm = clip_gradients(self.params, t.grad_clip)  # foreach path
            self.optimizer.step()
        else:  # the norm only reported: with RMSprop on the CPU, in the step's own pass over the gradients
            grad_norm = step_with_norm(self.optimizer, self.params)
        self.step += 1
        return {"loss": loss.detach(), "neg_elbo": neg_elbo, "grad_norm": grad_norm.detach()}

    def fit(self) -> None:
        t, steps = self.t, self.t.steps
        metrics = self.metrics
        metrics.truncate_after(self.step)
        window = LossWindow(
            ("loss", "neg_elbo", "grad_norm"),
            self.device,
            labels={"loss": "the loss", "grad_norm": "the gradient norm"},
            checked=("loss", "grad_norm"),
            maximum=("grad_norm",),
            where=self._kept,
            defer=DEFER_CHECKS,
        )
        bar = tqdm(
            total=steps,
            initial=self.step,
            unit="upd",
            desc="train",
            disable=None if t.progress else True,  # a bar on a terminal only, never into a redirected log
            dynamic_ncols=True,
            mininterval=1.0,
            smoothing=0.05,
        )
        self.model.train()
        clock = {"t0": time.time(), "busy": 0.0}  # training time of the window (validation and saving excluded)

        def pause() -> None:  # fold the time since t0 into the training time (after a read: the device is done)
            now = time.time()
            clock["busy"] += now - clock["t0"]
            self.train_time += now - clock["t0"]
            clock["t0"] = now

        with _StopRequest() as stop, bar:
            while self.step < steps and not early_stop_due(self.step, self.best.get("step"), t):
                values = self.train_step()
                if self.reference is None:  # read once per run: the divergence guard's reference
                    self.reference = float(values["neg_elbo"])
                window.add(self.step, **values)
                bar.update(1)

                last = self.step == steps
                do_val = self.step % t.val_every == 0 or last
                logged = self.step % t.log_every == 0 or do_val or stop.signum is not None
                if logged:
                    n = window.n
                    means = window.read()  # one read of the window's sums (and the non-finite guard)
                    pause()
                    beta = self.last_beta
                    self.check_bound(means["neg_elbo"], "the training -ELBO", self.step)
                    row = {
                        "step": self.step,
                        "epoch": self.epoch,
                        "beta": beta,
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "loss": means["loss"],
                        "train_neg_elbo": means["neg_elbo"],
                        "grad_norm_max": means["grad_norm"],
                        "updates_per_s": n / clock["busy"] if clock["busy"] > 0 else float("nan"),
                        "val_neg_elbo": self.validate() if do_val else "",
                        "train_time_s": round(self.train_time, 3),
                    }
                    clock["busy"] = 0.0
                    metrics.log(**row)
                    if not bar.disable:
                        bar.set_postfix(loss=f"{row['loss']:.2f}", beta=f"{beta:.3f}", refresh=False)
                    if do_val or bar.disable:  # a step line per validation; per metrics row when there is no bar
                        val = f", val -ELBO {row['val_neg_elbo']:.2f}" if do_val else ""
                        line = f"step {self.step}/{steps}: train loss {row['loss']:.2f}{val}, beta {beta:.3f}"
                        line += f", {row['updates_per_s']:.1f} updates/s"
                        log.info(line)
                stopping = do_val and not last and early_stop_due(self.step, self.best.get("step"), t)
                if stopping:
                    log.info(
                        "early stopping at step %d: no better validation -ELBO in %d validations since step %d",
                        *(self.step, t.patience, self.best["step"]),
                    )
                saving = self.step % t.ckpt_every == 0 or last or stopping or stop.signum is not None
                if saving:
                    window.check()  # only a state reached through finite losses is saved (deferred checks)
                    if not logged:
                        pause()
                    self.save()
                if logged or saving:
                    clock["t0"] = time.time()  # validation and saving are not training time
                if stop.signum is not None and not last:
                    name = signal.Signals(stop.signum).name
                    bar.close()
                    log.warning(
                        "%s at step %d: checkpoint saved in %s; continue with: %s",
                        *(name, self.step, self.out / CHECKPOINT, resume_command(self.out)),
                    )
                    raise SystemExit(128 + stop.signum)


#: overrides a resume command leaves out: it sets them itself (``overwrite=true`` would start afresh)
_RESUME_DROPS = ("resume", "overwrite", "run_dir")


def resume_command(out: str | Path) -> str:
    """The shell command that continues the run in ``out``: ``nfvi train``, the launch's own overrides (Hydra's
    ``overrides.task``: those that made this config, so the resumed config matches the checkpoint's) but
    ``resume``/``overwrite``/``run_dir``, then ``resume=true run_dir=<out>`` (``out`` quoted for Hydra where needed);
    each word shell-quoted."""
    overrides: list[str] = []
    with contextlib.suppress(ValueError, ImportError):
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            overrides = [str(o) for o in HydraConfig.get().overrides.task]
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in _RESUME_DROPS]
    return shlex.join(["nfvi", "train", *kept, "resume=true", f"run_dir={_override_value(str(out))}"])


def _override_value(value: str) -> str:
    """``value`` as Hydra's override grammar reads it back: quoted where it holds characters the grammar would parse
    (brackets, commas, spaces, quotes, ...)."""
    if re.fullmatch(r"[\w/.\-:~+@%]*", value):
        return value
    return "'" + value.replace("'", "\\'") + "'"


def _trained(t, state: dict) -> bool:
    """Whether a checkpoint's training is over: all ``trainer.steps`` updates done, or stopped early."""
    step = int(state["step"])
    return step >= t.steps or early_stop_due(step, (state.get("best") or {}).get("step"), t)


def _same_evaluation(results: dict, eval_cfg, step: int, out: Path) -> bool:
    """Whether ``results`` (a finished run's results.json) is what evaluating with ``eval_cfg`` would give:
    the same step and :func:`nfvi.vae.evaluate.same_settings`."""
    return results.get("steps") == step and same_settings(results, eval_cfg, out)


def train(cfg: DictConfig, out: str | Path, device: torch.device | None = None) -> dict:
    """Train (or resume) the run in ``out``; evaluate it at the end (``eval.at_end``). Returns ``results.json``'s dict.

    Without evaluation the dict holds the training summary only (``results.json`` is not written).
    """
    with Run(out, command="train", cfg=cfg, record=RUN_CONFIG) as run:
        return _train(cfg, run, device or run.device)


def _checked_state(cfg: DictConfig, run: Run) -> dict:
    """The checkpoint of the run folder if ``cfg`` may continue it (one-line refusals naming the keys otherwise):
    of this folder's run (:func:`nfvi.vae.checkpoint.check_identity`) and with the same settings."""
    out = run.out
    state = load_checkpoint(out / CHECKPOINT)
    check_identity(out / CHECKPOINT, state, run.owner()[1], run.record_id())
    current = OmegaConf.to_container(cfg, resolve=True)
    diff = config_diff(state["config"], current)
    if diff:
        saved = OmegaConf.create(state["config"])
        shown = ", ".join(f"{k} ({OmegaConf.select(saved, k)} -> {OmegaConf.select(cfg, k)})" for k in diff[:8])
        more = f" and {len(diff) - 8} more" if len(diff) > 8 else ""
        raise RunRefused(
            f"cannot resume {out}: the config differs from the checkpoint's in {shown}{more}; "
            f"restore those values, use another folder, or overwrite=true to start afresh"
        )
    saved_t = state["config"]["trainer"]
    if saved_t["lr_decay"] != "none" and saved_t["steps"] != cfg.trainer.steps:
        raise RunRefused(
            f"cannot resume {out} with trainer.steps={cfg.trainer.steps}: its learning rate decays over "
            f"trainer.steps={saved_t['steps']} (trainer.lr_decay={saved_t['lr_decay']})"
        )
    if int(state["step"]) > cfg.trainer.steps:
        raise RunRefused(
            f"cannot resume {out} with trainer.steps={cfg.trainer.steps}: the checkpoint is at step {state['step']}"
        )
    return state


def _train(cfg: DictConfig, run: Run, device: torch.device) -> dict:
    out = run.out
    run.refuse_other_command()  # another command's run: refused, or removed with overwrite=true
    if cfg.overwrite and run.owner()[0] is not None:
        run.admit()
        log.info("overwrite=true: starting %s afresh", out)
        run.clear()
    state = None
    if (out / CHECKPOINT).is_file():
        if not cfg.resume:
            raise RunRefused(
                f"{out} already holds a checkpoint; pass resume=true to continue it, overwrite=true to start afresh, "
                f"or use a new run directory"
            )
        state = _checked_state(cfg, run)
    if state is not None and _trained(cfg.trainer, state) and (out / "results.json").is_file():
        done = run.read_results() or {}
        if not cfg.eval.at_end or _same_evaluation(done, cfg.eval, int(state["step"]), out):
            log.info("%s is complete (step %s); nothing to do", out, state["step"])
            return done
    run.admit()  # the checks passed: this launch writes into the folder
    if state is None:
        if cfg.resume:
            log.info("resume=true: %s holds no checkpoint yet; starting a new run there", out)
        run.save_record()  # the first launch's config; a resumed run keeps it (.hydra/ records the latest launch)

    trainer = Trainer(cfg, out, device, metrics=run.open_metrics())
    trainer.run_id = run.run_id or run.record_id()
    if state is not None:
        trainer.restore(state)
        del state
        log.info("resuming %s at step %d of %d", out, trainer.step, cfg.trainer.steps)
    else:
        log.info("training %s: %d updates -> %s", _label(cfg), cfg.trainer.steps, out)
    if not _trained(cfg.trainer, {"step": trainer.step, "best": trainer.best}):
        trainer.fit()
    summary = {
        "task": "vae",
        "run_dir": str(out),
        "steps": trainer.step,
        "stopped_early": trainer.step < cfg.trainer.steps,
        "train_time_s": round(trainer.train_time, 3),
        "val_neg_elbo_best": trainer.best.get("val_neg_elbo"),
        "best_step": trainer.best.get("step"),
    }
    log.info("trained %s: %d updates in %.1f s, best val -ELBO %s", out, trainer.step, trainer.train_time,
             summary["val_neg_elbo_best"])  # fmt: skip
    if not cfg.eval.at_end:
        return summary
    data = trainer.data
    del trainer
    try:
        results = evaluate_run(out, cfg.eval, cfg.paths.data_dir, device, data=data, run=run, headline=True)
    except KeyboardInterrupt:
        log.warning(
            "interrupted during the test evaluation; training is complete and saved; evaluate with: "
            "nfvi evaluate run_dir=%s",
            shlex.quote(str(out)),
        )
        raise SystemExit(130) from None
    log.info("%s: %s", out, summary_line(results))
    return results


def _label(cfg) -> str:
    return f"{cfg.dataset.name} {cfg.model.name} {cfg.flow.kind} K={cfg.flow.length} seed {cfg.seed}"


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
