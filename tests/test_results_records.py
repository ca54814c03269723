"""The run records in ``results/`` and the tables in ``docs/results/`` drawn from them (nfvi.records).

The drift test redraws the report from the repository's records and compares it with the committed files, so a
number in docs/results/ always stands on a committed record. The other tests export tiny hand-made run folders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from conftest import one_line_error

from nfvi import records
from nfvi.records import FIGURE_SUFFIXES, TABLE_SUFFIXES, export_record, redraw
from nfvi.reports.task import ReportConfig, find_results
from nfvi.reports.task import run as report

ROOT = Path(__file__).resolve().parents[1]


def _generated(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.name: p for p in folder.iterdir() if p.is_file() and p.suffix in TABLE_SUFFIXES + FIGURE_SUFFIXES}


def test_committed_tables_equal_what_the_report_writes_from_the_committed_records(tmp_path, monkeypatch, caplog):
    """docs/results/ holds exactly what ``make figures`` writes from results/: the same tables, byte for byte, and
    the same figures (PNG bytes depend on the matplotlib build, so their names are compared). With no record in
    results/, docs/results/ holds no table or figure."""
    monkeypatch.chdir(ROOT)  # the tables name each record by its path in the repository (results/<exp>/<run>)
    caplog.set_level("WARNING", logger="nfvi.report")
    written = redraw("results", tmp_path / "out")
    assert not [r.getMessage() for r in caplog.records], "a record in results/ is unusable"
    fresh, committed = _generated(tmp_path / "out"), _generated(ROOT / "docs" / "results")
    assert sorted(committed) == sorted(fresh) == sorted(p.name for p in written), "run `make figures` and commit"
    for name, path in fresh.items():
        if path.suffix in TABLE_SUFFIXES:
            assert committed[name].read_text() == path.read_text(), f"docs/results/{name} drifted: run `make figures`"
    if not find_results(ROOT / "results"):
        assert not committed


def test_committed_records_are_small_and_hold_no_checkpoint():
    for results in find_results(ROOT / "results"):
        folder = results.parent
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert not [p for p in files if p.suffix == ".pt"], folder
        assert sum(p.stat().st_size for p in files) <= 2 * records.MAX_FILE_BYTES, folder
        assert len(folder.relative_to(ROOT / "results").parts) == 2, f"{folder}: not results/<experiment>/<run>"
        for p in files:
            text = p.read_bytes().decode(errors="replace")
            assert str(ROOT) not in text and os.path.expanduser("~") + "/" not in text, f"{p} names this machine"


# ---------------------------------------------------------------------------------------------------------------------
# export_record on hand-made run folders


def fake_run(folder: Path, *, experiment="mnist_smoke", steps=20, target_steps=20, finished=True, nll=90.0, seed=0):
    """A finished ``nfvi train`` folder as it looks on disk: its record files, checkpoints, a tracker folder."""
    folder.mkdir(parents=True)
    config = {"seed": seed, "trainer": {"steps": target_steps}, "paths": {"data_dir": "./data"}}
    results = {"task": "vae", "dataset": "fake", "flow": "planar", "flow_length": 10, "seed": seed, "steps": steps,
               "test_nll": nll, "test_neg_elbo": nll + 2.0, "test_nll_se": 0.5, "test_neg_elbo_se": 0.5,
               "num_importance_samples": 200, "num_test_images": 50, "finished": finished,
               "finished_at": "2026-12-06T00:00:00+0000", "config": config}  # fmt: skip
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "run_config.json").write_text(json.dumps({**config, "run_id": "abc"}))
    (folder / "metrics.csv").write_text("step,val_neg_elbo\n10,95.0\n20,93.0\n")
    (folder / "evaluations").mkdir()
    (folder / "evaluations" / "S5000.json").write_text(json.dumps({**results, "num_importance_samples": 5000}))
    (folder / "train.log").write_text(f"training -> {folder.absolute()}\ntrained {folder.absolute()}: done\n")
    (folder / ".hydra").mkdir()
    overrides = ["dataset=fake", *([f"experiment={experiment}"] if experiment else [])]
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  run:\n    dir: {folder.absolute()}\n")
    for name in ("checkpoint.pt", "best.pt"):
        (folder / name).write_bytes(b"weights")
    (folder / "tensorboard").mkdir()
    (folder / "tensorboard" / "events.out").write_bytes(b"events")
    return folder


RECORD = {"results.json", "run_config.json", "metrics.csv", "evaluations/S5000.json", "train.log",
          ".hydra/overrides.yaml"}  # fmt: skip


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_export_copies_the_record_files_only_and_names_no_machine_path(tmp_path):
    run = fake_run(tmp_path / "runs" / "planar_K10_seed0")
    target = export_record(run, tmp_path / "results")
    assert target == tmp_path / "results" / "mnist_smoke" / "planar_K10_seed0"
    assert _files(target) == RECORD  # no checkpoint, no tracker folder, no hydra.yaml
    assert (target / "train.log").read_text() == "training -> <run_dir>\ntrained <run_dir>: done\n"
    assert (target / "results.json").read_bytes() == (run / "results.json").read_bytes()
    assert [p.name for p in target.parent.iterdir()] == ["planar_K10_seed0"]  # no temporary folder left


def test_a_run_folder_renamed_after_its_run_still_names_no_machine_path(tmp_path):
    run = fake_run(tmp_path / "runs" / "planar_K80_seed0")
    config = {**json.loads((run / "run_config.json").read_text()), "run_dir": str(run.absolute())}
    (run / "run_config.json").write_text(json.dumps(config))
    renamed = run.rename(tmp_path / "runs" / "planar_K80_seed0_95k")
    target = export_record(renamed, tmp_path / "results")
    assert target.name == "planar_K80_seed0_95k"
    for rel in ("train.log", "run_config.json"):
        text = (target / rel).read_text()
        assert str(tmp_path) not in text and "<run_dir>" in text, rel
    assert json.loads((target / "run_config.json").read_text())["run_dir"] == "<run_dir>"


def test_exporting_again_changes_nothing_and_another_record_is_refused(tmp_path):
    run = fake_run(tmp_path / "runs" / "r")
    target = export_record(run, tmp_path / "results", name="rec")
    assert export_record(run, tmp_path / "results", name="rec") == target
    other = fake_run(tmp_path / "runs2" / "r", nll=80.0)
    before = (target / "results.json").read_bytes()
    message = one_line_error(export_record, other, tmp_path / "results", name="rec")
    assert str(target) in message and "already holds another record" in message
    assert (target / "results.json").read_bytes() == before


@pytest.mark.parametrize(
    "spoil, why",
    [
        (lambda run: (run / "results.json").unlink(), "no results.json"),
        (lambda run: (run / ".nfvi.lock").write_text("{}"), "in use"),
        (lambda run: (run / "results.json").write_text("[1, 2]"), "JSON object"),
        (lambda run: (run / "results.json").write_text('{"task": "vae"}'), "cannot be reported"),
    ],
)
def test_a_run_that_is_not_finished_is_refused_in_one_line(tmp_path, spoil, why):
    run = fake_run(tmp_path / "run")
    spoil(run)
    assert why in one_line_error(export_record, run, tmp_path / "results")
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("kwargs, note", [({"steps": 10}, "10/20 updates"), ({"finished": False}, "unfinished")])
def test_a_run_stopped_early_is_refused(tmp_path, kwargs, note):
    run = fake_run(tmp_path / "run", **kwargs)
    assert note in one_line_error(export_record, run, tmp_path / "results")
    assert not (tmp_path / "results").exists()


def test_the_experiment_comes_from_the_launch_else_the_argument(tmp_path):
    assert records.experiment_of(fake_run(tmp_path / "a", experiment="mnist_long")) == "mnist_long"
    named = fake_run(tmp_path / "b", experiment=None)
    assert records.experiment_of(named) is None
    assert "experiment=" in one_line_error(export_record, named, tmp_path / "results")
    assert export_record(named, tmp_path / "results", experiment="mine").parent.name == "mine"
    message = one_line_error(export_record, tmp_path / "a", tmp_path / "results", experiment="mnist_smoke")
    assert "experiment=mnist_long" in message
    assert "not a folder name" in one_line_error(export_record, tmp_path / "a", tmp_path / "results", name="..")


def test_a_failed_export_leaves_no_record_and_no_temporary_folder(tmp_path, monkeypatch):
    run = fake_run(tmp_path / "run")
    write, calls = Path.write_bytes, []

    def failing_write(self, data):  # the disk fills up at the third file
        calls.append(self)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return write(self, data)

    monkeypatch.setattr(Path, "write_bytes", failing_write)
    assert "No space left on device" in one_line_error(export_record, run, tmp_path / "results")
    monkeypatch.undo()
    assert list((tmp_path / "results" / "mnist_smoke").iterdir()) == []


def test_an_energy_record_keeps_figure_3s_grid_small_and_the_same_bytes_each_time(tmp_path):
    import numpy as np

    run = tmp_path / "U1_planar_K2_seed0"
    _energy(run, kl=0.5)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text("- experiment=energy_quick\n")
    centres = np.linspace(-4, 4, 400)
    log_p = -0.5 * (centres[:, None] ** 2 + centres[None, :] ** 2)
    np.savez_compressed(run / "density.npz", centres=centres, log_q=log_p - 0.1, log_p=log_p, box=np.float64(4.0))
    target = export_record(run, tmp_path / "results")
    assert export_record(run, tmp_path / "results") == target  # the same bytes again: not "another record"
    with np.load(target / "density.npz") as saved:
        assert saved["log_q"].shape == (200, 200) and saved["log_q"].dtype == np.float32
        assert int(saved["downsampled_from"]) == 400 and float(saved["box"]) == 4.0
        np.testing.assert_allclose(saved["log_p"], log_p[::2, ::2], rtol=1e-6)
    assert (target / "density.npz").stat().st_size < 400_000


def test_cli_exports_and_redraws_and_errors_in_one_line(tmp_path, monkeypatch, capsys):
    run = fake_run(tmp_path / "runs" / "planar_K10_seed0")
    monkeypatch.chdir(tmp_path)
    assert records.main([str(run)]) == 0
    assert records.main([str(run), "--figures"]) == 0
    out = capsys.readouterr().out
    assert "results/mnist_smoke/planar_K10_seed0" in out and "docs/results holds" in out
    table = pd.read_csv(tmp_path / "docs" / "results" / "vae_table2.csv")
    assert table["run_dirs"].tolist() == ["results/mnist_smoke/planar_K10_seed0"] * 2  # results.json, S=5000
    assert sorted(table["num_importance_samples"]) == [200, 5000]
    assert records.main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_redraw_replaces_stale_files_and_writes_nothing_without_records(tmp_path):
    out = tmp_path / "docs" / "results"
    out.mkdir(parents=True)
    (out / "old_table.md").write_text("stale")
    (out / "notes.txt").write_text("kept")  # not a report output
    assert redraw(tmp_path / "results", out) == []
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    export_record(fake_run(tmp_path / "run"), tmp_path / "results")
    names = [p.name for p in redraw(tmp_path / "results", out)]
    assert {"vae_table2.md", "vae_table2.csv", "vae_table2.tex", "vae_fig4.png", "vae_curves.png"} == set(names)


# ---------------------------------------------------------------------------------------------------------------------
# our records beside a user's runs: one report, never merged


def _energy(folder: Path, kl: float) -> None:
    folder.mkdir(parents=True)
    result = {"task": "energy", "target": "U1", "flow": "planar", "flow_length": 2, "seed": 0, "steps": 100,
              "bound": -1.0, "kl": kl, "finished_at": "2026-01-01T00:00:00"}  # fmt: skip
    (folder / "results.json").write_text(json.dumps(result))


def _cde(folder: Path, nll: float) -> None:
    folder.mkdir(parents=True)
    result = {"task": "cde", "dataset": "fish", "model_name": "gaussian", "test_nll_mean": nll, "test_nll_std": 0.1,
              "finished_at": "2026-01-01T00:00:00"}  # fmt: skip
    (folder / "results.json").write_text(json.dumps(result))


def _image_run(folder: Path, nll: float, **fields) -> None:
    """A Sylvester-table (model=gated_conv) or Table 3 (dataset=cifar10) run's results.json."""
    folder.mkdir(parents=True)
    result = {"task": "vae", "latent_dim": 64, "flow": "planar", "flow_length": 4, "seed": 0, "steps": 500,
              "num_importance_samples": 100, "num_test_images": 200, "test_neg_elbo": nll + 3, "test_nll": nll,
              "finished_at": "2026-01-01T00:00:00", **fields}  # fmt: skip
    (folder / "results.json").write_text(json.dumps(result))


