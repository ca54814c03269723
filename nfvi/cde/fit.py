"""Fit one conditional density on one split: minibatch maximum likelihood, early stopping on validation NLL.

``fit(model, split, ...)`` trains on ``split.{x,y}_train``, evaluates the validation NLL after every
epoch (halving the learning rate after ``lr_decay_patience`` epochs without improvement, if > 0),
keeps the best parameters, stops after ``patience`` epochs without improvement, then
reports the test NLL of the best parameters, in standardised units and in the original units of y.

Divergence guard (:func:`nfvi.training.check_divergence`): the best validation NLL and the test NLL (standardised)
must not exceed the untrained model's validation NLL by more than 10 nats per dimension of y (or 10 times its
magnitude); a fit that does (e.g. ``optim.lr=10``) raises :class:`nfvi.errors.DivergenceError` instead of
reporting a number.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from nfvi.cde.data import Split
from nfvi.errors import check_range
from nfvi.precision import set_precision
from nfvi.runs import MetricsLog
from nfvi.training import check_divergence, check_finite, clip_gradients, optimizer_from_config

__all__ = ["FitResult", "fit", "mean_nll", "per_point_nll"]
logger = logging.getLogger("nfvi.cde")


@dataclass
class FitResult:
    """One seed's outcome. NLLs are means over points, in nats per data point."""

    test_nll: float  #: original units of y
    test_nll_standardized: float
    val_nll_standardized: float
    train_nll_standardized: float
    best_epoch: int
    epochs: int
    log_std_y: float
    wall_time_s: float


@torch.no_grad()
def per_point_nll(model: nn.Module, x: np.ndarray | Tensor, y: np.ndarray | Tensor, chunk: int = 4096) -> Tensor:
    """``-log p(y_i | x_i)`` for every row: ``(N,)`` (float64 for an exact mean)."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    parts = [-model.log_prob(y[i : i + chunk], x[i : i + chunk]) for i in range(0, len(y), chunk)]
    return torch.cat(parts).double()


def mean_nll(model: nn.Module, x, y) -> float:
    return float(per_point_nll(model, x, y).mean())


def fit(
    model: nn.Module,
    split: Split,
    optim_cfg,
    *,
    batch_size: int = 128,
    max_epochs: int = 500,
    patience: int = 50,
    grad_clip: float = 10.0,
    lr_decay_patience: int = 0,
    seed: int = 0,
    log: MetricsLog | None = None,
    desc: str = "",
    precision: str = "fp32",
) -> FitResult:
    """Train ``model`` (with ``log_prob(y, x)``) on ``split``; see the module docstring.

    ``precision="bf16"`` runs the model's networks under autocast for the training updates only
    (:func:`nfvi.precision.set_precision`); the validation and test NLLs are float32.
    """
    check_range("batch_size", batch_size, low=1, kind="a positive batch size")
    check_range("max_epochs", max_epochs, low=1, kind="a positive number of epochs")
    check_range("patience", patience, low=1, kind="a positive number of epochs")
    started = time.time()
    x, y = torch.as_tensor(split.x_train), torch.as_tensor(split.y_train)
    n = len(y)
    gen = torch.Generator().manual_seed(seed)
    flow_params = model.flow.parameters() if hasattr(model, "flow") else ()  # the MDN has no flow
    optimizer = optimizer_from_config(optim_cfg, model.parameters(), flow_params=flow_params)
    scheduler = None
    if lr_decay_patience > 0:  # halve the learning rate when the validation NLL stalls
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=lr_decay_patience)
    best_val, best_state, best_epoch, step = float("inf"), copy.deepcopy(model.state_dict()), 0, 0
    model.eval()
    reference = mean_nll(model, split.x_val, split.y_val)  # the untrained model's: the divergence guard's reference
    y_dim = int(y.shape[1]) if y.dim() > 1 else 1
    bar = tqdm(range(1, max_epochs + 1), desc=desc or "cde", leave=False, disable=None)  # a terminal only
    every = max(1, max_epochs // 10)  # without the bar: a progress line every tenth of the epochs
    epoch = 0
    for epoch in bar:
        model.train()
        set_precision(model, precision)
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            loss = -model.log_prob(y[idx], x[idx]).mean()
            step += 1
            check_finite(loss.detach(), step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                clip_gradients(model.parameters(), grad_clip)
            optimizer.step()
            total += loss.item() * len(idx)
        model.eval()
        set_precision(model, "fp32")
        val = mean_nll(model, split.x_val, split.y_val)
        if scheduler is not None:
            scheduler.step(val)
        if val < best_val:
            best_val, best_state, best_epoch = val, copy.deepcopy(model.state_dict()), epoch
        if log is not None:
            lr = optimizer.param_groups[0]["lr"]
            log.log(seed=seed, epoch=epoch, step=step, lr=lr, train_nll=round(total / n, 6), val_nll=round(val, 6))
        bar.set_postfix(train=f"{total / n:.3f}", val=f"{val:.3f}", best=f"{best_val:.3f}@{best_epoch}")
        if bar.disable and epoch % every == 0:
            logger.info("%s epoch %d/%d: train NLL %.4f, val %.4f (best %.4f at %d)", *(desc, epoch, max_epochs),
                     *(total / n, val, best_val, best_epoch))  # fmt: skip
        if epoch - best_epoch >= patience:
            break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    test_std = mean_nll(model, split.x_test, split.y_test)
    for what, value in (("the best validation NLL", best_val), ("the test NLL", test_std)):
        check_divergence(value, reference, y_dim, step, what=f"{what} ({desc or 'cde'}, standardised)")
    return FitResult(
        test_nll=test_std + split.log_std_y,
        test_nll_standardized=test_std,
        val_nll_standardized=best_val,
        train_nll_standardized=mean_nll(model, split.x_train, split.y_train),
        best_epoch=best_epoch,
        epochs=epoch,
        log_std_y=split.log_std_y,
        wall_time_s=round(time.time() - started, 3),
    )
