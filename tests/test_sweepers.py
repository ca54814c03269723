"""Optimising sweepers: each command's Hydra task returns its headline number (:data:`nfvi.cli.HEADLINES`), so that
``hydra/sweeper=optuna`` can minimise it; results.json keeps every number."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import yaml

from nfvi.cli import HEADLINES, headline
from tests.test_train import TINY

FAST = {
    "energy": ["trainer.steps=20", "trainer.log_every=10", "trainer.samples=32", "eval.samples=500", "eval.grid=20"]
    + ["flow.length=2", "device=cpu"],
    "train": [*TINY, "trainer.steps=10", "eval.at_end=true", "eval.max_images=20", "eval.num_samples=4"]
    + ["eval.elbo_samples=1", "device=cpu"],
    "cde": ["dataset=sine", "seeds=[0]", "max_epochs=3", "synthetic_size=200", "hidden=[8]"],
}


def test_headline_is_the_commands_number_as_a_float():
    assert headline("energy", {"kl": 1, "bound": 2.0}) == 1.0 and isinstance(headline("energy", {"kl": 1}), float)
    assert headline("train", {"val_neg_elbo_best": 90.5, "test_nll": 88.0}) == 90.5
    assert headline("cde", {"val_nll_standardized_mean": 0.25, "test_nll_mean": 1.0}) == 0.25
    assert math.isnan(headline("energy", {"kl": None, "kl_reason": "not finite (nan)"}))
    report = {"tables": 2}
    assert headline("report", report) is report and headline("evaluate", report) is report
    assert headline("energy", None) is None  # a failed job
    assert set(HEADLINES) == {"train", "energy", "cde"}


@pytest.mark.slow
@pytest.mark.parametrize("command", ["energy", "train", "cde"])
def test_a_three_trial_optuna_sweep_minimises_the_headline(tmp_path, command):
    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        pytest.skip("hydra-optuna-sweeper is not installed (pip install 'nfvi[launchers]')")
    sweep = tmp_path / "sweep"
    args = [command, "-m", "hydra/sweeper=optuna", "optim.lr=interval(0.001,0.01)", "hydra.sweeper.n_trials=3"]
    args += ["hydra.sweeper.sampler.seed=0", f"hydra.sweep.dir={sweep}", *FAST[command]]
    args += ["hydra/job_logging=none", "hydra/hydra_logging=none"]
    done = subprocess.run([sys.executable, "-m", "nfvi", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / "results.json").is_file())
    assert len(jobs) == 3
    values = [json.loads((job / "results.json").read_text())[HEADLINES[command]] for job in jobs]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(values), rel=1e-12)
    lrs = [json.loads((job / "results.json").read_text())["config"]["optim"]["lr"] for job in jobs]
    assert best["best_params"]["optim.lr"] == pytest.approx(lrs[values.index(min(values))])
    assert all(0.001 <= lr <= 0.01 for lr in lrs) and len(set(lrs)) == 3


def test_an_optuna_sweep_whose_trials_all_fail_ends_in_one_line_each(tmp_path, monkeypatch, capsys):
    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        pytest.skip("hydra-optuna-sweeper is not installed (pip install 'nfvi[launchers]')")
    from tests.test_reliability import cli

    args = ["energy", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "optim.lr=interval(1e6,1e7)"]
    assert cli(tmp_path, monkeypatch, *args, f"hydra.sweep.dir={tmp_path / 'sweep'}", *FAST["energy"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert "Traceback" not in err and len(lines) == 3, err
    assert all("optim.lr=" in line and "is not allowed" in line for line in lines[:2])
    assert "no trial of the sweep completed" in lines[2]
