"""``nfvi evaluate run_dir=...``: test-set -ELBO, -ln p(x) and KL(q || p(z|x)) of trained runs, into ``results.json``.

::

    nfvi evaluate run_dir=outputs/train/2025-01-01_12-00-00-000000                    # one run
    nfvi evaluate run_dir=outputs/multirun/train/2025-01-01_12-00-00 eval.num_samples=5000  # the runs one level below

The estimates (per test image, in nats; :mod:`nfvi.evaluate` holds the estimators):

- ``test_neg_elbo``: ``-ELBO = E_q[log q_K(z_K|x) - log p(x, z_K)]``, the paper's bound F(x), by Monte
  Carlo with ``eval.elbo_samples`` draws per image;
- ``test_nll``: ``-ln p(x)`` by importance sampling with ``q_K`` as the proposal and
  ``eval.num_samples`` draws per image (default 200, the paper's Table 2 S; ``eval.num_samples=5000``), a stochastic
  upper bound on the true ``-ln p(x)`` that tightens as S grows;
- ``test_kl = test_neg_elbo - test_nll``: the estimate of ``KL(q_K(z|x) || p(z|x))`` (Fig. 4b).

All three are means over the test images (``eval.max_images > 0``: a fixed random subset of that
many, seeded by ``eval.seed``; the ``test_images`` field says which), with standard errors over
images. The weights are those of ``best.pt`` (the best validation bound) when ``eval.checkpoint=best``
and the run has one, else the last checkpoint; ``checkpoint`` and ``checkpoint_step`` say which.

Each evaluation is written to ``<run>/evaluations/<name>.json`` (the name from its settings, e.g.
``S200_n1000_best.json``). It also becomes ``<run>/results.json`` (the run's headline numbers) when the run has
none yet, when it has the same settings as the run's results.json, or with ``eval.update_results=true``;
otherwise results.json is left as it was, and ``nfvi report`` shows the evaluation as a row of its own setting
(e.g. ``num_importance_samples=5000``). A run that cannot be evaluated (in use by a run in training, a bad
checkpoint) is named in one line, the others are evaluated, and the command fails at the end. Evaluation draws
from its own seeded random stream (``eval.seed``), so the same checkpoint and settings give the same numbers on
the CPU.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from nfvi.data import load_dataset
from nfvi.errors import NfviError
from nfvi.runs import DEFAULT_THREADS, Run, apply_threads, console_logging, run_metadata, select_device
from nfvi.training import check_divergence, early_stop_due, flow_options
from nfvi.vae.checkpoint import BEST, CHECKPOINT, check_identity, flatten, load_checkpoint, model_from_state
from nfvi.vae.config import EvalConfig, EvaluateConfig

__all__ = [
    "EvalConfig",
    "EvaluateConfig",
    "UNITS",
    "evaluate_run",
    "evaluation_name",
    "find_runs",
    "same_settings",
    "summary_line",
    "test_subset",
    "run",
]
log = logging.getLogger("nfvi.evaluate")
#: the config keys that must agree between best.pt and checkpoint.pt (the weights and the labels of the results)
MODEL_KEYS = ("flow.", "model.", "dataset.")
REQUIRED = ("test_neg_elbo", "test_nll", "test_kl")


UNITS = {
    "test_neg_elbo": "nats",
    "test_neg_elbo_se": "nats",
    "test_nll": "nats",
    "test_nll_se": "nats",
    "test_kl": "nats",
    "test_kl_se": "nats",
    "test_bpd": "bits/dim",
    "test_neg_elbo_bpd": "bits/dim",
    "num_dims": "values per image",
    "val_neg_elbo_best": "nats",
    "train_time_s": "seconds",
    "eval_time_s": "seconds",
    "wall_time_s": "seconds",
    "steps": "parameter updates",
    "num_importance_samples": "samples per image",
    "num_elbo_samples": "samples per image",
    "num_test_images": "images",
}


def test_subset(num_images: int, max_images: int, seed: int) -> tuple[torch.Tensor | None, str]:
    """Indices (sorted) of a fixed random subset of the test split, or None for all; and a description."""
    if max_images <= 0 or max_images >= num_images:
        return None, "all"
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(num_images, generator=gen)[:max_images].sort().values
    return idx, f"random subset of {max_images} of {num_images} (eval.seed={seed})"


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    n = values.numel()
    se = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return float(values.mean()), se


def same_settings(results: dict, eval_cfg, out: Path) -> bool:
    """Whether ``results`` (a run's results.json) was evaluated with the settings of ``eval_cfg``.

    A ``best`` request is met by ``last`` weights only when the run has no ``best.pt`` (evaluation falls back
    to them); ``eval.max_images=0`` is met only by an evaluation on the whole test split.
    """
    checkpoint = results.get("checkpoint")
    same_weights = checkpoint == eval_cfg.checkpoint or (
        eval_cfg.checkpoint == "best" and checkpoint == "last" and not (Path(out) / BEST).is_file()
    )
    if eval_cfg.max_images == 0:
        same_images = results.get("test_images") == "all"
    else:  # a subset of that size, or the whole split when it has no more images than that
        n = results.get("num_test_images")
        same_images = n == eval_cfg.max_images or (results.get("test_images") == "all" and n <= eval_cfg.max_images)
    return (
        results.get("num_importance_samples") == eval_cfg.num_samples
        and results.get("num_elbo_samples") == eval_cfg.elbo_samples
        and results.get("eval_seed") == eval_cfg.seed
        and same_weights
        and same_images
    )


def evaluation_name(eval_cfg, num_images: int | str, checkpoint: str) -> str:
    """``S<num_samples>_n<images>_<checkpoint>`` (+ ``_E<elbo_samples>``, ``_seed<seed>`` when not the defaults)."""
    name = f"S{eval_cfg.num_samples}_n{num_images}_{checkpoint}"
    if eval_cfg.elbo_samples != EvalConfig.elbo_samples:
        name += f"_E{eval_cfg.elbo_samples}"
    if eval_cfg.seed != EvalConfig.seed:
        name += f"_seed{eval_cfg.seed}"
    return name


def _weights(run_path: Path, eval_cfg, run: Run) -> tuple[dict, dict, bool]:
    """``(checkpoint.pt, the weights to evaluate, use_best)``; refuses weights whose config disagrees with the
    checkpoint's on the flow, model or dataset (the labels of the results come from checkpoint.pt), and weights
    that are not of the folder's run (:func:`nfvi.vae.checkpoint.check_identity`: run id and config)."""
    last = load_checkpoint(run_path / CHECKPOINT)
    use_best = eval_cfg.checkpoint == "best" and (run_path / BEST).is_file()
    record, record_id = run.owner()[1], run.record_id()
    if not use_best:
        check_identity(run_path / CHECKPOINT, last, record, record_id)
        return last, last, False
    best = load_checkpoint(run_path / BEST)
    a, b = flatten(last["config"]), flatten(best.get("config") or {})
    differ = [k for k in sorted(set(a) | set(b)) if k.startswith(MODEL_KEYS) and a.get(k) != b.get(k)]
    if differ:
        shown = ", ".join(f"{k} ({b.get(k)} vs {a.get(k)})" for k in differ[:6])
        raise NfviError(
            f"{run_path / BEST} and {run_path / CHECKPOINT} disagree on {shown}: they are not of one run; "
            f"evaluate with eval.checkpoint=last or remove the stray file"
        )
    for path, state in ((run_path / CHECKPOINT, last), (run_path / BEST, best)):
        check_identity(path, state, record, record_id)
    return last, best, True


def evaluate_run(
    run_path: str | Path,
    eval_cfg,
    data_dir: str | Path,
    device: torch.device | str = "cpu",
    data=None,
    started: float | None = None,
    run: Run | None = None,
    headline: bool = False,
) -> dict:
    """Evaluate the run in ``run_path`` on its test split; write and return the results dict.

    ``data``: the run's :class:`~nfvi.data.ImageData` if already loaded (else loaded from ``data_dir``).
    ``run``: the :class:`~nfvi.runs.Run` that holds the folder (default: one of ``nfvi evaluate`` for this call).
    The results go to ``evaluations/<name>.json`` and, when ``headline`` (the end of ``nfvi train``), the run has
    no results.json yet, it has the same settings or ``eval.update_results=true``, to ``results.json``.
    """
    if run is None:
        with Run(run_path, command="evaluate", claim=False) as own:
            return evaluate_run(run_path, eval_cfg, data_dir, device, data, started, own, headline)
    from nfvi.estimators import elbo, log_marginal_likelihood, nats_to_bits_per_dim
    from nfvi.vae.likelihoods import SPECS

    started = time.time() if started is None else started
    run_path = Path(run_path)
    last, weights, use_best = _weights(run_path, eval_cfg, run)
    cfg = OmegaConf.create(last["config"])
    device = torch.device(device)
    model = model_from_state(weights, device)
    if data is None:
        data = load_dataset(cfg.dataset, root=data_dir)
    x = data.test
    idx, subset = test_subset(len(x), eval_cfg.max_images, eval_cfg.seed)
    if idx is not None:
        x = x[idx]
    if len(x) == 0:
        raise NfviError(f"dataset={cfg.dataset.name} has no test images to evaluate")

    log.info("evaluating %s (%s weights, step %d): %d test images, S=%d", run_path, "best" if use_best else "last",
             int(weights["step"]), len(x), eval_cfg.num_samples)  # fmt: skip
    t0 = time.time()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(eval_cfg.seed))
        if device.type == "cuda":
            torch.cuda.manual_seed(int(eval_cfg.seed))
        log_px_z = elbo(model, x, num_samples=eval_cfg.elbo_samples, batch_size=eval_cfg.batch_size)
        log_px = log_marginal_likelihood(
            model, x, num_samples=eval_cfg.num_samples, batch_size=eval_cfg.batch_size, progress=eval_cfg.progress
        )
    eval_time = time.time() - t0
    neg_elbo, nll = -log_px_z, -log_px
    for name, values in (("test_neg_elbo", neg_elbo), ("test_nll", nll)):
        if not torch.isfinite(values).all():
            raise NfviError(
                f"the {name} of {run_path} is not finite (NaN/inf): the weights may have diverged; nothing was written"
            )
    (neg_elbo_m, neg_elbo_se), (nll_m, nll_se), (kl_m, kl_se) = map(_mean_se, (neg_elbo, nll, neg_elbo - nll))
    likelihood = cfg.model.likelihood
    discrete = SPECS[likelihood].discrete if likelihood in SPECS else True
    num_dims = int(data.num_dims) if hasattr(data, "num_dims") else int(x[0].numel())
    # the divergence guard on the headline: against the training -ELBO of the run's first update (nfvi.training)
    reference = weights.get("reference_neg_elbo", last.get("reference_neg_elbo"))
    check_divergence(neg_elbo_m, reference, int(x[0].numel()), int(weights["step"]), "nothing was written",
                     what=f"the test -ELBO of {run_path}")  # fmt: skip

    best = last.get("best") or {}
    results = {
        "task": "vae",
        "dataset": cfg.dataset.name,
        "binarize": cfg.dataset.binarize,
        "model": cfg.model.name,
        "latent_dim": cfg.model.latent_dim,
        "likelihood": likelihood,
        "data_kind": getattr(data, "kind", "binary"),
        "num_dims": num_dims,
        "flow": cfg.flow.kind,
        "flow_length": cfg.flow.length,
        **{f"flow_{key}": value for key, value in flow_options(cfg.flow).items()},
        "flow_params": sum(p.numel() for p in model.flow.parameters()),  # the flow with its amortization head
        "num_params": sum(p.numel() for p in model.parameters()),
        "steps": int(last["step"]),
        "stopped_early": _stopped_early(cfg.trainer, last),
        "seed": cfg.seed,
        "annealing": cfg.trainer.annealing,
        "anneal_steps": cfg.trainer.anneal_steps,
        "optim": cfg.optim.name,
        "lr": cfg.optim.lr,
        "flow_lr_factor": cfg.optim.get("flow_lr_factor", 1.0),
        "lr_decay": cfg.trainer.lr_decay,
        "batch_size": cfg.trainer.batch_size,
        "grad_clip": cfg.trainer.grad_clip,
        "test_neg_elbo": neg_elbo_m,
        "test_neg_elbo_se": neg_elbo_se,
        "test_nll": nll_m,
        "test_nll_se": nll_se,
        "test_kl": kl_m,
        "test_kl_se": kl_se,
        # bits per dimension only where -ln p(x) is a discrete NLL (not for a density such as logit-normal)
        "test_bpd": nats_to_bits_per_dim(nll_m, num_dims) if discrete else None,
        "test_neg_elbo_bpd": nats_to_bits_per_dim(neg_elbo_m, num_dims) if discrete else None,
        "val_neg_elbo_best": best.get("val_neg_elbo"),
        "best_step": best.get("step"),
        "checkpoint": "best" if use_best else "last",
        "checkpoint_step": int(weights["step"]),
        "num_importance_samples": int(eval_cfg.num_samples),
        "num_elbo_samples": int(eval_cfg.elbo_samples),
        "num_test_images": int(len(x)),
        "test_images": subset,
        "eval_seed": int(eval_cfg.seed),
        "train_time_s": round(float(last.get("train_time_s", float("nan"))), 3),
        "eval_time_s": round(eval_time, 3),
        "finished": int(last["step"]) >= int(cfg.trainer.steps),
        "data_source": data.source,
        "units": UNITS,
    }
    if data.note:
        results["data_note"] = data.note
    results |= run_metadata(device, started)
    results["config"] = {**OmegaConf.to_container(cfg, resolve=True), "eval": OmegaConf.to_container(
        OmegaConf.structured(eval_cfg) if not OmegaConf.is_config(eval_cfg) else eval_cfg, resolve=True)}  # fmt: skip
    name = evaluation_name(eval_cfg, len(x) if idx is not None else "all", results["checkpoint"])
    results = run.write_results(results, required=REQUIRED, path=run_path / "evaluations" / f"{name}.json")
    old = run.read_results()
    if headline or old is None or same_settings(old, eval_cfg, run_path) or eval_cfg.get("update_results", False):
        run.write_results(results, required=REQUIRED)
    else:
        log.info("%s keeps its results (other settings); this evaluation is in evaluations/%s.json", run_path, name)
    return results


