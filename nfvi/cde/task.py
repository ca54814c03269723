"""``nfvi cde``: conditional density estimation p(y | x) on the DDN benchmark's UCI sets.

One run = one dataset and one model, fitted once per seed (a fresh random 70/30 split each),
then the test NLL's mean and std over seeds::

    nfvi cde dataset=concrete flow=radial flow.length=4
    nfvi cde dataset=energy model=gaussian
    nfvi cde -m dataset=fish,concrete flow=planar,radial

Writes ``metrics.csv`` (per seed and epoch) and a flat ``results.json`` into the run directory.

The schema is :class:`nfvi.cde.config.CDEConfig`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from nfvi.cde.config import CDEConfig
from nfvi.cde.data import BENCHMARK_NF_NLL, Table, load_dataset, split_and_standardize
from nfvi.cde.fit import FitResult, fit
from nfvi.cde.model import build_model, model_label
from nfvi.errors import NfviError
from nfvi.runs import Run, run_dir, seed_everything, select_device

__all__ = ["CDEConfig", "run", "run_cde"]
log = logging.getLogger("nfvi.cde")


def _describe(cfg, table: Table) -> dict:
    flow_kind = cfg.flow.kind if cfg.model == "flow" else "none"
    flow_length = cfg.flow.length if flow_kind != "none" else 0
    if flow_length == 0:
        flow_kind = "none"
    return {
        "dataset": cfg.dataset,
        "model": cfg.model,
        "model_name": model_label(cfg.model, flow_kind, flow_length, cfg.mdn_components),
        "flow": flow_kind,
        "flow_length": flow_length,
        "mdn_components": cfg.mdn_components if cfg.model == "mdn" else None,
        "x_dim": int(table.x.shape[1]),
        "y_dim": int(table.y.shape[1]),
        "n_rows": int(len(table.y)),
    }


def run_cde(cfg, out_dir=None) -> dict:
    """Fit ``cfg.model`` on ``cfg.dataset`` once per seed; write and return the results dict."""
    if select_device(cfg.device).type != "cpu":
        raise NfviError(f"device={cfg.device!r}: nfvi cde runs on the CPU only (its models are tiny); use device=cpu")
    with Run(run_dir() if out_dir is None else Path(out_dir), command="cde", cfg=cfg) as run:
        done = run.begin()  # a re-run starts afresh: no earlier results.json is left to pass for its numbers
        return done if done is not None else _fit_seeds(cfg, run)


def _fit_seeds(cfg, run: Run) -> dict:
    out = run.out
    table = load_dataset(
        cfg.dataset, cfg.paths.data_dir, cfg.data_file, cfg.download, cfg.verify, cfg.data_url, cfg.synthetic_size
    )
    info = _describe(cfg, table)
    _check_size(cfg, info)
    per_seed: list[dict] = []
    for seed in cfg.seeds:
        split = split_and_standardize(table, seed, cfg.test_fraction, cfg.val_fraction)
        seed_everything(seed)
        model = build_model(
            cfg.model,
            info["x_dim"],
            info["y_dim"],
            cfg.flow,
            list(cfg.hidden),
            cfg.activation,
            cfg.mdn_components,
            cfg.min_scale,
        )
        result: FitResult = fit(
            model,
            split,
            cfg.optim,
            batch_size=cfg.batch_size,
            max_epochs=cfg.max_epochs,
            patience=cfg.patience,
            grad_clip=cfg.grad_clip,
            lr_decay_patience=cfg.lr_decay_patience,
            seed=seed,
            log=run.metrics,
            desc=f"{cfg.dataset} {info['model_name']} seed {seed}",
            precision=cfg.precision,
        )
        row = {"seed": int(seed), **{k: _round(v) for k, v in asdict(result).items()}}
        if table.true_log_prob is not None:  # the true density on the same test points
            i = split.test_index
            row["test_nll_true_density"] = _round(-float(table.true_log_prob(table.x[i], table.y[i]).mean()))
        per_seed.append(row)
        log.info(
            "%s %s seed %s: test NLL %.4f nats (standardised %.4f), best epoch %d/%d",
            *(cfg.dataset, info["model_name"], seed, result.test_nll, result.test_nll_standardized),
            *(result.best_epoch, result.epochs),
        )
    results = run.write_results(_aggregate(cfg, table, info, per_seed), required=("test_nll_mean",))
    log.info(
        "%s %s: test NLL %.3f ± %.3f nats over %d seeds; wrote %s",
        *(cfg.dataset, info["model_name"], results["test_nll_mean"], results["test_nll_std"], len(per_seed)),
        out / "results.json",
    )
    return results


def _check_size(cfg, info: dict) -> None:
    """Refuse in one line a model and batch that need more memory than the machine has (:mod:`nfvi.sizes`)."""
    import torch

    from nfvi.sizes import check_memory, flow_size_keys, with_length

    x_dim, y_dim = info["x_dim"], info["y_dim"]
    batch = min(cfg.batch_size, info["n_rows"])

    def make(length: int):
        flow = with_length(cfg.flow, length)
        model = build_model(
            cfg.model, x_dim, y_dim, flow, list(cfg.hidden), cfg.activation, cfg.mdn_components, cfg.min_scale
        )
        return model, lambda n: model.log_prob(torch.zeros(n, y_dim), torch.zeros(n, x_dim))

    keys = {
        "model": {"hidden": list(cfg.hidden), **({"mdn_components": cfg.mdn_components} if cfg.model == "mdn" else {})},
        "flow": flow_size_keys(cfg.flow),
        "batch": {"batch_size": cfg.batch_size},
    }
    length = cfg.flow.length if cfg.model == "flow" else 0
    check_memory("cde", make, length, batch, keys, "cpu")


def _round(v):
    return round(float(v), 6) if isinstance(v, float) else v


def _mean_std(values) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return round(float(a.mean()), 6), round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 6)


def _aggregate(cfg, table: Table, info: dict, per_seed: list[dict]) -> dict:
    test_mean, test_std = _mean_std([r["test_nll"] for r in per_seed])
    std_mean, std_std = _mean_std([r["test_nll_standardized"] for r in per_seed])
    val_mean, _ = _mean_std([r["val_nll_standardized"] for r in per_seed])
    return {
        "task": "cde",
        **info,
        "test_nll_mean": test_mean,
        "test_nll_std": test_std,
        "test_nll_standardized_mean": std_mean,
        "test_nll_standardized_std": std_std,
        "val_nll_standardized_mean": val_mean,
        "log_std_y_mean": _mean_std([r["log_std_y"] for r in per_seed])[0],
        "true_nll": None if table.true_nll is None else round(table.true_nll, 6),
        "test_nll_true_density_mean": _mean_std([r["test_nll_true_density"] for r in per_seed])[0]
        if table.true_log_prob is not None
        else None,
        "benchmark_nf_nll": BENCHMARK_NF_NLL.get(cfg.dataset),
        "units": {
            "test_nll_mean": "nats per test point, original units of y; mean over seeds",
            "test_nll_std": "nats; sample std (ddof=1) over seeds",
            "test_nll_standardized_mean": "nats per test point, y standardised with training-split mean/std",
            "test_nll_standardized_std": "nats; sample std (ddof=1) over seeds",
            "log_std_y_mean": "sum_d log std(y_d) of the training split: original = standardised + this",
            "true_nll": "nats, original units (synthetic sets only): the true conditional entropy",
            "test_nll_true_density_mean": "nats (synthetic sets only): the true density's NLL on the same test points",
            "benchmark_nf_nll": "nats, the benchmark's NF row (DDN suite); units of y unconfirmed",
        },
        "seeds": [int(s) for s in cfg.seeds],
        "n_seeds": len(per_seed),
        "n_test_per_seed": int(round(cfg.test_fraction * info["n_rows"])),
        "test_fraction": cfg.test_fraction,
        "val_fraction": cfg.val_fraction,
        "hidden": list(cfg.hidden),
        "activation": cfg.activation,
        "min_scale": cfg.min_scale,
        "w_floor": cfg.flow.w_floor if info["flow"] == "planar" and cfg.flow.amortized else None,
        "optimizer": cfg.optim.name,
        "lr": cfg.optim.lr,
        "flow_lr_factor": cfg.optim.flow_lr_factor,
        "weight_decay": cfg.optim.weight_decay,
        "batch_size": cfg.batch_size,
        "max_epochs": cfg.max_epochs,
        "patience": cfg.patience,
        "grad_clip": cfg.grad_clip,
        "precision": cfg.precision,
        "lr_decay_patience": cfg.lr_decay_patience,
        "data_source": table.source,
        "data_file_sha256": table.file_sha256,
        "data_table_sha256": table.table_sha256,
        "per_seed": per_seed,
    }


def run(cfg: DictConfig) -> dict:
    """Hydra task for ``nfvi cde``."""
    return run_cde(cfg)
