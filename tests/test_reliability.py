"""Run folders (nfvi.runs.Run): one run per folder, resume/overwrite for every command, environment faults in one
line, non-finite results, and what ``nfvi evaluate`` may write (tiny runs on fake data)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from nfvi.cde import task as cde_task
from nfvi.energy import task as energy_task
from nfvi.errors import NfviError
from nfvi.vae import evaluate as evaluate_mod
from nfvi.vae import task as train_mod
from nfvi.vae.checkpoint import load_checkpoint
from tests.conftest import compose
from tests.test_train import cfg_of

ENERGY = ["trainer.steps=20", "trainer.log_every=10", "eval.samples=500", "eval.grid=20", "device=cpu", "flow.length=2"]
CDE = ["dataset=sine", "seeds=[0]", "max_epochs=2", "synthetic_size=100", "hidden=[4]"]
EVAL = ["eval.num_samples=4", "eval.elbo_samples=1", "eval.max_images=20", "eval.progress=false", "device=cpu"]


def energy(folder, *overrides):
    cwd = os.getcwd()
    os.chdir(folder)  # outside Hydra the run folder is the working directory
    try:
        return energy_task.run(compose("energy", [*ENERGY, *overrides]))
    finally:
        os.chdir(cwd)


def nfvi(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "nfvi", *args], cwd=cwd, capture_output=True, text=True, env=env)


def no_nan_token(folder) -> bool:
    return all("NaN" not in p.read_text() and "Infinity" not in p.read_text() for p in folder.rglob("*.json"))


# -- one run per folder ------------------------------------------------------------------------------------------------
def test_another_commands_folder_is_refused_unless_overwrite(tmp_path):
    energy(tmp_path)
    with pytest.raises(NfviError, match="holds a run of nfvi energy; use another folder, or overwrite=true"):
        train_mod.train(cfg_of("trainer.steps=2"), tmp_path)
    with pytest.raises(NfviError, match="holds a run of nfvi energy"):
        cde_task.run_cde(compose("cde", CDE), tmp_path)
    assert json.loads((tmp_path / "run.json").read_text())["command"] == "energy"  # untouched
    train_mod.train(cfg_of("trainer.steps=2", "overwrite=true"), tmp_path)
    assert not (tmp_path / "run.json").exists() and not (tmp_path / "model.pt").exists()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2


def test_cde_twice_into_one_folder_resume_and_overwrite(tmp_path):
    first = cde_task.run_cde(compose("cde", CDE), tmp_path)
    with pytest.raises(NfviError, match="holds a finished run with these settings"):
        cde_task.run_cde(compose("cde", CDE), tmp_path)
    stamp = (tmp_path / "results.json").stat().st_mtime_ns
    same = cde_task.run_cde(compose("cde", [*CDE, "resume=true"]), tmp_path)
    assert same == first and (tmp_path / "results.json").stat().st_mtime_ns == stamp
    with pytest.raises(NfviError, match=r"finished run with other settings \(max_epochs\)"):
        cde_task.run_cde(compose("cde", [*CDE, "max_epochs=3", "resume=true"]), tmp_path)
    again = cde_task.run_cde(compose("cde", [*CDE, "overwrite=true"]), tmp_path)
    assert again["test_nll_mean"] == first["test_nll_mean"]  # afresh: the same numbers
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 1 + 2  # no rows of the first run


def test_an_unfinished_energy_run_is_rerun_with_resume(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"command": "energy", "config": {}}))
    with pytest.raises(NfviError, match="holds an unfinished run"):
        energy(tmp_path)
    first = energy(tmp_path, "overwrite=true")
    (tmp_path / "results.json").unlink()  # as if it had stopped before the end
    rerun = energy(tmp_path, "resume=true")
    assert rerun["bound"] == first["bound"] and (tmp_path / "results.json").is_file()


def test_train_overwrite_starts_afresh_and_resume_continues(tmp_path):
    train_mod.train(cfg_of("trainer.steps=4"), tmp_path)
    train_mod.train(cfg_of("trainer.steps=6", "resume=true"), tmp_path)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 6
    train_mod.train(cfg_of("trainer.steps=3", "overwrite=true"), tmp_path)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3
    assert [int(r.split(",")[0]) for r in (tmp_path / "metrics.csv").read_text().splitlines()[1:]] == [3]


@pytest.mark.slow
def test_cli_energy_twice_into_one_folder_is_refused(tmp_path):
    args = ["energy", *ENERGY, f"hydra.run.dir={tmp_path / 'run'}"]
    assert nfvi(*args, cwd=tmp_path).returncode == 0
    second = nfvi(*args, cwd=tmp_path)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1 and "holds a finished run with these settings" in lines[0]
    log = (tmp_path / "run" / "energy.log").read_text()
    assert "fitting U1 with planar K=2" in log and "bound" in log and "step 20/20" in log


# -- environment faults ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "where, expected",
    [
        ("file", "run folder {tmp}/file is a file, not a folder"),
        ("/dev/null/x", "cannot create run folder /dev/null/x: /dev/null is not a folder"),
    ],
)
def test_cli_run_folder_faults_are_one_line(tmp_path, where, expected):
    (tmp_path / "file").write_text("not a folder")
    folder = tmp_path / where if where == "file" else where
    result = nfvi("cde", *CDE, f"hydra.run.dir={folder}", cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert expected.format(tmp=tmp_path) in lines[0] and "Traceback" not in result.stderr


def test_no_space_left_while_training_keeps_the_run_resumable(tmp_path, monkeypatch):
    import errno

    from nfvi.runs import MetricsLog

    real = MetricsLog.log

    def full(self, **row):
        if row.get("step", 0) > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, **row)

    monkeypatch.setattr(MetricsLog, "log", full)
    with pytest.raises(NfviError) as err:
        train_mod.train(cfg_of("trainer.steps=20"), tmp_path)
    assert "no space left on the device" in str(err.value) and str(tmp_path) in str(err.value)
    monkeypatch.setattr(MetricsLog, "log", real)
    assert train_mod.train(cfg_of("trainer.steps=20", "resume=true"), tmp_path)["steps"] == 20


# -- non-finite results ----------------------------------------------------------------------------------------------
def test_a_non_finite_test_metric_is_an_error_and_no_nan_reaches_json(tmp_path, monkeypatch):
    import nfvi.estimators as estimators

    train_mod.train(cfg_of("trainer.steps=3"), tmp_path)
    monkeypatch.setattr(
        estimators, "log_marginal_likelihood", lambda model, x, **kw: torch.full((len(x),), float("nan"))
    )
    with pytest.raises(NfviError, match="the test_nll of .* is not finite"):
        evaluate_mod.run(compose("evaluate", [f"run_dir={tmp_path}", *EVAL]))
    assert not (tmp_path / "results.json").exists() and no_nan_token(tmp_path)
    monkeypatch.setattr(energy_task.energies, "log_normalizer", lambda *a: float("nan"))
    (tmp_path / "e").mkdir()
    with pytest.raises(NfviError, match="the reported log_z is nan"):
        energy(tmp_path / "e")
    assert not (tmp_path / "e" / "results.json").exists() and no_nan_token(tmp_path)


# -- nfvi evaluate -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for k in (0, 1):
        train_mod.train(cfg_of("trainer.steps=4", f"flow.length={k}"), root / f"{k}_k{k}")
    train_mod.train(cfg_of("trainer.steps=4"), root / "deeper" / "run")  # two levels below: not evaluated
    return root


def evaluate(run_dir, *overrides):
    return evaluate_mod.run(compose("evaluate", [f"run_dir={run_dir}", *EVAL, *overrides]))


def test_evaluate_a_sweep_one_level_deep_skipping_a_run_in_training(sweep, caplog):
    """A run in training is named in one line and left out, the others are evaluated, then the command fails
    (issue 21 point 5: it used to exit 0 after "skipping")."""
    busy = sweep / "1_k1"
    lock = {"pid": os.getpid(), "host": socket.gethostname(), "command": "train", "started_at": "now"}
    (busy / ".nfvi.lock").write_text(json.dumps(lock))
    try:
        with pytest.raises(NfviError, match=rf"1 of 2 runs were not evaluated \(each named above\): {busy};"):
            evaluate(sweep, "overwrite=true")
    finally:
        (busy / ".nfvi.lock").unlink()
    assert (sweep / "0_k0" / "evaluations").is_dir() and not (busy / "evaluations").exists()
    assert f"not evaluated: {busy}: {busy} is in use by another run (pid {os.getpid()}" in caplog.text
    assert "nfvi train" in caplog.text and "evaluating 2 run(s)" in caplog.text and "deeper" not in caplog.text


def test_evaluate_writes_evaluations_and_results_only_when_asked(sweep):
    run = sweep / "0_k0"
    evaluate(run, "overwrite=true")  # the run has no results.json yet: this becomes its results
    headline = json.loads((run / "results.json").read_text())
    assert (run / "evaluations" / "S4_n20_best_E1.json").is_file()
    other = evaluate(run, "eval.num_samples=2")[str(run)]
    assert json.loads((run / "results.json").read_text()) == headline  # other settings: results.json is kept
    assert json.loads((run / "evaluations" / "S2_n20_best_E1.json").read_text())["test_nll"] == other["test_nll"]
    evaluate(run, "eval.num_samples=2", "eval.update_results=true", "overwrite=true")
    assert json.loads((run / "results.json").read_text())["num_importance_samples"] == 2


def test_evaluate_refuses_best_and_checkpoint_of_different_runs(sweep, tmp_path):
    import shutil

    run = tmp_path / "mixed"
    shutil.copytree(sweep / "0_k0", run)
    shutil.copy(sweep / "1_k1" / "best.pt", run / "best.pt")
    with pytest.raises(NfviError, match=r"best.pt and .*checkpoint.pt disagree on flow.length \(1 vs 0\)"):
        evaluate(run, "overwrite=true")


def test_evaluate_an_empty_folder_writes_nothing_into_it(tmp_path):
    (tmp_path / "empty").mkdir()
    result = nfvi("evaluate", f"run_dir={tmp_path / 'empty'}", cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "holds no checkpoint.pt" in lines[0], result.stderr
    assert list((tmp_path / "empty").iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    empty = nfvi("evaluate", "run_dir=", cwd=tmp_path)
    assert empty.returncode == 2 and "run_dir is empty" in empty.stderr


# -- audit of the reliability issue's sub-cases (docs/reliability.md) --------------------------------------------------
def cli(tmp_path, monkeypatch, *args) -> int:
    """``nfvi *args`` in-process from ``tmp_path``; the exit status."""
    import nfvi.cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() sets sys.argv for Hydra
    with pytest.raises(SystemExit) as info:
        nfvi.cli.main([*args, "hydra/job_logging=none", "hydra/hydra_logging=none"])
        raise SystemExit(0)
    return info.value.code


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[")]  # not the log lines
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_nfvi_data_that_is_a_file_is_one_line_naming_it_and_no_run_folder(tmp_path, monkeypatch, capsys):
    """Case 8: NFVI_DATA naming a file gave a traceback (once, and then a message calling it the run folder)."""
    (tmp_path / "f").write_text("not a folder")
    monkeypatch.setenv("NFVI_DATA", str(tmp_path / "f"))
    out = tmp_path / "out"
    assert cli(tmp_path, monkeypatch, "train", "trainer.steps=2", "device=cpu", f"paths.output_dir={out}") == 2
    line = one_error_line(capsys)
    assert line == f"nfvi train: error: folder {tmp_path / 'f'} is a file, not a folder; choose another folder"
    assert not (out / "train").exists() and (tmp_path / "f").read_text() == "not a folder"


def test_missing_data_file_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    """Case 11: a data error (the file is missing, no download) ends in one line and creates no run folder."""
    out = tmp_path / "out"
    args = ["cde", "dataset=fish", "download=false", f"paths.data_dir={tmp_path / 'data'}", f"paths.output_dir={out}"]
    assert cli(tmp_path, monkeypatch, *args) == 2
    assert "qsar_fish_toxicity.csv" in one_error_line(capsys)
    assert not (out / "cde").exists()


def test_report_out_dir_that_is_a_file_is_one_line(tmp_path, monkeypatch, capsys):
    """Case 8: ``nfvi report out_dir=<a file>`` is one line, exit 2, and the file is kept."""
    from tests.test_reports_vae import result as vae_row

    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "results.json").write_text(json.dumps(vae_row("planar", 2)))
    (tmp_path / "f").write_text("not a folder")
    code = cli(tmp_path, monkeypatch, "report", f"paths.output_dir={tmp_path / 'runs'}", f"out_dir={tmp_path / 'f'}")
    assert code == 2
    line = one_error_line(capsys)
    assert (
        line == f"nfvi report: error: cannot write the report into out_dir={tmp_path / 'f'}: it is a file, not a "
        "folder; choose another out_dir"
    )
    assert (tmp_path / "f").read_text() == "not a folder"


def test_train_sweep_with_a_bad_seed_runs_each_job_once_and_exits_non_zero(tmp_path, monkeypatch, capsys):
    """Case 2 (and 6): ``nfvi train -m ... seed=0,-1`` once launched the whole sweep twice."""
    sweep = tmp_path / "sweep"
    args = ["train", "-m", "dataset=fake", "trainer.steps=2", "seed=0,-1", "device=cpu", "eval.num_samples=2",
            "eval.max_images=10", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}"]  # fmt: skip
    assert cli(tmp_path, monkeypatch, *args) == 1
    err = capsys.readouterr().err
    assert err.count("nfvi train: error: job 1: seed=-1 is not allowed") == 1 and "Traceback" not in err
    assert "1 job(s) of the sweep failed" in err
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name[0] != ".") == ["0", "1"]  # not two sweeps
    assert json.loads((sweep / "0" / "results.json").read_text())["seed"] == 0
    assert (sweep / "1" / "error.txt").read_text().count("Traceback") == 1


def test_full_disk_mid_training_names_enospc_not_an_existing_checkpoint(tmp_path, monkeypatch, capsys):
    """Case 2/8: a full disk mid-run was hidden behind "already holds a checkpoint; pass resume=true"."""
    import errno

    from nfvi.runs import MetricsLog

    real = MetricsLog.log

    def full(self, **row):
        if row.get("step", 0) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, **row)

    monkeypatch.setattr(MetricsLog, "log", full)
    run = tmp_path / "run"
    args = ["train", "dataset=fake", "trainer.steps=4", "trainer.log_every=1", "device=cpu", f"hydra.run.dir={run}"]
    assert cli(tmp_path, monkeypatch, *args) == 2
    line = one_error_line(capsys)
    assert "no space left on the device" in line and "already holds" not in line, line
    assert line.startswith("nfvi train: error: cannot write ") and "resume=true continues the run" in line


def test_cde_with_a_nan_test_nll_exits_non_zero_and_writes_no_results(tmp_path, monkeypatch, capsys):
    """Case 5: ``nfvi cde`` printed "test NLL nan", exited 0 and wrote a bare NaN into results.json."""
    from dataclasses import replace

    real = cde_task.fit
    monkeypatch.setattr(cde_task, "fit", lambda *a, **kw: replace(real(*a, **kw), test_nll=float("nan")))
    run = tmp_path / "run"
    assert cli(tmp_path, monkeypatch, "cde", *CDE, f"hydra.run.dir={run}") != 0
    assert "test_nll_mean is nan" in one_error_line(capsys)
    assert not (run / "results.json").exists() and no_nan_token(run)


def test_a_second_seed_into_a_finished_train_folder_is_refused(tmp_path):
    """Case 3: seeds 0 and 1 into one folder both exited 0, mixing results.json and metrics.csv."""
    train_mod.train(cfg_of("trainer.steps=2"), tmp_path)
    metrics = (tmp_path / "metrics.csv").read_text()
    with pytest.raises(NfviError, match="already holds a checkpoint; pass resume=true"):
        train_mod.train(cfg_of("trainer.steps=2", "seed=1"), tmp_path)
    with pytest.raises(NfviError, match=r"the config differs from the checkpoint's in seed \(0 -> 1\)"):
        train_mod.train(cfg_of("trainer.steps=2", "seed=1", "resume=true"), tmp_path)
    assert (tmp_path / "metrics.csv").read_text() == metrics and metrics.count("step") == 1
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2  # the first run's checkpoint, untouched
