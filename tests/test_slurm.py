"""``hydra/launcher=slurm`` (:mod:`nfvi.slurm`): unit tests, and sweeps on a real one-node SLURM cluster.

The ``slurm`` tests start the cluster themselves (``scripts/slurm_local.sh up``, which installs slurm-wlm and munge
with apt-get when missing) and stop it at the end, also after a failure. They need Linux and root, and run only
when asked for (``pytest -m slurm``, ``make test-slurm``): they install packages and start daemons.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from nfvi.errors import NfviError
from nfvi.slurm import FINISHED_STATES, check_timing, job_states, restart_overrides

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_local.sh"

# ---------------------------------------------------------------------------------------------------------------------
# Without a cluster


def test_signal_delay_must_fit_in_the_time_limit():
    check_timing(2880, 120)
    check_timing(1, 12)
    with pytest.raises(
        NfviError, match=r"signal_delay_s=120 is not allowed with hydra.launcher.timeout_min=2; use 1 to 24"
    ):
        check_timing(2, 120)
    with pytest.raises(NfviError, match="signal_delay_s=0"):
        check_timing(60, 0)


def test_a_restarted_job_resumes_and_never_overwrites():
    config = {"resume": False, "overwrite": False, "seed": 0}
    assert restart_overrides(["seed=1", "overwrite=true", "+resume=false"], config) == [
        "seed=1",
        "resume=true",
        "overwrite=false",
    ]
    assert restart_overrides(["seed=1"], {"seed": 0}) == ["seed=1"]  # a command without these keys


def test_job_states_from_squeue(tmp_path, monkeypatch):
    fake = tmp_path / "squeue"
    fake.write_text("#!/bin/sh\necho '7_0|COMPLETED'\necho '7_1|RUNNING'\necho '8|PENDING'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    states = job_states(["7_0", "7_1", "7_2", "8"])
    assert states == {"7_0": "COMPLETED", "7_1": "RUNNING", "7_2": "ENDED", "8": "PENDING"}
    assert {"COMPLETED", "ENDED"} <= FINISHED_STATES and not {"RUNNING", "PENDING", "REQUEUED"} & FINISHED_STATES
    fake.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Invalid job id specified' >&2\nexit 1\n")
    assert job_states(["9_0"]) == {"9_0": "ENDED"}
    fake.write_text("#!/bin/sh\necho 'Unable to contact slurm controller' >&2\nexit 1\n")
    assert job_states(["9_0"]) is None


def nfvi(*args, cwd, timeout=600, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "nfvi", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_a_signal_delay_that_leaves_no_time_is_refused_before_submitting(tmp_path):
    args = ["-m", "hydra/launcher=slurm", "hydra.launcher.timeout_min=2", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    result = nfvi("energy", *args, cwd=tmp_path, timeout=120, env={"PATH": "/nonexistent"})  # no sbatch reached
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "nfvi energy: error: hydra.launcher.signal_delay_s=120 is not allowed with hydra.launcher.timeout_min=2; "
        "use 1 to 24 (at most a fifth of the time limit, so that the time-limit signal does not come at once)"
    )


# ---------------------------------------------------------------------------------------------------------------------
# On a one-node cluster started by the tests


def _cannot_run_slurm(config) -> str | None:
    if "slurm" not in (config.getoption("-m") or ""):
        return "runs only when asked for (pytest -m slurm, make test-slurm): installs slurm-wlm and starts daemons"
    if platform.system() != "Linux":
        return f"needs Linux (this is {platform.system()})"
    if os.geteuid() != 0:
        return "needs root (to start the SLURM daemons and install slurm-wlm)"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "slurm-wlm is not installed and there is no apt-get to install it"
    return None


@pytest.fixture(scope="session")
def slurm_cluster(request):
    """A one-node SLURM cluster for this session (and pytest-xdist worker): ``SLURM_CONF`` points at it; the cluster
    is stopped at the end of the session, also when a test or the start itself failed (its folder, with the daemons'
    logs, is then kept)."""
    reason = _cannot_run_slurm(request.config)
    if reason:
        pytest.skip(f"SLURM tests: {reason}")
    worker = int(re.sub(r"\D", "", os.environ.get("PYTEST_XDIST_WORKER", "")) or 0)
    folder = Path(tempfile.mkdtemp(prefix="nfvi-slurm-"))  # not under pytest's 0700 folder: munged runs as munge
    folder.chmod(0o755)
    env = {**os.environ, "NFVI_SLURM_PORT": str(6817 + 2 * worker)}
    old_conf = os.environ.get("SLURM_CONF")
    try:
        up = subprocess.run([str(SCRIPT), "up", str(folder)], capture_output=True, text=True, env=env, timeout=300)
        assert up.returncode == 0, f"slurm_local.sh up failed:\n{up.stdout}{up.stderr}"
        os.environ["SLURM_CONF"] = str(folder / "etc" / "slurm.conf")
        yield folder
    finally:
        subprocess.run([str(SCRIPT), "down", str(folder)], capture_output=True, env=env, timeout=120)
        if request.session.testsfailed == 0:
            shutil.rmtree(folder, ignore_errors=True)  # kept, with the daemons' logs, when a test failed
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf


#: small jobs: no GPU, one core, 1 GB (the one-node cluster has 2 cores on CI)
SLURM = [
    "hydra/launcher=slurm",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.timeout_min=10",
]
ENERGY = ["-m", "target=U1", "flow=planar", "flow.length=2", "trainer.steps=40", "eval.samples=500", "eval.grid=40"]
#: nfvi train on fake data, about 10-30 s: a checkpoint every 10 of STEPS updates (enough for an interrupt to land
#: before the end on an idle machine)
STEPS = 1000
TRAIN = [
    "-m",
    "experiment=mnist_smoke",
    "dataset=fake",
    "dataset.fake_size=200",
    "posterior=planar_2",
    f"trainer.steps={STEPS}",
    "trainer.ckpt_every=10",
    "trainer.val_every=100",
    "trainer.val_images=100",
    "eval.num_samples=4",
    "eval.max_images=20",
    "threads=1",
]


def scontrol_job(job_id: str) -> dict[str, str]:
    """``scontrol show job`` of one job (``<array>_<index>``) as a dict (JobState, ExitCode, Restarts, ...)."""
    text = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


def final_state(job_id: str) -> dict[str, str]:
    """``scontrol show job`` once the job has ended (the driver may return while SLURM still says COMPLETING)."""
    return wait_for(lambda: (job := scontrol_job(job_id))["JobState"] in FINISHED_STATES and job, f"{job_id} to end")


def job_ids(output: str) -> list[str]:
    """The SLURM job ids the driver logged (``#<num> : SLURM job <id>, logs in ...``), in job order."""
    return re.findall(r"#\d+ : SLURM job (\S+),", output)


def numbers(results: dict) -> dict:
    """The numbers of a ``results.json`` that depend on the seeds only (no times, hosts, versions or paths)."""
    skip = ("time", "wall", "_at", "per_s", "host", "version", "run_dir", "threads", "device", "git_")
    return {k: v for k, v in results.items() if isinstance(v, (int, float)) and not any(s in k for s in skip)}


@pytest.mark.slurm
def test_energy_sweep_on_slurm_gives_the_basic_launchers_numbers(slurm_cluster, tmp_path):
    basic = nfvi("energy", *ENERGY, "seed=0,1", f"hydra.sweep.dir={tmp_path / 'basic'}", cwd=tmp_path)
    assert basic.returncode == 0, basic.stderr
    sweep = tmp_path / "slurm"
    result = nfvi("energy", *ENERGY, "seed=0,1", *SLURM, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = sorted(p.parent.name for p in sweep.glob("*/results.json"))
    assert len(jobs) == 2
    for name in jobs:
        mine = json.loads((sweep / name / "results.json").read_text())
        theirs = json.loads((tmp_path / "basic" / name / "results.json").read_text())
        assert numbers(mine) == numbers(theirs) and len(numbers(mine)) >= 3
        assert (sweep / name / "energy.log").stat().st_size > 0  # the job's log in its folder, as on every launcher
    ids = job_ids(result.stdout + result.stderr)
    assert len(ids) == 2
    for job_id in ids:
        job = final_state(job_id)
        assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0")
        assert (sweep / ".submitit" / job_id / f"{job_id}_0_log.out").is_file()


@pytest.mark.slurm
def test_a_failed_job_is_recorded_failed_by_slurm(slurm_cluster, tmp_path):
    sweep = tmp_path / "sweep"
    args = [*ENERGY, "trainer.steps=-1", *SLURM, f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=job"]
    result = nfvi("energy", *args, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "nfvi energy: error: job job: trainer.steps=-1 is not allowed" in result.stderr
    line, traceback = (sweep / "job" / "error.txt").read_text().split("\n", 1)
    assert line.startswith("nfvi energy: error: trainer.steps=-1 is not allowed") and "Traceback" in traceback
    (job_id,) = job_ids(result.stdout + result.stderr)
    job = final_state(job_id)
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "1:0")
    record = (slurm_cluster / "log" / "jobcomp.txt").read_text().splitlines()
    assert any(f"JobId={job['JobId']} " in r and "JobState=FAILED" in r and "ExitCode=1:0" in r for r in record)


@contextlib.contextmanager
def train_driver(*args, cwd: Path):
    """Run ``nfvi train args`` (a sweep's driver) in the background, its output in a file; yields ``(proc, log)``.
    On the way out of a failed test the driver is killed and its SLURM jobs cancelled: nothing is left running."""
    log = cwd / f"driver-{time.monotonic_ns()}.err"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with log.open("w") as err:
        command_line = [sys.executable, "-m", "nfvi", "train", *args]
        proc = subprocess.Popen(command_line, cwd=cwd, stdout=err, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", *job_ids(log.read_text())], check=False)


def wait_for(condition, what: str, timeout: float = 180.0, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the sweep ended (exit {proc.returncode}) before {what}")
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def checkpoint_step(folder: Path) -> int:
    """The step of ``folder``'s last ``metrics.csv`` row (0 when there is none yet)."""
    try:
        rows = (folder / "metrics.csv").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return int(float(rows[-1].split(",")[0])) if len(rows) > 1 else 0


@pytest.fixture(scope="module")
def uninterrupted_train(tmp_path_factory):
    """The TRAIN run through Hydra's basic launcher: its final checkpoint and results."""
    folder = tmp_path_factory.mktemp("basic")
    result = nfvi("train", *TRAIN, f"hydra.sweep.dir={folder}", cwd=folder)
    assert result.returncode == 0, result.stderr
    run = folder / "planar_K2_seed0"
    return torch.load(run / "checkpoint.pt", weights_only=True), json.loads((run / "results.json").read_text())


def interrupted_train(tmp_path: Path, interrupt) -> tuple[Path, str, str]:
    """Run TRAIN on SLURM, call ``interrupt(job_id)`` once the job has checkpointed (step 10 or later, before the
    end), let it run again and finish. Returns the run folder, the job id and the driver's stderr."""
    sweep = tmp_path / "slurm"
    run = sweep / "planar_K2_seed0"
    with train_driver(*TRAIN, *SLURM, f"hydra.sweep.dir={sweep}", cwd=tmp_path) as (proc, log):
        (job_id,) = wait_for(lambda: job_ids(log.read_text()), "sbatch")
        early = lambda: 10 <= checkpoint_step(run) < STEPS // 2 and (run / "checkpoint.pt").is_file()  # noqa: E731
        wait_for(early, "a checkpoint", proc=proc)
        interrupt(job_id)
        proc.wait(timeout=300)
    stderr = log.read_text()
    assert proc.returncode == 0, stderr
    return run, job_id, stderr


def assert_same_run(run: Path, uninterrupted) -> None:
    state, results = uninterrupted
    mine = torch.load(run / "checkpoint.pt", weights_only=True)
    assert mine["step"] == state["step"] == STEPS
    assert mine["model"].keys() == state["model"].keys()
    assert all(torch.equal(mine["model"][k], state["model"][k]) for k in state["model"])  # bit-identical
    assert numbers(json.loads((run / "results.json").read_text())) == numbers(results)
    assert re.search(rf"resuming .* at step \d+ of {STEPS}", (run / "train.log").read_text())


@pytest.mark.slurm
def test_a_requeued_train_job_resumes_and_ends_bit_identical(slurm_cluster, tmp_path, uninterrupted_train):
    """``scontrol requeue`` (what preemption does): SIGTERM, the job saves its checkpoint and ends; SLURM runs it
    again (SLURM_RESTART_COUNT=1) and nfvi continues the checkpoint."""

    def requeue(job_id):
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        wait_for(lambda: scontrol_job(job_id)["JobState"] == "PENDING", "the job to be pending again")
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)

    run, job_id, _ = interrupted_train(tmp_path, requeue)
    assert_same_run(run, uninterrupted_train)
    job = final_state(job_id)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1")


@pytest.mark.slurm
def test_the_time_limit_signal_requeues_and_resumes_bit_identical(slurm_cluster, tmp_path, uninterrupted_train):
    """USR2, which SLURM sends ``signal_delay_s`` before the time limit: submitit requeues the job through the
    launcher's checkpoint hook, and it runs again from its last checkpoint."""

    def time_limit_signal(job_id):
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)

    run, job_id, _ = interrupted_train(tmp_path, time_limit_signal)
    assert_same_run(run, uninterrupted_train)
    job = final_state(job_id)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1")


@pytest.mark.slurm
def test_a_job_killed_hard_fails_the_sweep_in_bounded_time(slurm_cluster, tmp_path):
    """SIGKILL (what the OOM killer or os._exit leave behind: no result): the driver notices through squeue, writes
    the job's error.txt, and the sweep exits 1 within RESULT_GRACE_S and a few polls."""
    sweep = tmp_path / "slurm"
    endless = [a if not a.startswith("trainer.steps=") else "trainer.steps=1000000" for a in TRAIN]  # never done first
    run = sweep / "planar_K2_seed0"
    with train_driver(*endless, *SLURM, f"hydra.sweep.dir={sweep}", cwd=tmp_path) as (proc, log):
        (job_id,) = wait_for(lambda: job_ids(log.read_text()), "sbatch")
        wait_for(lambda: checkpoint_step(run) >= 10, "the job to train", proc=proc)
        subprocess.run(["scancel", "--signal=KILL", job_id], check=True)
        killed = time.monotonic()
        proc.wait(timeout=120)
        waited = time.monotonic() - killed
    stderr = log.read_text()
    assert proc.returncode == 1, stderr
    assert waited < 60, waited
    line = (run / "error.txt").read_text().splitlines()[0]
    assert line.startswith(f"nfvi train: error: SLURM job {job_id} ended without a result"), line
    assert f"nfvi train: error: job planar_K2_seed0: SLURM job {job_id} ended without a result" in stderr
    assert final_state(job_id)["JobState"] in FINISHED_STATES


def test_a_requeued_slurm_job_takes_over_the_lock_of_its_killed_attempt_on_another_node(tmp_path, monkeypatch):
    """A job killed hard on one node (its lock left behind) and requeued onto another finds a lock of another host:
    the same SLURM job id at a lower restart count is an attempt that is over, so the lock is stale."""
    import json

    from nfvi.runs import LOCK, read_lock

    lock = {"pid": 4242, "host": "node-that-died", "command": "train", "slurm_job": "77", "slurm_restart": 0}
    (tmp_path / LOCK).write_text(json.dumps(lock))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    holder, why = read_lock(tmp_path)
    assert holder["host"] == "node-that-died" and "attempt 0 of SLURM job 77" in why
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # the same attempt (or another job): held by the other host
    assert read_lock(tmp_path)[1] is None
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "5")
    assert read_lock(tmp_path)[1] is None
