"""``nfvi evaluate run_dir=...``: test-set -ELBO, -ln p(x) and KL(q || p(z|x)) of trained runs, into ``results.json``.

::

    nfvi evaluate run_dir=outputs/train/2025-01-01_12-00-00-000000                    # one run
    nfvi evaluate run_dir=outputs/multirun/train/2025-01-01_12-00-00 eval.num_samples=200   # every run below

The estimates (per test image, in nats; :mod:`nfvi.evaluate` holds the estimators):

- ``test_neg_elbo``: ``-ELBO = E_q[log q_K(z_K|x) - log p(x, z_K)]``, the paper's bound F(x), by Monte
  Carlo with ``eval.elbo_samples`` draws per image;
- ``test_nll``: ``-ln p(x)`` by importance sampling with ``q_K`` as the proposal and
  ``eval.num_samples`` draws per image (default 5000; the paper's Table 2 used 200), a stochastic
  upper bound on the true ``-ln p(x)`` that tightens as S grows;
- ``test_kl = test_neg_elbo - test_nll``: the estimate of ``KL(q_K(z|x) || p(z|x))`` (Fig. 4b).

All three are means over the test images (``eval.max_images > 0``: a fixed random subset of that
many, seeded by ``eval.seed``; the ``test_images`` field says which), with standard errors over
images. The weights are those of ``best.pt`` (the best validation bound) when ``eval.checkpoint=best``
and the run has one, else the last checkpoint; ``checkpoint`` and ``checkpoint_step`` say which.

Each evaluation rewrites ``<run>/results.json`` (what ``nfvi report`` reads) and keeps a copy under
``<run>/evaluations/``. Evaluation draws from its own seeded random stream (``eval.seed``), so the
same checkpoint and settings give the same numbers on the CPU.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from nfvi.data import load_dataset
from nfvi.errors import NfviError
from nfvi.runs import run_metadata, select_device, write_json
from nfvi.vae.checkpoint import BEST, CHECKPOINT, load_checkpoint, model_from_state
from nfvi.vae.config import EvalConfig, EvaluateConfig

__all__ = ["EvalConfig", "EvaluateConfig", "UNITS", "evaluate_run", "find_runs", "summary_line", "test_subset", "run"]


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


def evaluate_run(
    run_path: str | Path,
    eval_cfg,
    data_dir: str | Path,
    device: torch.device | str = "cpu",
    data=None,
    started: float | None = None,
) -> dict:
    """Evaluate the run in ``run_path`` on its test split; write and return its ``results.json`` dict.

    ``data``: the run's :class:`~nfvi.data.ImageData` if already loaded (else loaded from ``data_dir``).
    """
    from nfvi.estimators import elbo, log_marginal_likelihood, nats_to_bits_per_dim
    from nfvi.vae.likelihoods import SPECS

    started = time.time() if started is None else started
    run_path = Path(run_path)
    last = load_checkpoint(run_path / CHECKPOINT)
    use_best = eval_cfg.checkpoint == "best" and (run_path / BEST).is_file()
    weights = load_checkpoint(run_path / BEST) if use_best else last
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
    if not (torch.isfinite(neg_elbo).all() and torch.isfinite(nll).all()):
        raise NfviError(f"the test estimates of {run_path} are not finite (NaN/inf): the weights may have diverged")
    (neg_elbo_m, neg_elbo_se), (nll_m, nll_se), (kl_m, kl_se) = map(_mean_se, (neg_elbo, nll, neg_elbo - nll))
    likelihood = cfg.model.likelihood
    discrete = SPECS[likelihood].discrete if likelihood in SPECS else True
    num_dims = int(data.num_dims) if hasattr(data, "num_dims") else int(x[0].numel())

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
        "steps": int(last["step"]),
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
    write_json(run_path / "results.json", results)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    write_json(run_path / "evaluations" / f"{stamp}_S{eval_cfg.num_samples}_n{len(x)}.json", results)
    return results


def summary_line(res: dict) -> str:
    """One line of a results dict: the three test numbers and how they were estimated."""
    return (
        f"test -ELBO {res['test_neg_elbo']:.2f}, -ln p(x) {res['test_nll']:.2f} "
        f"(S={res['num_importance_samples']}, {res['num_test_images']} images), KL {res['test_kl']:.2f} nats"
    )


def find_runs(root: str | Path) -> list[Path]:
    """``root`` itself if it holds a checkpoint, else every folder below it that does (sorted)."""
    root = Path(root)
    if not root.exists():
        raise NfviError(f"run_dir={str(root)!r} does not exist")
    if (root / CHECKPOINT).is_file():
        return [root]
    runs = sorted(p.parent for p in root.rglob(CHECKPOINT))
    if not runs:
        raise NfviError(f"run_dir={str(root)!r} holds no {CHECKPOINT} (nor does any folder below it)")
    return runs


def run(cfg: DictConfig) -> dict:
    """``nfvi evaluate``: evaluate every run found under ``cfg.run_dir``; returns ``{run_dir: results}``."""
    started = time.time()
    device = select_device(cfg.device)
    out = {}
    runs = find_runs(cfg.run_dir)
    cache: dict[str, object] = {}
    for path in runs:
        state_cfg = OmegaConf.create(load_checkpoint(path / CHECKPOINT)["config"])
        key = OmegaConf.to_yaml(state_cfg.dataset)
        if key not in cache:
            cache = {key: load_dataset(state_cfg.dataset, root=cfg.paths.data_dir)}  # keep one dataset in memory
        res = evaluate_run(path, cfg.eval, cfg.paths.data_dir, device, data=cache[key], started=started)
        print(f"nfvi evaluate: {path}: {summary_line(res)}")
        out[str(path)] = res
        started = time.time()
    return out
