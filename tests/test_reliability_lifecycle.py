"""Issue 21, points 1, 2, 5 and 6: a refused run changes nothing, lock files are read defensively and created
atomically, exit codes are honest, and Ctrl-C ends every command (and a sweep, with its workers) in one line.

Each test is named after its point of the issue (docs/reliability.md maps them). Tiny runs on fake data; the tests
that need real concurrency or signals use child processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nfvi.cli
from nfvi.errors import NfviError, RunRefused
from nfvi.runs import LOCK, Run, acquire_lock, read_lock, release_lock
from tests.conftest import REPO
from tests.test_reliability import CDE, ENERGY, EVAL
from tests.test_train import cfg_of

QUIET = ["hydra/job_logging=none", "hydra/hydra_logging=none"]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
ENV.pop("HYDRA_FULL_ERROR", None)


def cli(monkeypatch, tmp_path, *args: str) -> int:
    """``nfvi *args`` in this process (from ``tmp_path``); the exit status."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() sets sys.argv for Hydra
    with pytest.raises(SystemExit) as info:
        nfvi.cli.main([*args, *QUIET])
        raise SystemExit(0)
    return info.value.code


def error_lines(text: str) -> list[str]:
    """The lines of stderr that are not log lines (``[time][logger][LEVEL] - ...``) nor Python warnings (loky's
    resource tracker warns of the semaphores of an interrupted sweep)."""
    return [
        line for line in text.splitlines() if line.strip() and not line.startswith("[") and "warn" not in line.lower()
    ]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (hidden ones too) -> a hash of its bytes."""
    return {
        str(p.relative_to(folder)) + ("/" if p.is_dir() else ""): ""
        if p.is_dir()
        else hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


def default_sigint() -> None:
    """In a child before it starts: Ctrl-C's default action, as in a terminal (a test run started in the background
    of a shell without job control inherits SIGINT ignored, and Python then installs no KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def nfvi_child(cwd: Path, *args: str, **kwargs) -> subprocess.Popen:
    """``nfvi *args`` in a child process started in ``cwd``, with Ctrl-C's default action (:func:`default_sigint`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "nfvi", *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=default_sigint, **kwargs,
    )  # fmt: skip


def wait_for(condition, timeout: float = 180.0, what: str = "") -> None:
    start = time.time()
    while not condition():
        assert time.time() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.1)


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has ended
    except FileNotFoundError:
        return True


HOLD = """
import sys, time
from nfvi.runs import acquire_lock
acquire_lock(sys.argv[1], sys.argv[2])
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder():
    """``hold(folder, command)``: another process that holds ``folder``'s lock (killed at the end)."""
    processes = []

    def hold(folder: Path, command: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), command], env=ENV, stdout=subprocess.PIPE,
                                text=True)  # fmt: skip
        processes.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in processes:
        proc.kill()
        proc.wait()


def finished_energy(monkeypatch, folder: Path) -> None:
    assert cli(monkeypatch, folder.parent, "energy", *ENERGY, f"hydra.run.dir={folder}") == 0
    assert (folder / "results.json").is_file()


# -- 1. a refused run changes nothing ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "command, args",
    [("energy", ENERGY), ("cde", CDE), ("train", ["dataset=fake", "trainer.steps=2"])],
)
def test_1_a_launch_into_a_folder_another_process_holds_changes_nothing(
    command, args, holder, monkeypatch, tmp_path, capsys
):
    """``nfvi energy ... & nfvi energy ...`` into one folder: the second removed the first's folder."""
    folder = tmp_path / "C1"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("the running launch\n")
    (folder / "run.json").write_text(json.dumps({"command": command, "config": {}}))
    (folder / f"{command}.log").write_text("[...] the running job's log\n")
    (folder / "metrics.csv").write_text("step,loss\n1,2.0\n")
    proc = holder(folder, command)
    before = snapshot(folder)
    where = f"run_dir={folder}" if command == "train" else f"hydra.run.dir={folder}"
    assert cli(monkeypatch, tmp_path, command, *args, where) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(f"nfvi {command}: error: {folder} is in use by another run (pid {proc.pid} on ")
    assert snapshot(folder) == before  # no error.txt, no log line, .hydra/ untouched, nothing removed


RACER = """
import os, sys, time
import nfvi.cli, nfvi.energy.task
go = sys.argv[1]
open(f"{go}.ready-{os.getpid()}", "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
nfvi.cli.main(sys.argv[2:])
"""