def _stopped_early(trainer_cfg, state: dict) -> bool:
    """Whether the checkpoint ``state`` ended its training by early stopping (``trainer.patience``)."""
    if not trainer_cfg.get("patience", 0) or int(state["step"]) >= trainer_cfg.steps:
        return False
    return early_stop_due(int(state["step"]), (state.get("best") or {}).get("step"), trainer_cfg)


def summary_line(res: dict) -> str:
    """One line of a results dict: the three test numbers and how they were estimated."""
    return (
        f"test -ELBO {res['test_neg_elbo']:.2f}, -ln p(x) {res['test_nll']:.2f} "
        f"(S={res['num_importance_samples']}, {res['num_test_images']} images), KL {res['test_kl']:.2f} nats"
    )


def find_runs(root: str | Path) -> list[Path]:
    """``root`` itself if it holds a checkpoint, else the folders ONE level below it that do (a sweep; sorted)."""
    if not str(root).strip():
        raise NfviError("run_dir is empty; name a run folder (or a sweep folder whose runs lie one level below it)")
    root = Path(root)
    if not root.is_dir():
        raise NfviError(f"run_dir={str(root)!r} does not exist" if not root.exists() else f"run_dir={root} is a file")
    if (root / CHECKPOINT).is_file():
        return [root]
    runs = sorted(p for p in root.iterdir() if (p / CHECKPOINT).is_file())
    if not runs:
        raise NfviError(f"run_dir={str(root)!r} holds no {CHECKPOINT} (nor does any folder one level below it)")
    return runs


