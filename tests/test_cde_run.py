"""nfvi cde: the composed config, the runner's results.json, the CLI (one-line errors, sweeps) and report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import nfvi.cde.task as cde_run
from nfvi.config import hydra_version_base, validate
from nfvi.errors import NfviError
from tests.conftest import table_cells

CONF = Path(__file__).resolve().parents[1] / "nfvi" / "conf" / "cde"  # nfvi cde's own config root
NFVI = [sys.executable, "-m", "nfvi"]
FAST = ["seeds=[0,1]", "max_epochs=3", "synthetic_size=200", "hidden=[8]"]


def composed(*overrides: str, extra_dir: Path | None = None):
    extra = [f"hydra.searchpath=[file://{extra_dir}]"] if extra_dir else []
    with initialize_config_dir(config_dir=str(CONF), **hydra_version_base()):
        return compose("cde", overrides=[*overrides, *extra], return_hydra_config=False)


def test_defaults_compose_to_radial_k4_on_concrete():
    cfg = composed()
    assert (cfg.dataset, cfg.model, cfg.flow.kind, cfg.flow.length) == ("concrete", "flow", "radial", 4)
    assert list(cfg.seeds) == [0, 1, 2, 3, 4] and cfg.optim.name == "adam"


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["dataset=fish", "flow=planar", "flow.length=8"], ("fish", "flow", "planar", 8)),
        (["dataset=skillcraft", "model=mdn"], ("skillcraft", "mdn", "radial", 4)),
        (["dataset=energy", "model=gaussian"], ("energy", "gaussian", "radial", 4)),
    ],
)
def test_overrides(overrides, expected):
    cfg = composed(*overrides)
    assert (cfg.dataset, cfg.model, cfg.flow.kind, cfg.flow.length) == expected


def test_dataset_key_survives_a_dataset_config_group_on_the_search_path(tmp_path):
    """Another dataset/ folder on the search path (as nfvi train's) adds options but keeps the UCI names working."""
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "mnist.yaml").write_text("name: mnist\n")
    assert composed("dataset=parkinsons", extra_dir=tmp_path).dataset == "parkinsons"


@pytest.mark.parametrize(
    "override,message",
    [
        ("seeds=[]", "seeds=[] is not allowed"),
        ("seeds=[1,1]", "repeats a seed"),
        ("activation=sigmoid", "activation='sigmoid' is not allowed"),
        ("hidden=[0]", "hidden=0 is not allowed"),
    ],
)
def test_invalid_values_are_one_line_errors(tmp_path, override, message):
    cfg = composed("dataset=sine", *FAST, override)
    with pytest.raises(NfviError) as err:
        validate(cfg)  # the CLI's task wrapper validates before run_cde
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("model", ["gaussian", "mdn", "flow"])
def test_run_writes_flat_results_and_metrics(tmp_path, model):
    cfg = composed("dataset=bimodal", f"model={model}", "flow=planar", "flow.length=2", *FAST)
    results = cde_run.run_cde(cfg, out_dir=tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["task"] == "cde" and saved["dataset"] == "bimodal" and saved["model"] == model
    assert saved == json.loads(json.dumps(results, default=str))
    assert len(saved["per_seed"]) == 2 and saved["seeds"] == [0, 1]
    for row in saved["per_seed"]:
        assert row["test_nll"] == pytest.approx(row["test_nll_standardized"] + row["log_std_y"], abs=1e-5)
        assert "test_nll_true_density" in row
    assert saved["test_nll_std"] >= 0 and "test_nll_mean" in saved["units"]
    assert saved["flow_length"] == (2 if model == "flow" else 0)
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("seed,epoch,step,lr,train_nll,val_nll") and len(lines) == 1 + 2 * 3


def test_a_failed_rerun_leaves_no_earlier_results_behind(tmp_path):
    """scripts/reproduce_cde.sh reruns into fixed folders: a failure must not leave old numbers to be reported."""
    cde_run.run_cde(composed("dataset=sine", *FAST), out_dir=tmp_path)
    assert (tmp_path / "results.json").is_file()
    with pytest.raises(NfviError, match="holds a finished run with other settings"):  # nothing is replaced silently
        cde_run.run_cde(composed("dataset=fish", "download=false", f"paths.data_dir={tmp_path / 'none'}"), tmp_path)
    assert (tmp_path / "results.json").is_file()
    with pytest.raises(NfviError, match="is missing"):
        again = composed("dataset=fish", "download=false", f"paths.data_dir={tmp_path / 'none'}", "overwrite=true")
        cde_run.run_cde(again, tmp_path)
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "metrics.csv").exists()


def test_results_record_the_planar_floor_only_where_it_applies(tmp_path):
    cfg = composed("dataset=sine", "flow=planar", "flow.length=1", "flow.amortized=false", *FAST)
    assert cde_run.run_cde(cfg, out_dir=tmp_path)["w_floor"] is None
    cfg = composed("dataset=sine", "flow=planar", "flow.length=1", *FAST)
    assert cde_run.run_cde(cfg, out_dir=tmp_path / "amortized")["w_floor"] == 0.1


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NFVI_DATA": str(cwd / "no-data")}
    return subprocess.run([*NFVI, "cde", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_missing_data_is_one_line_exit_2(tmp_path):
    proc = _cli("dataset=fish", "download=false", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nfvi cde: error: dataset=fish:") and "is missing" in lines[0]


UCI = "air, bimodal, concrete, energy, fish, parkinsons, sine, skillcraft, temperature"


@pytest.mark.slow
@pytest.mark.parametrize(
    "command, override, shown",
    [
        ("cde", "dataset=mnist", f"Could not find 'dataset/mnist'; Available options in 'dataset': {UCI}"),
        ("cde", "dataset=fish,nope", f"Could not find 'dataset/nope'; Available options in 'dataset': {UCI}"),
        ("cde", "model=maxout", "Could not find 'model/maxout'; Available options in 'model': flow, gaussian, mdn"),
        ("train", "dataset=fish", "Could not find 'dataset/fish'; Available options in 'dataset': cifar10, "),
    ],
)
def test_cli_options_of_the_other_command_are_refused_in_one_line(tmp_path, command, override, shown):
    """nfvi cde and nfvi train each have their own config root: one's dataset/model options are not the other's."""
    args = [*(["-m"] if "," in override else []), override]
    proc = subprocess.run([*NFVI, command, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith(f"nfvi {command}: error: In '{command}': {shown}"), lines


@pytest.mark.slow
def test_cli_sweep_then_report_table(tmp_path):
    proc = _cli("-m", "dataset=sine,bimodal", "model=gaussian,mdn", *FAST, "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert len(runs) == 4
    report = subprocess.run(
        [*NFVI, "report", "search=[sweep]", "out_dir=tables", "tasks=[cde]"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    table = table_cells((tmp_path / "tables" / "cde.md").read_text())
    assert "| sine (1-D) |" in table and "| bimodal (1-D) |" in table and "mdn (C=5)" in table
    assert len((tmp_path / "tables" / "cde.csv").read_text().splitlines()) == 1 + 4
