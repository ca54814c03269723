"""``nfvi cde``: conditional density estimation p(y | x) on the DDN benchmark's UCI sets.

One run = one dataset and one model, fitted once per seed (a fresh random 70/30 split each),
then the test NLL's mean and std over seeds::

    nfvi cde dataset=concrete flow=radial flow.length=4
    nfvi cde dataset=energy model=gaussian
    nfvi cde -m dataset=fish,concrete flow=planar,radial

Writes ``metrics.csv`` (per seed and epoch) and a flat ``results.json`` into the run directory.

``dataset`` and ``model`` are plain strings in the config, but they are offered as Hydra config
groups whose options (``nfvi/conf/cde/{dataset,model}/*.yaml``, package ``_global_``) just set the
string; ``nfvi cde`` has its own config root, so ``nfvi train``'s image datasets are not among them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from nfvi.cde.data import BENCHMARK_NF_NLL, DATASETS, Table, load_dataset, split_and_standardize
from nfvi.cde.fit import FitResult, fit
from nfvi.cde.model import ACTIVATIONS, MODELS, build_model, model_label
from nfvi.config import FlowConfig, OptimConfig, PathsConfig, select_device, store
from nfvi.errors import NfviError, check_choice, check_range
from nfvi.runs import MetricsLog, run_dir, run_metadata, seed_everything, write_json

__all__ = ["CDEConfig", "run", "run_cde"]


@dataclass
class CDEConfig:
    """Schema of ``nfvi/conf/cde/cde.yaml`` (``base_cde``)."""

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


store("base_cde", CDEConfig)


def validate(cfg) -> None:
    """One-line errors for values the schema's types cannot catch."""
    check_choice("dataset", cfg.dataset, DATASETS)
    check_choice("model", cfg.model, MODELS)
    check_choice("activation", cfg.activation, ACTIVATIONS)
    if not cfg.seeds:
        raise NfviError("seeds=[] is not allowed; give at least one seed, e.g. seeds=[0,1,2,3,4]")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise NfviError(f"seeds={list(cfg.seeds)} repeats a seed; give distinct seeds")
    for h in cfg.hidden:
        check_range("hidden", h, low=1, kind="layer widths >= 1")
    check_range("flow.length", cfg.flow.length, low=0, kind="a number of layers")
    check_range("threads", cfg.threads, low=0, kind="a number of threads (0: torch's default)")
    check_range("grad_clip", cfg.grad_clip, low=0.0, kind="a gradient-norm bound (0: off)")
    check_range("lr_decay_patience", cfg.lr_decay_patience, low=0, kind="a number of epochs (0: off)")


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
    started = time.time()
    validate(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = select_device(cfg.device)
    if device.type != "cpu":
        raise NfviError(f"device={cfg.device!r}: nfvi cde runs on the CPU only (its models are tiny); use device=cpu")
    out = run_dir() if out_dir is None else Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.csv", "results.json"):  # a rerun into the same folder starts afresh; if it fails,
        (out / stale).unlink(missing_ok=True)  # no earlier results.json is left to pass for its numbers
    log = MetricsLog(out / "metrics.csv")
    table = load_dataset(
        cfg.dataset, cfg.paths.data_dir, cfg.data_file, cfg.download, cfg.verify, cfg.data_url, cfg.synthetic_size
    )
    info = _describe(cfg, table)
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
            log=log,
            desc=f"{cfg.dataset} {info['model_name']} seed {seed}",
        )
        row = {"seed": int(seed), **{k: _round(v) for k, v in asdict(result).items()}}
        if table.true_log_prob is not None:  # the true density on the same test points
            i = split.test_index
            row["test_nll_true_density"] = _round(-float(table.true_log_prob(table.x[i], table.y[i]).mean()))
        per_seed.append(row)
        print(
            f"nfvi cde: {cfg.dataset} {info['model_name']} seed {seed}: test NLL {result.test_nll:.4f} nats "
            f"(standardised {result.test_nll_standardized:.4f}), best epoch {result.best_epoch}/{result.epochs}"
        )
    results = _aggregate(cfg, table, info, per_seed, started, device)
    write_json(out / "results.json", results)
    print(
        f"nfvi cde: {cfg.dataset} {info['model_name']}: test NLL {results['test_nll_mean']:.3f} "
        f"± {results['test_nll_std']:.3f} nats over {len(per_seed)} seeds; wrote {out / 'results.json'}"
    )
    return results


def _round(v):
    return round(float(v), 6) if isinstance(v, float) else v


def _mean_std(values) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return round(float(a.mean()), 6), round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 6)


def _aggregate(cfg, table: Table, info: dict, per_seed: list[dict], started: float, device) -> dict:
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
        "lr_decay_patience": cfg.lr_decay_patience,
        "data_source": table.source,
        "data_file_sha256": table.file_sha256,
        "data_table_sha256": table.table_sha256,
        "per_seed": per_seed,
        **run_metadata(device, started),
    }


def run(cfg: DictConfig) -> dict:
    """Hydra task for ``nfvi cde``."""
    return run_cde(cfg)
