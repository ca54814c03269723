"""``nfvi evaluate``: results.json with units, the best checkpoint, a fixed test subset, determinism."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from nfvi.config import validate
from nfvi.errors import NfviError
from nfvi.vae import evaluate as evaluate_mod
from nfvi.vae import task as train_mod
from tests.conftest import compose
from tests.test_train import cfg_of


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for k in (0, 2):
        train_mod.train(cfg_of("trainer.steps=10", "trainer.val_every=5", f"flow.length={k}"), root / f"k{k}")
    return root


def evaluate(run_dir, *overrides):
    cfg = compose("evaluate", [f"run_dir={run_dir}", "eval.progress=false", "device=cpu", *overrides])
    return evaluate_mod.run(cfg)


def test_evaluate_writes_results_with_units(runs):
    out = evaluate(runs / "k2", "eval.num_samples=16", "eval.elbo_samples=4", "eval.max_images=60")
    res = json.loads((runs / "k2" / "results.json").read_text())
    assert res == json.loads(json.dumps(out[str(runs / "k2")]))
    assert res["task"] == "vae" and res["flow"] == "planar" and res["flow_length"] == 2 and res["steps"] == 10
    for key in ("test_neg_elbo", "test_nll", "test_kl"):
        assert math.isfinite(res[key]) and res["units"][key] == "nats"
    assert res["test_kl"] == pytest.approx(res["test_neg_elbo"] - res["test_nll"])
    assert res["test_nll"] < res["test_neg_elbo"] + 1.0  # IS is (in expectation) tighter than the bound
    assert res["num_importance_samples"] == 16 and res["num_test_images"] == 60
    assert res["test_images"].startswith("random subset of 60 of 200")
    assert res["checkpoint"] == "best" and res["checkpoint_step"] == res["best_step"]
    for key in ("wall_time_s", "eval_time_s", "train_time_s", "torch_version", "device", "seed", "dataset"):
        assert key in res
    assert len(list((runs / "k2" / "evaluations").glob("*.json"))) >= 1


def test_evaluate_is_deterministic_and_last_checkpoint_option(runs):
    args = ("eval.num_samples=8", "eval.elbo_samples=2", "eval.max_images=40")
    a = evaluate(runs / "k0", *args)[str(runs / "k0")]
    b = evaluate(runs / "k0", *args, "overwrite=true")[str(runs / "k0")]
    assert a["test_nll"] == b["test_nll"] and a["test_neg_elbo"] == b["test_neg_elbo"]
    c = evaluate(runs / "k0", *args, "eval.checkpoint=last")[str(runs / "k0")]
    assert c["checkpoint"] == "last" and c["checkpoint_step"] == 10
    with pytest.raises(NfviError, match="already holds this evaluation; resume=true returns it"):
        evaluate(runs / "k0", *args)
    assert evaluate(runs / "k0", *args, "resume=true")[str(runs / "k0")]["test_nll"] == a["test_nll"]


def test_evaluate_a_folder_of_runs(runs):
    out = evaluate(runs, "eval.num_samples=4", "eval.elbo_samples=1", "eval.max_images=20")
    assert sorted(out) == [str(runs / "k0"), str(runs / "k2")]


def test_evaluate_errors(tmp_path):
    with pytest.raises(NfviError, match="does not exist"):
        evaluate(tmp_path / "nope")
    with pytest.raises(NfviError, match="holds no checkpoint.pt"):
        evaluate(tmp_path)
    with pytest.raises(NfviError, match="run_dir is empty"):
        evaluate("")
    with pytest.raises(NfviError, match="eval.num_samples=0 is not allowed"):
        validate(compose("evaluate", [f"run_dir={tmp_path}", "eval.num_samples=0"]))


def test_cli_evaluate_writes_into_the_run(runs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["eval.num_samples=4", "eval.elbo_samples=1", "eval.max_images=20", "eval.progress=false", "overwrite=true"]
    result = subprocess.run(
        [sys.executable, "-m", "nfvi", "evaluate", f"run_dir={runs / 'k2'}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=runs,
    )
    assert result.returncode == 0, result.stderr
    assert "test -ELBO" in result.stderr and "-ln p(x)" in result.stderr
    assert "test -ELBO" in (runs / "k2" / "evaluate.log").read_text()
    assert not (runs / "k2" / ".hydra").exists() and not (runs / ".hydra").exists()  # Hydra writes nothing
    assert not (runs / "outputs").exists()
    missing = subprocess.run(
        [sys.executable, "-m", "nfvi", "evaluate"], capture_output=True, text=True, timeout=120, env=env, cwd=runs
    )
    lines = missing.stderr.strip().splitlines()
    assert missing.returncode == 2 and len(lines) == 1 and "run_dir" in lines[0], missing.stderr