@pytest.mark.slow
def test_1_two_launches_of_one_folder_at_the_same_instant_one_runs_the_other_exits_2(monkeypatch, tmp_path):
    """Two ``resume=true`` launches of one unfinished folder at the same instant destroyed it in 2 of 3 tries."""
    folder = tmp_path / "C1"
    finished_energy(monkeypatch, folder)
    (folder / "results.json").unlink()  # unfinished: resume=true runs it again
    go = tmp_path / "go"
    args = ["energy", *ENERGY, f"hydra.run.dir={folder}", "resume=true"]
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(go), *args],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    wait_for(lambda: len(list(tmp_path.glob("go.ready-*"))) == 2, what="both racers at the barrier")
    go.write_text("go")
    results = [(r.wait(timeout=300), r.stderr.read()) for r in racers]
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert len(error_lines(refused)) == 1 and "is in use by another run" in refused, refused
    assert json.loads((folder / "run.json").read_text())["command"] == "energy"
    assert (folder / "results.json").is_file() and not (folder / "error.txt").exists()
    assert not (folder / LOCK).exists()


def test_1_a_refused_cde_leaves_no_log_and_no_error_txt_in_another_runs_folder(monkeypatch, tmp_path, capsys):
    """A refused cde left ``error.txt`` in another run's finished folder, ``nfvi cde`` into an energy folder a
    ``cde.log``; a refused second ``nfvi energy`` (no resume) wrote ``error.txt`` into the finished run."""
    energy_run, cde_run = tmp_path / "energy_run", tmp_path / "cde_run"
    finished_energy(monkeypatch, energy_run)
    assert cli(monkeypatch, tmp_path, "cde", *CDE, f"hydra.run.dir={cde_run}") == 0
    capsys.readouterr()
    for folder, command, args in [
        (energy_run, "cde", CDE),  # another command's run
        (energy_run, "energy", ENERGY),  # a finished run, neither resumed nor overwritten
        (energy_run, "energy", [*ENERGY, "trainer.steps=21", "resume=true"]),  # other settings
        (cde_run, "cde", CDE),
        (cde_run, "energy", ENERGY),
    ]:
        before = snapshot(folder)
        assert cli(monkeypatch, tmp_path, command, *args, f"hydra.run.dir={folder}") == 2
        (line,) = error_lines(capsys.readouterr().err)
        assert line.startswith(f"nfvi {command}: error: {folder} holds a ")
        assert snapshot(folder) == before, (folder.name, command)


def test_1_only_the_process_that_created_a_folder_removes_it(monkeypatch, tmp_path, capsys):
    new, existing = tmp_path / "out" / "new", tmp_path / "existing"
    existing.mkdir()  # made by someone else, e.g. the user
    for folder in (new, existing):
        assert cli(monkeypatch, tmp_path, "energy", *ENERGY, "trainer.steps=-1", f"hydra.run.dir={folder}") == 2
        assert "trainer.steps=-1 is not allowed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # this launch made out/ and out/new: it removed both
    assert existing.is_dir() and not (existing / LOCK).exists()  # kept


# -- 2. lock files read defensively, created atomically ----------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize(
    "content, why",
    [
        ("garbage{", "it does not parse"),
        ("", "it is empty"),
        ("[]", "it does not parse"),
        ('{"pid": "abc"}', "it names no process id (pid 'abc')"),
        ('{"host": "vm"}', "it names no process id (pid None)"),
        ('{"pid": true}', "it names no process id (pid True)"),
        ('{"pid": -4}', "it names no process id (pid -4)"),
        ("DEAD", "its process {pid} is gone"),
    ],
)
def test_2_a_lock_that_does_not_parse_or_names_no_live_process_is_taken_over(content, why, tmp_path, caplog):
    from omegaconf import OmegaConf

    if content == "DEAD":
        pid = _dead_pid()
        content = json.dumps({"pid": pid, "host": socket.gethostname(), "command": "cde", "started_at": "x"})
        why = why.format(pid=pid)
    (tmp_path / LOCK).write_text(content)
    with Run(tmp_path, "energy", OmegaConf.create({"resume": False, "overwrite": False})) as run:
        assert json.loads(run.lock_path.read_text())["pid"] == os.getpid()
    notices = [r.getMessage() for r in caplog.records if "stale lock" in r.getMessage()]
    assert notices == [f"taking over the stale lock {tmp_path / LOCK} ({why})"]
    assert not (tmp_path / LOCK).exists()  # released


