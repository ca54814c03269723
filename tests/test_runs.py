"""nfvi.runs: atomic writes (nothing half-written, ordinary permissions), metrics.csv, the NaN check."""

from __future__ import annotations

import json
import os

import pytest

from nfvi.errors import NfviError, NonFiniteLossError
from nfvi.runs import MetricsLog, atomic_write_bytes, atomic_write_text, check_finite, new_file_mode


def test_atomic_write_replaces_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "results.json"
    atomic_write_text(path, "first")
    atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_atomic_write_gives_the_permissions_of_an_ordinary_new_file(tmp_path):
    """mkstemp creates 0o600 files; results, tables and figures must be as readable as files open() makes."""
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    with open(tmp_path / "b.bin", "wb") as f:
        f.write(b"x")
    mode = (tmp_path / "a.bin").stat().st_mode & 0o777
    assert mode == (tmp_path / "b.bin").stat().st_mode & 0o777 == new_file_mode()


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    atomic_write_bytes(path, b"good")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"good" and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_metrics_log_keeps_its_header_and_truncates_on_resume(tmp_path):
    log = MetricsLog(tmp_path / "metrics.csv")
    for step in (1, 2, 3):
        log.log(step=step, loss=float(step))
    MetricsLog(tmp_path / "metrics.csv").truncate_after(2)
    again = MetricsLog(tmp_path / "metrics.csv")
    again.log(step=3, loss=9.0)
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines == ["step,loss", "1,1.0", "2,2.0", "3,9.0"]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_names_the_step(value):
    with pytest.raises(NonFiniteLossError, match="at step 7"):
        check_finite(value, 7)
    check_finite(1.0, 7)


# results.json contract: the sorted keys of each command's results.json before the Run refactor (PR 9/11)
CONTRACT_KEYS = {
    "energy": [
        "anneal",
        "anneal_steps",
        "bound",
        "bound_se",
        "box",
        "box_half_width",
        "cpu_threads",
        "device",
        "eval_samples",
        "final_loss",
        "finished_at",
        "flow",
        "flow_length",
        "flow_lr_factor",
        "grid",
        "host",
        "kl",
        "kl_definition",
        "kl_mc",
        "log_z",
        "lr",
        "lr_decay",
        "mass_outside_box",
        "optim",
        "python_version",
        "samples",
        "seed",
        "steps",
        "target",
        "task",
        "torch_version",
        "units",
        "wall",
        "wall_time_s",
    ],
    "train": [
        "anneal_steps",
        "annealing",
        "batch_size",
        "best_step",
        "binarize",
        "checkpoint",
        "checkpoint_step",
        "cpu_threads",
        "data_kind",
        "data_source",
        "dataset",
        "device",
        "eval_seed",
        "eval_time_s",
        "finished",
        "finished_at",
        "flow",
        "flow_length",
        "flow_lr_factor",
        "grad_clip",
        "host",
        "latent_dim",
        "likelihood",
        "lr",
        "lr_decay",
        "model",
        "num_dims",
        "num_elbo_samples",
        "num_importance_samples",
        "num_test_images",
        "optim",
        "python_version",
        "seed",
        "steps",
        "task",
        "test_bpd",
        "test_images",
        "test_kl",
        "test_kl_se",
        "test_neg_elbo",
        "test_neg_elbo_bpd",
        "test_neg_elbo_se",
        "test_nll",
        "test_nll_se",
        "torch_version",
        "train_time_s",
        "units",
        "val_neg_elbo_best",
        "wall_time_s",
    ],
    "evaluate": None,  # the same keys as train (its evaluation writes the same results.json); set below
    "cde": [
        "activation",
        "batch_size",
        "benchmark_nf_nll",
        "cpu_threads",
        "data_file_sha256",
        "data_source",
        "data_table_sha256",
        "dataset",
        "device",
        "finished_at",
        "flow",
        "flow_length",
        "flow_lr_factor",
        "grad_clip",
        "hidden",
        "host",
        "log_std_y_mean",
        "lr",
        "lr_decay_patience",
        "max_epochs",
        "mdn_components",
        "min_scale",
        "model",
        "model_name",
        "n_rows",
        "n_seeds",
        "n_test_per_seed",
        "optimizer",
        "patience",
        "per_seed",
        "python_version",
        "seeds",
        "task",
        "test_fraction",
        "test_nll_mean",
        "test_nll_standardized_mean",
        "test_nll_standardized_std",
        "test_nll_std",
        "test_nll_true_density_mean",
        "torch_version",
        "true_nll",
        "units",
        "val_fraction",
        "val_nll_standardized_mean",
        "w_floor",
        "wall_time_s",
        "weight_decay",
        "x_dim",
        "y_dim",
    ],
}
CONTRACT_KEYS["evaluate"] = CONTRACT_KEYS["train"]


