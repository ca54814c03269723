"""Reports never merge runs that differ in a config key, and draw what a reader needs to see at a glance."""

from __future__ import annotations

import json

import matplotlib.axes
import matplotlib.figure
import pandas as pd

from nfvi.reports import cde, common, energy, vae
from nfvi.reports.task import collect
from tests.test_cde_report import row as cde_row
from tests.test_reports_energy import _fake_run
from tests.test_reports_vae import result as vae_result


def _with_config(run_dir, **config):
    path = run_dir / "results.json"
    data = json.loads(path.read_text())
    data["config"] = config
    path.write_text(json.dumps(data))


def test_energy_runs_that_differ_only_in_the_learning_rate_are_two_rows(tmp_path):
    for lr, bound in ((0.01, -1.0), (0.001, -2.0)):
        run = _fake_run(tmp_path / "runs" / f"lr{lr}", "U1", "planar", 2, bound=bound)
        _with_config(run, target="U1", seed=0, device="cpu", optim={"lr": lr}, paths={"output_dir": str(run)})
    table = energy.summarize(energy._series(collect([tmp_path / "runs"])))
    assert sorted(table["flow"]) == ["planar, optim.lr=0.001", "planar, optim.lr=0.01"]
    assert sorted(table["bound"]) == [-2.0, -1.0]


def test_vae_runs_that_differ_in_a_config_key_are_separate_rows(tmp_path):
    for i, clip in enumerate((0.0, 5.0)):
        d = tmp_path / "runs" / str(i)
        d.mkdir(parents=True)
        row = vae_result("planar", 10, nll=90.0 + i, config={"trainer": {"grad_clip": clip}, "device": f"cuda:{i}"})
        (d / "results.json").write_text(json.dumps(row))
    table = vae.summarize(collect([tmp_path / "runs"]))
    assert sorted(table["setting"]) == ["trainer.grad_clip=0", "trainer.grad_clip=5"]  # device is incidental
    assert sorted(table["nll"]) == [90.0, 91.0]


def test_cde_runs_that_differ_in_a_config_key_are_separate_rows():
    frame = pd.DataFrame(
        [
            cde_row("fish", "radial (K=4)", 1.2, 0.1, **{"config/optim/lr": 0.01}),
            cde_row("fish", "radial (K=4)", 1.5, 0.1, **{"config/optim/lr": 0.1}),
        ]
    )
    assert sorted(cde.summarize(frame)["model"]) == ["radial (K=4), optim.lr=0.01", "radial (K=4), optim.lr=0.1"]


def test_a_curve_with_one_validation_point_is_drawn_as_a_point(tmp_path, monkeypatch):
    (tmp_path / "metrics.csv").write_text("step,val_neg_elbo\n100,95.5\n")
    calls = []
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, *a, **k: calls.append(k) or real(ax, *a, **k))
    png = common.validation_curves(pd.DataFrame([{"run_dir": str(tmp_path), "label": "K=10", "seed": 0}]), "t")
    assert png[:4] == b"\x89PNG"
    assert calls and calls[0]["marker"] == "o" and calls[0]["markersize"] > 0


def test_a_one_row_figure3_keeps_its_titles_and_kl_labels(tmp_path, monkeypatch):
    _fake_run(tmp_path / "runs", "U1", "planar", 2, kl=0.25)
    saved = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(k) or real(fig, *a, **k))
    energy.write(collect([tmp_path / "runs"]), tmp_path / "tables")
    assert saved[0].get("bbox_inches") == "tight"  # the canvas grows to hold the titles and the KL labels