def run(cfg: DictConfig) -> dict:
    """``nfvi evaluate``: evaluate every run found by :func:`find_runs`; returns ``{run_dir: results}``."""
    runs = find_runs(cfg.run_dir)
    apply_threads(cfg.get("threads", DEFAULT_THREADS))
    device = select_device(cfg.device)
    with console_logging():
        return _evaluate_runs(cfg, runs, device)


def _evaluate_runs(cfg: DictConfig, runs: list[Path], device: torch.device) -> dict:
    """Evaluate each run; a run that cannot be evaluated (in use, a bad checkpoint, ...) is reported in one line and
    the others go on, then one :class:`NfviError` names the runs left out (``nfvi evaluate`` exits non-zero). A
    single run's error is raised as it is."""
    log.info("evaluating %d run(s): %s", len(runs), ", ".join(str(p) for p in runs))
    out = {}
    cache: dict[str, object] = {}
    failed: list[str] = []
    for path in runs:
        try:
            out[str(path)] = _evaluate_one(cfg, path, device, cache)
        except Exception as exc:  # KeyboardInterrupt ends the whole command
            if len(runs) == 1:
                raise
            from nfvi.cli import one_line

            what = one_line(exc) if isinstance(exc, NfviError) else f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.error("not evaluated: %s: %s", path, what)
            failed.append(str(path))
    if failed:
        raise NfviError(
            f"{len(failed)} of {len(runs)} runs were not evaluated (each named above): {', '.join(failed)}; the "
            f"others were"
        )
    return out


