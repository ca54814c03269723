"""The ``nfvi`` command line: dispatch, help, config discovery and one-line user errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nfvi.cli import COMMANDS, one_line
from tests.conftest import CONF_ROOT


def nfvi(*args, cwd=None, check=False):
    return subprocess.run(
        [sys.executable, "-m", "nfvi", *args], cwd=cwd, capture_output=True, text=True, check=check, timeout=120
    )


def test_help_lists_every_command_with_one_line():
    out = nfvi("--help").stdout
    for name, (_, _, description) in COMMANDS.items():
        assert f"  {name}" in out and description in out


def test_unknown_command_is_one_line_error():
    result = nfvi("trian")
    assert result.returncode == 2
    assert result.stderr.strip() == "nfvi: error: unknown command 'trian'; choose one of: " + ", ".join(COMMANDS)


def test_conf_is_found_from_any_working_directory(tmp_path):
    result = nfvi("report", "--info", "searchpath", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"file://{CONF_ROOT / 'report'}" in result.stdout and f"file://{CONF_ROOT / 'shared'}" in result.stdout


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_its_own_config_root_with_the_shared_groups(command):
    """nfvi/conf/<command>/<command>.yaml; flow/, optim/, paths/, launchers come from nfvi/conf/shared/, which
    hydra_plugins/nfvi_searchpath adds to the search path of nfvi's roots (and of no other folder)."""
    from hydra_plugins.nfvi_searchpath.nfvi_searchpath import shared_dir

    assert (CONF_ROOT / command / f"{command}.yaml").is_file()
    assert shared_dir(f"file://{CONF_ROOT / command}") == CONF_ROOT / "shared" == shared_dir(str(CONF_ROOT / command))
    assert shared_dir(str(CONF_ROOT / "shared")) is None and shared_dir("pkg://hydra.conf") is None
    assert shared_dir(str(CONF_ROOT.parent)) is None


def test_help_and_cfg_job_and_launcher_choice_work(tmp_path):
    helped = nfvi("cde", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "dataset: air, bimodal, concrete" in helped.stdout, helped.stderr
    assert (
        "optim: adam, adam_fast, adamax, rmsprop" in helped.stdout and "flow: householder, iaf, nice" in helped.stdout
    )
    job = nfvi("train", "experiment=mnist_smoke", "hydra/launcher=joblib", "--cfg", "hydra", cwd=tmp_path)
    assert job.returncode == 0 and "JoblibLauncher" in job.stdout, job.stderr


@pytest.mark.parametrize(
    "override, expected",
    [
        ("paths.bogus=1", "Key 'bogus' not in 'PathsConfig'"),
        ("paths=nope", "Could not find 'paths/nope'; Available options in 'paths': default"),
        ("tasks=[foo]", "report.tasks contains 'foo'; choose from: energy, vae, cde"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path, override, expected):
    result = nfvi("report", override, f"paths.output_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nfvi report: error:") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_failed_sweep_jobs_are_reported_and_exit_nonzero(tmp_path):
    result = nfvi("report", "-m", "tasks=[foo],[bar]", f"paths.output_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 1
    assert "'foo'" in result.stderr and "'bar'" in result.stderr and "2 job(s) of the sweep failed" in result.stderr


def test_one_line_folds_causes_and_hydra_option_lists():
    class Cause(Exception):
        pass

    exc = ValueError(
        "In 'energy': Could not find 'flow/foo'\n\nAvailable options in 'flow':\n\tbase_flow\n\tnice\n\tplanar"
    )
    exc.__cause__ = Cause("Key 'x' not in 'FlowConfig'\n    full_key: flow.x\n    object_type=FlowConfig")
    assert one_line(exc) == (
        "In 'energy': Could not find 'flow/foo'; Available options in 'flow': nice, planar; Key 'x' not in 'FlowConfig'"
    )


def test_report_writes_nothing_without_results(tmp_path):
    result = nfvi("report", f"paths.output_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and "no results.json found" in result.stderr
    assert not list(tmp_path.glob("*.log"))


def test_report_collects_results_json(tmp_path):
    from nfvi.reports.task import collect

    run = tmp_path / "a" / "b"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"task": "energy", "kl": 0.1, "units": {"kl": "nats"}}))
    frame = collect([tmp_path])
    assert frame.loc[0, "kl"] == 0.1 and frame.loc[0, "units/kl"] == "nats" and frame.loc[0, "run_dir"] == str(run)


def test_composition_error_is_one_line_exit_2_and_no_run_folder(tmp_path):
    result = nfvi("train", "flow=nope", f"paths.output_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "nfvi train: error: In 'train': Could not find 'flow/nope'; "
        "Available options in 'flow': householder, iaf, nice, none, planar, radial, sylvester"
    ]
    assert list(tmp_path.iterdir()) == []


def test_refused_config_leaves_no_run_folder(tmp_path):
    """A user error raised by the task before it wrote anything: one line, exit 2, the run folder removed."""
    result = nfvi("energy", "flow.length=-1", f"paths.output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("nfvi energy: error: flow.length=-1 is not allowed")
    assert not (tmp_path / "out" / "energy").exists()