def test_2_a_lock_from_another_host_is_refused_saying_how_to_clear_it(tmp_path):
    lock = {"pid": 4242, "host": "gpu-node-7", "command": "train", "started_at": "2026-12-05T10:00:00+0000"}
    (tmp_path / LOCK).write_text(json.dumps(lock))
    with pytest.raises(RunRefused) as err, Run(tmp_path, "evaluate", claim=False):
        pass
    message = str(err.value)
    assert "\n" not in message and "pid 4242 on host gpu-node-7 (nfvi train" in message
    assert f"if no nfvi process on gpu-node-7 uses it any more, remove {tmp_path / LOCK} and launch again" in message
    assert json.loads((tmp_path / LOCK).read_text()) == lock and read_lock(tmp_path) == (lock, None)


def test_2_the_lock_is_re_entrant_in_one_process_and_released_only_by_its_owner(tmp_path):
    assert acquire_lock(tmp_path, "energy") is None
    assert acquire_lock(tmp_path, "energy") is None  # nfvi.cli's claim, then the task's Run
    release_lock(tmp_path)
    assert (tmp_path / LOCK).exists()
    (tmp_path / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "theirs"}))  # replaced
    release_lock(tmp_path)
    assert (tmp_path / LOCK).exists()  # not ours any more: left alone


CONTENDER = """
import os, sys, time
from nfvi.errors import RunRefused
from nfvi.runs import acquire_lock, release_lock
folder, go = sys.argv[1], sys.argv[2]
open(f"{go}.ready-{os.getpid()}", "w").close()
while not os.path.exists(go):
    time.sleep(0.0005)
try:
    acquire_lock(folder, "energy")
except RunRefused:
    sys.exit(2)
open(os.path.join(folder, f"won-{os.getpid()}"), "w").close()
time.sleep(3)
release_lock(folder)
"""