@pytest.fixture(scope="module")
def contract_runs(tmp_path_factory):
    """One tiny fake-data run of each command: ``{command: results dict}``."""
    from nfvi.cde.task import run_cde
    from nfvi.energy.task import run as energy_run
    from nfvi.vae import evaluate as evaluate_mod
    from nfvi.vae import task as train_mod
    from tests.conftest import compose
    from tests.test_train import TINY

    root = tmp_path_factory.mktemp("contract")
    energy = ["trainer.steps=20", "trainer.log_every=10", "eval.samples=500", "eval.grid=20", "device=cpu"]
    out = {}
    cwd = os.getcwd()
    os.chdir(root)  # outside Hydra the run folder of energy is the working directory
    try:
        out["energy"] = energy_run(compose("energy", [*energy, "flow.length=2"]))
    finally:
        os.chdir(cwd)
    train = compose("train", [*TINY, "trainer.steps=4", "eval.at_end=true", "eval.max_images=20"])
    out["train"] = train_mod.train(train, root / "train")
    evaluate = ["eval.num_samples=4", "eval.elbo_samples=1", "eval.max_images=20", "eval.progress=false", "device=cpu"]
    (out["evaluate"],) = evaluate_mod.run(compose("evaluate", [f"run_dir={root / 'train'}", *evaluate])).values()
    cde = ["dataset=sine", "seeds=[0,1]", "max_epochs=3", "synthetic_size=200", "hidden=[8]"]
    out["cde"] = run_cde(compose("cde", cde), root / "cde")
    return out


@pytest.mark.parametrize("command", sorted(CONTRACT_KEYS))
def test_results_json_keeps_every_key_of_the_contract(contract_runs, command):
    missing = set(CONTRACT_KEYS[command]) - set(contract_runs[command])
    assert not missing, f"nfvi {command}: results.json lost {sorted(missing)}"


PROVENANCE = ("nfvi_version", "git_commit", "torch_version", "hydra_version", "omegaconf_version", "numpy_version")


@pytest.mark.parametrize("command", sorted(CONTRACT_KEYS))
def test_results_json_records_provenance_and_the_config(contract_runs, command):
    res = contract_runs[command]
    for key in (*PROVENANCE, "python_version", "config"):
        assert key in res, key
    assert isinstance(res["config"], dict) and res["config"]
    import nfvi

    assert res["nfvi_version"] == nfvi.__version__ and res["git_commit"]


# ---------------------------------------------------------------------------------------------------------------------
# The Run: lock, stale lock, non-finite results, file-system faults


def _cfg(**values):
    from omegaconf import OmegaConf

    return OmegaConf.create({"resume": False, "overwrite": False, **values})


def test_a_held_lock_refuses_a_second_writer_naming_the_holder(tmp_path):
    import subprocess
    import sys

    from nfvi.errors import NfviError
    from nfvi.runs import Run

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": sleeper.pid, "host": __import__("socket").gethostname(), "command": "train", "started_at": "x"}
        (tmp_path / ".nfvi.lock").write_text(json.dumps(lock))
        with pytest.raises(NfviError) as err, Run(tmp_path, "energy", _cfg()):
            pass
        assert f"pid {sleeper.pid}" in str(err.value) and "nfvi train" in str(err.value) and "\n" not in str(err.value)
        assert json.loads((tmp_path / ".nfvi.lock").read_text())["pid"] == sleeper.pid  # the holder's lock stays
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_stale_lock_is_taken_over_and_the_lock_is_released_on_errors(tmp_path, caplog):
    import subprocess
    import sys

    from nfvi.runs import Run

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = {"pid": dead.pid, "host": __import__("socket").gethostname(), "command": "cde", "started_at": "x"}
    (tmp_path / ".nfvi.lock").write_text(json.dumps(lock))
    with pytest.raises(RuntimeError, match="boom"), Run(tmp_path, "energy", _cfg()) as run:
        assert json.loads(run.lock_path.read_text())["pid"] == os.getpid()
        raise RuntimeError("boom")
    assert "taking over the stale lock" in caplog.text
    assert not (tmp_path / ".nfvi.lock").exists()


def test_non_finite_results_fail_loudly_or_become_null_with_a_reason(tmp_path):
    from nfvi.errors import NfviError
    from nfvi.runs import Run, finite_results, write_json

    with pytest.raises(NfviError, match="the reported test_nll is nan"):
        finite_results({"test_nll": float("nan")}, required=("test_nll",))
    assert finite_results({"kl_mc": float("inf"), "kl": 1.0}) == {
        "kl_mc": None,
        "kl_mc_reason": "not finite (inf)",
        "kl": 1.0,
    }
    with pytest.raises(ValueError):
        write_json(tmp_path / "x.json", {"a": float("nan")})  # never a bare NaN token
    with Run(tmp_path, "energy", _cfg()) as run:
        with pytest.raises(NfviError, match="bound"):
            run.write_results({"bound": float("nan")}, required=("bound",))
        saved = run.write_results({"bound": 1.0, "kl_mc": float("nan")}, required=("bound",))
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and saved["kl_mc"] is None and json.loads(text)["kl_mc_reason"] == "not finite (nan)"