def _evaluate_one(cfg: DictConfig, path: Path, device: torch.device, cache: dict) -> dict:
    """Evaluate the run in ``path`` under its lock (a run in use is refused: :class:`~nfvi.errors.RunRefused`)."""
    with Run(path, command="evaluate", claim=False) as evaluation:
        done = _existing(cfg, path)
        if done is not None:
            return done
        state_cfg = OmegaConf.create(load_checkpoint(path / CHECKPOINT)["config"])
        key = OmegaConf.to_yaml(state_cfg.dataset)
        if key not in cache:
            cache.clear()  # keep one dataset in memory
            cache[key] = load_dataset(state_cfg.dataset, root=cfg.paths.data_dir)
        res = evaluate_run(path, cfg.eval, cfg.paths.data_dir, device, data=cache[key], run=evaluation)
        log.info("%s: %s", path, summary_line(res))
        return res


def _existing(cfg, path: Path) -> dict | None:
    """An evaluation of ``path`` with these settings (``evaluations/<name>.json``): returned with ``resume=true``,
    replaced with ``overwrite=true``, else refused in one line (nothing is overwritten silently)."""
    import json

    checkpoint = "best" if cfg.eval.checkpoint == "best" and (path / BEST).is_file() else "last"
    matches = sorted((path / "evaluations").glob(f"S{cfg.eval.num_samples}_n*_{checkpoint}*.json"))
    step = int(load_checkpoint(path / CHECKPOINT)["step"]) if matches else None
    for file in matches:
        try:
            old = json.loads(file.read_text())
        except ValueError:
            continue
        if not same_settings(old, cfg.eval, path) or old.get("steps") != step:
            continue
        if cfg.overwrite:
            return None
        if cfg.resume:
            log.info("%s: evaluations/%s exists (resume=true); nothing to do", path, file.name)
            return old
        raise NfviError(
            f"{file} already holds this evaluation; resume=true returns it as is, overwrite=true evaluates again"
        )
    return None
