"""``nfvi train``: exact resume, refusals, NaN handling, signals, one-line CLI errors (tiny models on dataset=fake)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from nfvi.config import validate
from nfvi.errors import NfviError, NonFiniteLossError
from nfvi.vae import task as train_mod
from nfvi.vae.checkpoint import load_checkpoint
from tests.conftest import REPO, compose, needs_cxx

TINY = [
    "dataset=fake",
    "dataset.fake_size=200",
    "model=mlp",
    "model.hidden=16",
    "model.latent_dim=4",
    "flow=planar",
    "flow.length=2",
    "optim=adam",
    "trainer.batch_size=20",
    "trainer.log_every=5",
    "trainer.val_every=10",
    "trainer.ckpt_every=10",
    "trainer.progress=false",
    "eval.num_samples=8",
    "eval.elbo_samples=2",
    "eval.progress=false",
    "eval.at_end=false",
    "device=cpu",
]


def cfg_of(*overrides, **kw):
    return compose("train", [*TINY, *overrides])


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([], id="planar-dynamic-eq20"),
        pytest.param(["flow=nice", "flow.hidden=8", "trainer.annealing=kl_warmup", "trainer.grad_clip=1.0"], id="nice"),
        pytest.param(["dataset.binarize=static", "optim=rmsprop", "optim.lr=1e-3", "trainer.samples=2"], id="static"),
    ],
)
def test_interrupted_and_resumed_run_ends_at_the_same_parameters(tmp_path, extra):
    steps, cut = 26, 13  # 10 batches per epoch: the cut falls mid-epoch
    straight = train_mod.train(cfg_of(*extra, f"trainer.steps={steps}"), tmp_path / "straight")
    train_mod.train(cfg_of(*extra, f"trainer.steps={cut}"), tmp_path / "cut")
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"] == cut
    resumed = train_mod.train(cfg_of(*extra, f"trainer.steps={steps}", "resume=true"), tmp_path / "cut")
    assert straight["steps"] == resumed["steps"] == steps
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert states_equal(a["model"], b["model"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and torch.equal(a["rng"]["data"], b["rng"]["data"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k in a["optimizer"]["state"]:
        for name, value in a["optimizer"]["state"][k].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][k][name]))
    rows = (tmp_path / "cut" / "metrics.csv").read_text().splitlines()
    assert rows[-1].startswith(f"{steps},")


def test_same_seed_same_numbers_and_different_seed_differs(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train_mod.train(cfg_of("trainer.steps=5", f"seed={seed}"), tmp_path / name)
    a, b, c = (load_checkpoint(tmp_path / n / "checkpoint.pt")["model"] for n in "abc")
    assert states_equal(a, b) and not states_equal(a, c)


def test_resume_with_changed_config_is_refused_naming_the_keys(tmp_path):
    train_mod.train(cfg_of("trainer.steps=5"), tmp_path)
    with pytest.raises(NfviError) as err:
        train_mod.train(cfg_of("trainer.steps=10", "resume=true", "flow.length=3", "optim.lr=0.5"), tmp_path)
    msg = str(err.value)
    assert "flow.length (2 -> 3)" in msg and "optim.lr (0.001 -> 0.5)" in msg and "\n" not in msg
    # keys that do not change the trajectory may differ; steps may grow
    out = train_mod.train(
        cfg_of("trainer.steps=7", "resume=true", "trainer.val_every=3", "eval.num_samples=4", "threads=1"), tmp_path
    )
    assert out["steps"] == 7


def test_resume_refusals(tmp_path):
    train_mod.train(cfg_of("trainer.steps=5"), tmp_path)
    with pytest.raises(NfviError, match="already holds a checkpoint; pass resume=true"):
        train_mod.train(cfg_of("trainer.steps=5"), tmp_path)
    with pytest.raises(NfviError, match="the checkpoint is at step 5"):
        train_mod.train(cfg_of("trainer.steps=3", "resume=true"), tmp_path)
    cos = tmp_path / "cos"
    train_mod.train(cfg_of("trainer.steps=5", "trainer.lr_decay=cosine"), cos)
    with pytest.raises(NfviError, match="learning rate decays over trainer.steps=5"):
        train_mod.train(cfg_of("trainer.steps=8", "trainer.lr_decay=cosine", "resume=true"), cos)


def test_finished_run_is_not_retrained(tmp_path, capsys):
    cfg = cfg_of("trainer.steps=4", "eval.at_end=true")
    first = train_mod.train(cfg, tmp_path)
    again = train_mod.train(cfg_of("trainer.steps=4", "eval.at_end=true", "resume=true"), tmp_path)
    assert again["finished_at"] == first["finished_at"]
    assert "nothing to do" in capsys.readouterr().err


def poison_loss_at(monkeypatch, update: int) -> dict:
    """Make the loss of training update ``update`` (1-based) NaN; returns ``{"n": losses computed so far}``."""
    calls = {"n": 0}
    real = train_mod.annealed_loss

    def poisoned(terms, beta, mode):
        calls["n"] += 1
        loss = real(terms, beta, mode)
        return loss * float("nan") if calls["n"] == update else loss

    monkeypatch.setattr(train_mod, "annealed_loss", poisoned)
    return calls


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    poison_loss_at(monkeypatch, 15)
    with pytest.raises(NonFiniteLossError) as err:
        train_mod.train(cfg_of("trainer.steps=30"), tmp_path)
    msg = str(err.value)
    assert "loss became nan at step 15" in msg and "last good checkpoint (step 10)" in msg
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 10


def test_nonfinite_parameters_are_never_checkpointed(tmp_path, monkeypatch):
    real = train_mod.optimizer_from_config

    def poisoning_optimizer(cfg, params, **kwargs):
        opt = real(cfg, params, **kwargs)
        count = {"n": 0}

        def hook(optimizer, args, kwargs):
            count["n"] += 1
            if count["n"] == 20:
                with torch.no_grad():
                    optimizer.param_groups[0]["params"][0].fill_(float("inf"))

        opt.register_step_post_hook(hook)
        return opt

    monkeypatch.setattr(train_mod, "optimizer_from_config", poisoning_optimizer)
    with pytest.raises(NonFiniteLossError, match="parameters became non-finite at step 20"):
        train_mod.train(cfg_of("trainer.steps=30", "trainer.val_every=1000"), tmp_path)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 10 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_config_values_are_checked(tmp_path):
    with pytest.raises(NfviError, match="trainer.annealing='warm' is not allowed"):
        validate(cfg_of("trainer.annealing=warm"))
    with pytest.raises(NfviError, match="trainer.batch_size=500 exceeds the 200 training images"):
        train_mod.train(cfg_of("trainer.batch_size=500"), tmp_path)


def nfvi(*args, cwd, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "nfvi", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trainer.annealing=warm", "trainer.annealing='warm' is not allowed; choose one of: eq20, kl_warmup, none"),
        ("run_dir=/dev/null/x", "cannot create run folder /dev/null/x: /dev/null is not a folder"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, override, expected):
    result = nfvi("train", *TINY, *override.split(), f"paths.output_dir={tmp_path}", cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("nfvi train: error:") and expected in lines[0], result.stderr
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.slow
def test_cli_train_then_resume_the_run_in_its_folder(tmp_path):
    run = tmp_path / "run"
    base = [*TINY, f"hydra.run.dir={run}", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    first = nfvi("train", *base, "trainer.steps=4", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert {"checkpoint.pt", "best.pt", "metrics.csv", "run_config.json", ".hydra"} <= {p.name for p in run.iterdir()}
    refused = nfvi("train", *base, "trainer.steps=6", cwd=tmp_path)
    assert refused.returncode == 2 and "already holds a checkpoint; pass resume=true" in refused.stderr
    second = nfvi("train", *base, "trainer.steps=6", "resume=true", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert f"resuming {run} at step 4 of 6" in second.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no new run directory
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 6
    assert json.loads((run / "run_config.json").read_text())["trainer"]["steps"] == 4  # the first launch's config
    assert (run / ".hydra" / "config.yaml").read_text().count("steps: 6") == 1  # .hydra/: the latest launch
    log = (run / "train.log").read_text()
    assert "step 4/4: train loss" in log and "resuming" in log and "step 6/6" in log and "trained" in log
    assert "\r" not in log and not (run / ".nfvi.lock").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_exits(tmp_path, sig):
    run = tmp_path / "run"
    args = [
        *TINY,
        "trainer.steps=1000000",
        "trainer.log_every=1",
        "trainer.ckpt_every=100000",
        f"run_dir={run}",
        "hydra/job_logging=none",
        "hydra/hydra_logging=none",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nfvi", "train", *args], cwd=REPO, stderr=subprocess.PIPE, text=True, env=env
    )
    metrics = run / "metrics.csv"
    deadline = time.time() + 90
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) > 3):
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    state = load_checkpoint(run / "checkpoint.pt")
    assert f"{signal.Signals(sig).name} at step {state['step']}: checkpoint saved" in err
    assert not (run / ".nfvi.lock").exists()  # released on the way out
    assert "resume=true" in err and "Traceback" not in err
    last_row = metrics.read_text().splitlines()[-1]
    assert int(last_row.split(",")[0]) == state["step"] > 0
    # and the run continues from there
    out = train_mod.train(cfg_of(f"trainer.steps={state['step'] + 3}", "resume=true", "trainer.log_every=1"), run)
    assert out["steps"] == state["step"] + 3


def test_results_json_after_training(tmp_path):
    res = train_mod.train(cfg_of("trainer.steps=12", "eval.at_end=true", "eval.max_images=50"), tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(res))
    for key in ("test_neg_elbo", "test_nll", "test_kl"):
        assert saved["units"][key] == "nats"
    assert saved["task"] == "vae" and saved["steps"] == 12 and saved["num_test_images"] == 50
    assert saved["checkpoint"] == "best" and saved["checkpoint_step"] == saved["best_step"] in (10, 12)
    assert saved["flow"] == "planar" and saved["flow_length"] == 2 and saved["dataset"] == "fake"


def test_a_finished_run_is_reevaluated_unless_the_results_match_the_request(tmp_path):
    """resume=true on a finished run reuses results.json only for the same images, samples, seed and weights."""
    from omegaconf import OmegaConf

    from nfvi.vae.config import EvalConfig

    done = {"steps": 100, "num_importance_samples": 200, "num_elbo_samples": 20, "eval_seed": 0}
    subset = {**done, "checkpoint": "best", "num_test_images": 500, "test_images": "random subset of 500 of 10000"}
    whole = {**done, "checkpoint": "best", "num_test_images": 10000, "test_images": "all"}

    def same(results, **kw):
        cfg = OmegaConf.structured(EvalConfig(num_samples=200, elbo_samples=20, **kw))
        return train_mod._same_evaluation(results, cfg, 100, tmp_path)

    assert same(subset, max_images=500) and same(whole, max_images=0) and same(whole, max_images=20000)
    assert not same(subset, max_images=0)  # the whole test split was asked for, a subset was evaluated
    assert not same(whole, max_images=500) and not same(subset, max_images=500, seed=1)
    last = {**whole, "checkpoint": "last"}
    assert same(last, max_images=0)  # no best.pt: a best request falls back to the last weights
    (tmp_path / "best.pt").write_bytes(b"")
    assert not same(last, max_images=0) and same(last, max_images=0, checkpoint="last")


def test_early_stopping_counts_validations_after_the_warm_up():
    """trainer.patience (the Sylvester protocol): stop after `patience` validations without a better bound,
    counted from the end of the warm-up; a pure function of the step, so resumes stop at the same update."""
    from types import SimpleNamespace

    from nfvi.training import early_stop_due

    t = SimpleNamespace(patience=3, val_every=10, anneal_steps=100, annealing="kl_warmup")
    assert not early_stop_due(120, 50, t)  # warm-up ended at 100: only 2 validations since
    assert early_stop_due(130, 50, t)  # 3 validations after the warm-up without a better bound
    assert not early_stop_due(170, 150, t) and early_stop_due(180, 150, t)
    assert not early_stop_due(10_000, 50, SimpleNamespace(**{**vars(t), "patience": 0}))  # off
    assert early_stop_due(30, 0, SimpleNamespace(**{**vars(t), "annealing": "none"}))  # no warm-up to wait for


def test_training_stops_early_and_reports_it(tmp_path):
    from nfvi.config import validate

    cfg = compose("train", [*TINY, "trainer.steps=200", "trainer.val_every=5", "trainer.patience=1", "optim.lr=0.3",
                            "trainer.annealing=none", "optim.lr=0.3"])  # fmt: skip
    validate(cfg)
    results = train_mod.train(cfg, tmp_path)
    assert results["stopped_early"] is True and results["steps"] < 200
    again = train_mod.train(compose("train", [*TINY, "trainer.steps=200", "trainer.val_every=5",
                                              "trainer.patience=1", "trainer.annealing=none", "optim.lr=0.3",
                                              "resume=true"]), tmp_path)  # fmt: skip
    assert again["steps"] == results["steps"]  # a finished (early-stopped) run is not trained further


# -- the device path, run on the CPU -------------------------------------------------------------------------------
@pytest.mark.parametrize("log_every", [5, 25])
def test_deferred_checks_stop_at_the_nan_step_and_never_checkpoint_after_it(tmp_path, monkeypatch, log_every):
    """On a GPU the loss is read at log points only; a NaN must still name its update and never reach a checkpoint
    (log_every=25: the checkpoint at update 20 comes before any read)."""
    monkeypatch.setattr(train_mod, "DEFER_CHECKS", True)
    calls = poison_loss_at(monkeypatch, 15)
    with pytest.raises(NonFiniteLossError) as err:
        train_mod.train(cfg_of("trainer.steps=30", f"trainer.log_every={log_every}"), tmp_path)
    msg = str(err.value)
    assert "loss became nan at step 15" in msg and "last good checkpoint (step 10)" in msg
    assert calls["n"] == (15 if log_every == 5 else 20)  # the log point of update 15, or the checkpoint of 20
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 10


def test_deferred_checks_log_the_same_rows_as_immediate_ones(tmp_path, monkeypatch):
    train_mod.train(cfg_of("trainer.steps=12"), tmp_path / "now")
    monkeypatch.setattr(train_mod, "DEFER_CHECKS", True)
    train_mod.train(cfg_of("trainer.steps=12"), tmp_path / "later")
    a, b = (load_checkpoint(tmp_path / n / "checkpoint.pt")["model"] for n in ("now", "later"))
    assert states_equal(a, b)
    rows = [(tmp_path / n / "metrics.csv").read_text().splitlines() for n in ("now", "later")]
    cut = [[",".join(r.split(",")[:7]) for r in rs] for rs in rows]  # step .. grad_norm_max (not the timings)
    assert rows[0][0] == rows[1][0] and len(rows[0]) == 4
    assert [r.split(",")[:4] for r in cut[0]] == [r.split(",")[:4] for r in cut[1]]


def test_resident_training_set_resumes_exactly_and_continues_off_the_device(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(train_mod, "data_on_device", lambda device: True)
    monkeypatch.setattr(train_mod, "DEFER_CHECKS", True)
    straight = train_mod.train(cfg_of("trainer.steps=26"), tmp_path / "straight")
    train_mod.train(cfg_of("trainer.steps=13"), tmp_path / "cut")
    train_mod.train(cfg_of("trainer.steps=26", "resume=true"), tmp_path / "cut")
    a, b = (load_checkpoint(tmp_path / n / "checkpoint.pt") for n in ("straight", "cut"))
    assert straight["steps"] == 26 and states_equal(a["model"], b["model"]) and a["epoch"] == b["epoch"] == 2
    assert a["data"]["resident"]["pos"] == b["data"]["resident"]["pos"] == 120
    monkeypatch.setattr(train_mod, "data_on_device", lambda device: False)  # moved to the CPU: the host stream
    assert train_mod.train(cfg_of("trainer.steps=30", "resume=true"), tmp_path / "cut")["steps"] == 30
    assert "draws its batches on the host, from a fresh epoch" in caplog.text


def test_resident_batches_binarize_on_the_device_generator():
    from nfvi.data.resident import ResidentBatches

    grey = torch.randint(0, 256, (10, 784), dtype=torch.uint8).float().div(255.0)
    b = ResidentBatches(grey, 4, dynamic=True, device="cpu", seed=3)
    assert b.train.dtype == torch.uint8 and b.nbytes == 10 * 784
    x = torch.cat([b.next(), b.next()])
    assert x.dtype == torch.float32 and set(x.unique().tolist()) <= {0.0, 1.0}
    assert b.epoch == 0 and b.next().shape == (4, 784) and b.epoch == 1  # 10 // 4 batches per epoch
    means = ResidentBatches(torch.rand(10, 784), 4, dynamic=True, device="cpu", seed=3)
    assert means.train.dtype == torch.float32  # not grey levels: kept exact


def test_compiled_optimizer_step_trains_and_resumes_to_the_eager_runs_parameters(tmp_path):
    """optim.compile=true (the RMSprop step through torch.compile, inductor): the same parameters as the eager run
    to float32 rounding, and a run may be resumed with the setting switched (speed only)."""
    needs_cxx()
    rms = ("optim=rmsprop", "optim.lr=1e-3")  # a changing lr: tests/test_training.py
    train_mod.train(cfg_of(*rms, "trainer.steps=8"), tmp_path / "eager")
    train_mod.train(cfg_of(*rms, "trainer.steps=4", "optim.compile=true"), tmp_path / "mixed")
    train_mod.train(cfg_of(*rms, "trainer.steps=8", "resume=true"), tmp_path / "mixed")
    a, b = (load_checkpoint(tmp_path / n / "checkpoint.pt") for n in ("eager", "mixed"))
    assert b["step"] == 8 and b["config"]["optim"]["compile"] is False
    diff = max(float((a["model"][k] - b["model"][k]).abs().max()) for k in a["model"])
    assert diff < 1e-5  # rounding (it grows with the updates); one update moves a parameter by about 1e-2 here
    assert all(type(g["lr"]) is float for g in b["optimizer"]["param_groups"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compile_runs_the_same_update(tmp_path, monkeypatch, precision):
    """trainer.compile=true takes the torch.compile path (the eager backend here: the plumbing in seconds)."""
    monkeypatch.setattr(train_mod, "COMPILE_BACKEND", "eager")
    p = f"trainer.precision={precision}"
    train_mod.train(cfg_of("trainer.steps=5", "trainer.compile=true", p), tmp_path / "c")
    train_mod.train(cfg_of("trainer.steps=5", p), tmp_path / "e")
    a, b = (load_checkpoint(tmp_path / n / "checkpoint.pt")["model"] for n in ("c", "e"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
