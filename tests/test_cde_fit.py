"""nfvi.cde.fit on generated data with a known conditional density: the fitted NLL approaches the truth."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from nfvi.cde.data import make_synthetic, split_and_standardize
from nfvi.cde.fit import fit, per_point_nll
from nfvi.cde.model import build_model
from nfvi.config import FlowConfig, OptimConfig

OPTIM = OmegaConf.structured(OptimConfig(name="adam", lr=3e-3))


@functools.cache
def fit_synthetic(name: str, model: str, kind: str = "none", length: int = 0, n: int = 1000, seed: int = 0):
    """Fit once per argument tuple; returns (FitResult, true NLL on the same test points, model, split)."""
    table = make_synthetic(name, n)
    split = split_and_standardize(table, seed)
    torch.manual_seed(seed)
    net = build_model(model, 1, 1, OmegaConf.structured(FlowConfig(kind=kind, length=length)), hidden=[32, 32])
    result = fit(net, split, OPTIM, batch_size=64, max_epochs=150, patience=30, seed=seed)
    i = split.test_index
    truth = -float(table.true_log_prob(table.x[i], table.y[i]).mean())
    return result, truth, net, split


@pytest.mark.parametrize(
    "model,kind,length,tol", [("gaussian", "none", 0, 0.05), ("flow", "radial", 3, 0.1)], ids=["gaussian", "radial"]
)
def test_sine_fit_reaches_the_true_conditional_entropy(model, kind, length, tol):
    """y | x ~ N(sin x, 0.1^2): the truth is in the Gaussian family; the flow has more to overfit with."""
    result, truth, _, split = fit_synthetic("sine", model, kind, length)
    assert result.test_nll == pytest.approx(truth, abs=tol)
    assert result.test_nll == pytest.approx(result.test_nll_standardized + split.log_std_y)


def test_bimodal_flow_approaches_truth_where_a_gaussian_cannot():
    flow, truth, _, _ = fit_synthetic("bimodal", "flow", "planar", 4)
    gaussian, _, _, _ = fit_synthetic("bimodal", "gaussian", "none", 0)
    assert flow.test_nll - truth < 0.12
    assert gaussian.test_nll - truth > 0.5  # one Gaussian cannot split the two modes


def test_early_stopping_restores_the_best_validation_parameters():
    result, _, net, split = fit_synthetic("sine", "gaussian", "none", 0)
    val = float(per_point_nll(net, split.x_val, split.y_val).mean())
    assert val == pytest.approx(result.val_nll_standardized, abs=1e-6)
    assert 1 <= result.best_epoch <= result.epochs < 150 or result.epochs == 150
    assert np.isfinite(result.train_nll_standardized)
