"""Sweeps: Hydra's basic launcher, joblib, and the shipped submitit configs (``hydra/launcher=local|slurm``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

import nfvi.vae.task  # noqa: F401  (registers base_train and the run-dir resolvers)
from nfvi.config import hydra_version_base
from tests.conftest import CONF_DIR
from tests.test_train import TINY

SWEEP = [
    *TINY,
    "trainer.steps=6",
    "eval.at_end=true",
    "eval.max_images=20",
    "hydra/job_logging=none",
    "hydra/hydra_logging=none",
]


def launcher(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), **hydra_version_base()):
        cfg = compose("train", [f"hydra/launcher={name}", *overrides], return_hydra_config=True)
    return cfg.hydra.launcher


def test_shipped_submitit_configs_extend_the_plugin_schemas():
    local = launcher("local")
    assert local._target_.endswith("LocalLauncher") and local.timeout_min == 720 and local.cpus_per_task == 1
    slurm = launcher("slurm")
    assert slurm._target_.endswith("SlurmLauncher") and slurm.partition is None
    assert slurm.gpus_per_node == 1 and slurm.max_num_timeout == 3
    assert launcher("slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=60").partition == "gpu"
    with pytest.raises(Exception, match="partitio"):
        launcher("slurm", "hydra.launcher.partitio=gpu")  # typed: a misspelled key fails
    assert launcher("joblib").n_jobs == -1


def nfvi(*args, cwd, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "nfvi", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def sweep_results(sweep_dir):
    return sorted(json.loads(p.read_text())["flow_length"] for p in sweep_dir.rglob("results.json"))


@pytest.mark.slow
def test_basic_sweep_and_safe_rerun(tmp_path):
    args = ["-m", *SWEEP, "flow.length=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}", "resume=true"]
    first = nfvi("train", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert sweep_results(tmp_path / "sweep") == [0, 1]
    again = nfvi("train", *args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("nothing to do") == 2


@pytest.mark.slow
def test_joblib_sweep_runs_in_parallel_processes(tmp_path):
    args = [
        "-m",
        *SWEEP,
        "flow=planar,nice",
        "flow.length=1",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
    ]
    result = nfvi("train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sweep_results(tmp_path / "sweep") == [1, 1]


@pytest.mark.slow
def test_submitit_local_two_job_sweep(tmp_path):
    args = [
        "-m",
        *SWEEP,
        "flow.length=0,2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "hydra/launcher=local",
        "hydra.launcher.timeout_min=10",
        "threads=1",
    ]
    result = nfvi("train", *args, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr + result.stdout
    assert sweep_results(tmp_path / "sweep") == [0, 2]
    assert list((tmp_path / "sweep" / ".submitit").iterdir())  # submitit's logs and pickles


ENERGY_SWEEP = ["-m", "trainer.steps=20", "eval.samples=1000", "eval.grid=20", "flow.length=2,-1"]
LAUNCHERS = {
    "basic": [],
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    "submitit_local": ["hydra/launcher=local", "hydra.launcher.timeout_min=5"],
}


@pytest.mark.parametrize(
    "name",
    [
        "basic",
        pytest.param("joblib", marks=pytest.mark.slow),
        pytest.param("submitit_local", marks=pytest.mark.slow),
    ],
)
@pytest.mark.slow
def test_a_failed_job_fails_the_sweep_on_every_launcher(tmp_path, name):
    """flow.length=-1 fails, flow.length=2 finishes: exit 1, the job's one line on the console, error.txt kept."""
    sweep = tmp_path / "sweep"
    args = [*ENERGY_SWEEP, *LAUNCHERS[name], f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}"]
    result = nfvi("energy", *args, "hydra/job_logging=none", "hydra/hydra_logging=none", cwd=tmp_path)
    assert result.returncode == 1, result.stderr + result.stdout
    message = "flow.length=-1 is not allowed"
    assert f"nfvi energy: error: job 1: {message}" in result.stderr
    assert "nfvi energy: error: 1 job(s) of the sweep failed" in result.stderr and "Traceback" not in result.stderr
    line, traceback = (sweep / "1" / "error.txt").read_text().split("\n", 1)
    assert line.startswith(f"nfvi energy: error: {message}") and traceback.startswith("Traceback (most recent")
    assert json.loads((sweep / "0" / "results.json").read_text())["flow_length"] == 2
    assert not (sweep / "0" / "error.txt").exists()


@pytest.mark.slow
def test_hand_run_profile_sweeps_do_not_collide(tmp_path):
    """Two hand-run sweeps of one profile that differ in an override each get their own folder (issue: the second
    was refused because both wrote into the folder ``make reproduce`` uses)."""
    fast = ["-m", "experiment=mnist_smoke", "dataset=fake", "posterior=planar_2", "eval.max_images=10",
            "eval.num_samples=5", "trainer.val_images=20", "hydra/job_logging=none",
            "hydra/hydra_logging=none"]  # fmt: skip
    for steps in (2, 3):
        proc = nfvi("train", *fast, f"trainer.steps={steps}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
    sweeps = sorted((tmp_path / "outputs" / "multirun" / "train" / "mnist_smoke").iterdir())
    assert len(sweeps) == 2
    steps = sorted(json.loads(p.read_text())["steps"] for p in tmp_path.rglob("results.json"))
    assert steps == [2, 3]
    assert not (tmp_path / "outputs" / "reproduce").exists()