@pytest.mark.slow
@pytest.mark.parametrize("stale", ["", '{"pid": 999999999}'])
def test_2_racing_processes_never_both_take_the_lock(stale, tmp_path):
    """Creation is atomic (a whole file hard-linked into place), stale-lock takeover serialised: one winner."""
    folder, go = tmp_path / "run", tmp_path / "go"
    folder.mkdir()
    (folder / LOCK).write_text(stale)
    contenders = [
        subprocess.Popen([sys.executable, "-c", CONTENDER, str(folder), str(go)], env=ENV, stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    wait_for(lambda: len(list(tmp_path.glob("go.ready-*"))) == 4, what="all contenders at the barrier")
    go.write_text("go")
    codes = sorted(c.wait(timeout=120) for c in contenders)
    assert codes == [0, 2, 2, 2], [c.stderr.read() for c in contenders]
    assert len(list(folder.glob("won-*"))) == 1 and not (folder / LOCK).exists()
    assert not list(folder.glob("*.tmp"))


# -- 5. honest exit codes ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three tiny trained runs one level below a sweep folder."""
    from nfvi.vae import task as train_mod

    root = tmp_path_factory.mktemp("trained")
    for k in (0, 1, 2):
        train_mod.train(cfg_of("trainer.steps=2", f"flow.length={k}"), root / f"{k}_k{k}")
    return root


def test_5_evaluate_a_run_locked_by_another_host_exits_non_zero(trained, monkeypatch, tmp_path, capsys):
    """``nfvi evaluate run_dir=T1`` with T1 locked by another host: "skipping T1", exit 0, nothing done."""
    run = tmp_path / "T1"
    shutil.copytree(trained / "0_k0", run)
    (run / LOCK).write_text(json.dumps({"pid": 77, "host": "other-host", "command": "train", "started_at": "x"}))
    assert cli(monkeypatch, tmp_path, "evaluate", f"run_dir={run}", *EVAL) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"{run} is locked by pid 77 on host other-host" in line and "remove" in line
    assert not (run / "evaluations").exists()
    (run / LOCK).write_text("garbage{")  # stale: taken over, evaluated
    assert cli(monkeypatch, tmp_path, "evaluate", f"run_dir={run}", *EVAL) == 0
    assert (run / "evaluations").is_dir() and not (run / LOCK).exists()


def test_5_a_sweep_folder_evaluate_reports_each_bad_run_and_evaluates_the_rest(trained, monkeypatch, tmp_path, capsys):
    """One truncated checkpoint stopped the evaluation of the whole sweep folder (with or without resume=true)."""
    sweep = tmp_path / "sweep"
    shutil.copytree(trained, sweep)
    bad = sweep / "1_k1" / "checkpoint.pt"
    bad.write_bytes(bad.read_bytes()[:100])
    for extra in ([], ["resume=true"]):
        assert cli(monkeypatch, tmp_path, "evaluate", f"run_dir={sweep}", *EVAL, *extra) == 2
        err = capsys.readouterr().err
        assert len([line for line in err.splitlines() if f"not evaluated: {bad.parent}:" in line]) == 1
        assert f"1 of 3 runs were not evaluated (each named above): {bad.parent}" in err
        assert all((sweep / name / "evaluations").is_dir() for name in ("0_k0", "2_k2"))
        assert not (bad.parent / "evaluations").exists()


def test_5_sweep_failures_are_found_wherever_the_job_folders_are(monkeypatch, tmp_path, capsys):
    """``hydra.sweep.subdir=../out_${hydra.job.num}``: the failed job lay outside the sweep folder, exit 0."""
    from tests import test_reliability_cli as stand_ins

    monkeypatch.setitem(nfvi.cli.COMMANDS, "energy", (stand_ins.__name__, "fail_on_u2", "a failing stand-in"))
    sweep = tmp_path / "sweep"
    args = ["energy", "-m", "target=U1,U2", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=../out_${hydra.job.num}"]
    assert cli(monkeypatch, tmp_path, *args) == 1
    err = capsys.readouterr().err
    assert "nfvi energy: error: job ../out_1: ValueError: U2 job failed" in err
    assert (tmp_path / "out_1" / "error.txt").is_file() and (tmp_path / "out_0" / "done.txt").is_file()


def test_5_a_refused_sweep_job_fails_the_sweep_and_writes_nothing_in_its_folder(monkeypatch, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    args = ["energy", "-m", *ENERGY, "seed=0,1", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${seed}"]
    assert cli(monkeypatch, tmp_path, *args) == 0
    before = snapshot(sweep / "1")
    (sweep / "0" / "results.json").unlink()  # job 0 is unfinished: without resume=true both are refused
    assert cli(monkeypatch, tmp_path, *args) == 1
    err = capsys.readouterr().err
    assert "job 0: " in err and "job 1: " in err and "2 job(s) of the sweep failed" in err
    assert snapshot(sweep / "1") == before and not (sweep / "0" / "error.txt").exists()


# -- 6. interrupts -----------------------------------------------------------------------------------------------------
REPORT_STAND_IN = """
import sys, time, nfvi.cli as c, nfvi.reports.task
mark = sys.argv[1]
def slow_report(cfg):
    open(mark, "w").close()
    time.sleep(120)
sys.modules["__main__"].slow_report = slow_report
c.COMMANDS["report"] = ("__main__", "slow_report", "")
c.main(["report", *sys.argv[2:]])
"""


def _interrupt(proc: subprocess.Popen, started) -> tuple[int, str]:
    try:
        wait_for(lambda: started() or proc.poll() is not None, what="the command to start")
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        proc.stdout_text = out
        return proc.returncode, err
    finally:
        proc.kill()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["energy", "cde", "evaluate", "train", "report"])
def test_6_sigint_ends_each_command_in_one_line_with_exit_130(command, trained, tmp_path):
    """Ctrl-C during energy, cde, evaluate or report printed a full KeyboardInterrupt traceback."""
    folder = tmp_path / "run"
    if command == "energy":
        proc = nfvi_child(tmp_path, "energy", *ENERGY, "trainer.steps=1000000", f"hydra.run.dir={folder}")
        started = (folder / "metrics.csv").exists
    elif command == "cde":
        args = [*CDE, "max_epochs=100000", "synthetic_size=2000", "patience=100000"]
        proc = nfvi_child(tmp_path, "cde", *args, f"hydra.run.dir={folder}")
        started = (folder / "metrics.csv").exists
    elif command == "evaluate":
        shutil.copytree(trained / "0_k0", folder)
        proc = nfvi_child(tmp_path, "evaluate", f"run_dir={folder}", "eval.num_samples=100000", "eval.progress=false")
        started = (folder / "evaluate.log").exists
    elif command == "train":
        args = ["dataset=fake", "trainer.steps=1000000", "trainer.log_every=5", f"run_dir={folder}"]
        proc = nfvi_child(tmp_path, "train", *args)
        started = (folder / "metrics.csv").exists
    else:
        mark = tmp_path / "started"
        code = [sys.executable, "-c", REPORT_STAND_IN, str(mark), f"paths.output_dir={tmp_path}"]
        proc = subprocess.Popen(code, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=default_sigint)  # fmt: skip
        started = mark.exists
    code, err = _interrupt(proc, started)
    assert code == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    lines = error_lines(err)
    if command == "train":  # the trainer's own line (a log line, on stdout): the checkpoint is saved, how to resume
        assert lines == [] and "SIGINT at step" in proc.stdout_text and "continue with: nfvi train" in proc.stdout_text
    else:
        assert lines == [f"nfvi {command}: interrupted (Ctrl-C); what was written so far is kept"], err
    assert not (folder / LOCK).exists()


@pytest.mark.slow
def test_6_the_resume_command_printed_after_ctrl_c_keeps_the_overrides_and_works_as_pasted(tmp_path):
    """The printed resume command dropped the original overrides and was refused when pasted."""
    folder = tmp_path / "a run [1]"  # a space and a glob character: the command must quote them
    args = ["train", "dataset=fake", "experiment=mnist_smoke", "trainer.steps=300", "trainer.log_every=10",
            "optim.lr=0.002", "eval.num_samples=2", "eval.max_images=10", f"run_dir='{folder}'"]  # fmt: skip
    proc = nfvi_child(tmp_path, *args)
    code, err = _interrupt(proc, (folder / "metrics.csv").exists)
    if code == 0:
        pytest.skip("the run ended before the interrupt")
    assert code == 130, err
    (command,) = re.findall(r"continue with: (.*)$", proc.stdout_text, flags=re.M)
    words = shlex.split(command)
    assert words == ["nfvi", *args[:-1], "resume=true", f"run_dir='{folder}'"]
    resumed = subprocess.run([sys.executable, "-m", "nfvi", *words[1:]], env=ENV, capture_output=True, text=True,
                             timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout + resumed.stderr
    assert json.loads((folder / "results.json").read_text())["steps"] == 300


SWEEP = ["energy", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "target=U1,U2", *ENERGY,
         "trainer.steps=1000000"]  # fmt: skip


def _start_sweep(tmp_path) -> tuple[subprocess.Popen, Path, list[int]]:
    sweep = tmp_path / "sweep"
    proc = nfvi_child(tmp_path, *SWEEP, f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}",
                      start_new_session=True)  # fmt: skip
    jobs = [sweep / "0", sweep / "1"]
    wait_for(lambda: all((j / "metrics.csv").exists() for j in jobs) or proc.poll() is not None, what="the jobs")
    assert proc.poll() is None, proc.communicate()
    return proc, sweep, [json.loads((j / LOCK).read_text())["pid"] for j in jobs]


@pytest.mark.slow
def test_6_sigint_ends_a_joblib_sweep_in_one_line_and_its_workers_release_their_locks(tmp_path):
    proc, sweep, workers = _start_sweep(tmp_path)
    try:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground process group
        code, err = proc.wait(timeout=120), proc.communicate()[1]
    finally:
        proc.kill()
    assert code == 130 and error_lines(err) == ["nfvi energy: interrupted (Ctrl-C); what was written so far is kept"]
    wait_for(lambda: all(gone(pid) for pid in workers), timeout=60, what="the workers to end")
    assert not list(sweep.glob(f"*/{LOCK}"))


@pytest.mark.slow
def test_6_a_joblib_sweeps_workers_end_after_sigkill_of_the_parent(tmp_path):
    """After SIGKILL of a joblib sweep's parent its loky workers ran on for more than 5 minutes."""
    proc, sweep, workers = _start_sweep(tmp_path)
    try:
        proc.kill()  # SIGKILL: no handler runs in the parent
        proc.wait()
        wait_for(lambda: all(gone(pid) for pid in workers), timeout=60, what="the workers to end")
    finally:
        for pid in workers:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
    assert not list(sweep.glob(f"*/{LOCK}"))  # each worker ended through SIGTERM: its lock released


def test_the_python_api_refuses_a_held_folder_with_run_refused(tmp_path, holder):
    holder(tmp_path, "train")
    with pytest.raises(RunRefused, match="is in use by another run"), Run(tmp_path, "energy"):
        pass
    assert issubclass(RunRefused, NfviError)