def test_no_space_left_mid_run_is_one_line_naming_the_file(tmp_path, monkeypatch):
    import errno

    from nfvi.errors import NfviError
    from nfvi.runs import Run

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(NfviError) as err, Run(tmp_path, "energy", _cfg()) as run:
        run.metrics = MetricsLog(tmp_path / "metrics.csv")
        monkeypatch.setattr("csv.DictWriter.writerow", full)
        run.metrics.log(step=1, loss=1.0)
    message = str(err.value)
    assert f"cannot write {tmp_path / 'metrics.csv'}: no space left on the device" in message and "\n" not in message
    assert "resume=true" in message and not (tmp_path / ".nfvi.lock").exists()


def test_read_only_folder_is_one_line(tmp_path, monkeypatch):
    import errno

    from nfvi.errors import NfviError
    from nfvi.runs import Run

    real_open = os.open

    def read_only(path, *args, **kwargs):
        if ".nfvi.lock" in str(path):  # the lock, or the temporary file it is linked from
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(NfviError) as err, Run(tmp_path, "energy", _cfg()):
        pass
    assert "permission denied (a read-only folder?)" in str(err.value) and str(tmp_path) in str(err.value)


def test_one_beta_schedule_and_one_cosine_for_both_commands():
    import math

    import torch

    from nfvi.energy.task import beta_at
    from nfvi.training import beta_schedule, cosine_factor, cosine_scheduler
    from nfvi.vae.objectives import beta_schedule as vae_beta
    from nfvi.vae.task import lr_factor

    for step in (0, 5, 500, 20000):
        expected = min(1.0, 0.01 + step / 10000)
        assert beta_at(step) == vae_beta(step, "eq20") == beta_schedule(step) == expected
    steps, final = 50, 0.01
    for step in range(steps):  # the VAE: span steps - 1, the last update at the final lr
        old = final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / (steps - 1))))
        assert lr_factor(step, steps, "cosine", final) == old
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = cosine_scheduler(opt, steps, eta_min=0.1 * final)  # energy: torch's, span = steps
    for step in range(steps):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * cosine_factor(step, steps, final), rel=1e-9)
        opt.step()
        scheduler.step()


@pytest.mark.parametrize("command", ["train", "energy", "cde", "evaluate"])
def test_every_computing_command_takes_threads_and_defaults_to_one(command):
    """``threads=N`` composes for every command that computes (``nfvi energy threads=1`` was refused), the default is
    one thread (docs/performance.md), and a bad value is one line naming the key."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from nfvi.errors import NfviError
    from nfvi.runs import DEFAULT_THREADS
    from tests.conftest import compose

    extra = ["dataset=fake"] if command == "train" else []
    assert compose(command, extra).threads == DEFAULT_THREADS == 1
    cfg = compose(command, [*extra, "threads=2"])
    assert cfg.threads == 2
    with pytest.raises((NfviError, HydraException, ValueError), match="threads"):
        OmegaConf.to_object(compose(command, [*extra, "threads=-1"]))


def test_apply_threads_sets_torch_and_zero_leaves_it(monkeypatch):
    import torch

    from nfvi.runs import apply_threads

    old = torch.get_num_threads()
    try:
        apply_threads(1)
        assert torch.get_num_threads() == 1
        apply_threads(0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)


class _FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


def test_every_command_keeps_freed_memory_with_glibcs_mallopt(monkeypatch, tmp_path):
    """Run sets glibc's mmap threshold to 32 MiB and its trim threshold to 1 GiB (docs/performance.md), so an
    update's MB-sized temporaries are not faulted in afresh each update; not where the user set malloc's own
    variables or NFVI_RETAIN_FREED_MEMORY=0, and not off glibc."""
    import ctypes
    import platform
    import sys

    from nfvi import runs

    fake = _FakeLibc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: fake)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(key, raising=False)
    assert runs._set_malloc() is True
    assert fake.calls == [(-3, 32 << 20), (-1, 1 << 30)]

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")  # the user's own setting stands
    assert runs._set_malloc() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("NFVI_RETAIN_FREED_MEMORY", "0")  # glibc's defaults
    assert runs._set_malloc() is False
    monkeypatch.setenv("NFVI_RETAIN_FREED_MEMORY", "false")  # not a value it takes: one line, naming it
    with pytest.raises(NfviError, match=r"NFVI_RETAIN_FREED_MEMORY='false': use 1 .* or 0"):
        runs._set_malloc()
    monkeypatch.delenv("NFVI_RETAIN_FREED_MEMORY")
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))  # musl: its mallopt does nothing
    assert runs._set_malloc() is False
    assert len(fake.calls) == 2

    called = []
    monkeypatch.setattr(runs, "retain_freed_memory", lambda: called.append(True) or True)
    with runs.Run(tmp_path / "run", command="energy"):
        pass
    assert called == [True]