def test_records_and_a_users_runs_of_the_same_config_stay_separate_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for root, nll in (("results", 90.0), ("outputs", 80.0)):
        fake_run(Path(root) / "exp" / "planar_K10_seed0", nll=nll)  # the same config and seed
        _energy(Path(root) / "exp" / "U1", kl=nll / 100)
        _cde(Path(root) / "exp" / "fish", nll=nll / 10)
        _image_run(Path(root) / "syl" / "planar", nll, dataset="mnist_static", model="gated_conv")
        _image_run(Path(root) / "cifar" / "planar", nll, dataset="cifar10", model="conv", likelihood="logistic")
    report(ReportConfig(search=["results", "outputs"], out_dir="tables"))
    vae = pd.read_csv("tables/vae_table2.csv")
    vae = vae[vae["num_importance_samples"] == 200]  # (the runs' evaluations at S=5000 are rows of their own)
    assert sorted(zip(vae["run_dirs"], vae["nll"], strict=True)) == [
        ("outputs/exp/planar_K10_seed0", 80.0),
        ("results/exp/planar_K10_seed0", 90.0),
    ]
    assert {s.split(", ")[-1] for s in vae["setting"]} == {"source=results", "source=outputs"}
    energy = pd.read_csv("tables/energy.csv")
    assert sorted(energy["kl"]) == [0.8, 0.9] and len(set(energy["flow"])) == 2
    cde = pd.read_csv("tables/cde.csv")
    assert sorted(cde["run_dir"]) == ["outputs/exp/fish", "results/exp/fish"]
    for table in ("sylvester_table1.csv", "vae_table3.csv"):
        rows = pd.read_csv(f"tables/{table}")
        assert sorted(zip(rows["source"], rows["test_nll"], strict=True)) == [("outputs", 80.0), ("results", 90.0)]
    report(ReportConfig(search=["results"], out_dir="alone"))  # one root: no source setting, tables as before
    assert not pd.read_csv("alone/vae_table2.csv")["setting"].str.contains("source").any()
