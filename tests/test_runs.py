"""nfvi.runs: atomic writes (nothing half-written, ordinary permissions), metrics.csv, the NaN check."""

from __future__ import annotations

import os

import pytest

from nfvi.errors import NonFiniteLossError
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
    "evaluate": [
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
