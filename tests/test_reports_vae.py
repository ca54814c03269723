"""Table 2 / Figure 4 writer (``nfvi.reports.vae``) on synthetic results.json rows."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from nfvi.reports import common, vae
from nfvi.reports.task import collect
from tests.conftest import table_cells


def result(flow, k, seed=0, nll=90.0, neg_elbo=95.0, dataset="mnist", steps=1000, finished="2025-01-01T00:00:00", **kw):
    row = {
        "task": "vae",
        "dataset": dataset,
        "flow": flow,
        "flow_length": k,
        "seed": seed,
        "steps": steps,
        "model": "maxout",
        "num_importance_samples": 200,
        "num_test_images": 1000,
        "test_neg_elbo": neg_elbo,
        "test_nll": nll,
        "test_kl": neg_elbo - nll,
        "test_nll_se": 0.5,
        "test_neg_elbo_se": 0.6,
        "test_kl_se": 0.1,
        "finished_at": finished,
        "units": {"test_nll": "nats", "test_neg_elbo": "nats", "test_kl": "nats"},
    }
    return row | kw


@pytest.fixture
def frame(tmp_path):
    rows = [
        result("planar", 0, nll=91.0, neg_elbo=97.0),
        result("nice", 0, nll=91.0, neg_elbo=97.0),  # the same K=0 model named twice: one row, one seed
        result("planar", 10, seed=0, nll=89.0, neg_elbo=94.0),
        result("planar", 10, seed=1, nll=89.4, neg_elbo=94.4),
        result("planar", 10, seed=1, nll=99.0, neg_elbo=99.0, finished="2024-01-01T00:00:00"),  # older repeat: dropped
        result("nice", 10, nll=90.0, neg_elbo=95.5),
        result("planar", 80, nll=86.0, neg_elbo=90.0),
        result("planar", 10, dataset="fake", nll=200.0, neg_elbo=210.0),
    ]
    for i, row in enumerate(rows):
        d = tmp_path / "runs" / str(i)
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps(row))
    return collect([tmp_path / "runs"])


def test_summary_rows_average_seeds_and_carry_paper_values(frame):
    table = vae.summarize(frame)
    mnist = table[table["dataset"] == "mnist"].set_index(["flow", "K"])
    assert list(mnist.index) == [("none", 0), ("planar", 10), ("planar", 80), ("nice", 10)]
    p10 = mnist.loc[("planar", 10)]
    assert p10["seeds"] == 2 and p10["nll"] == pytest.approx(89.2) and p10["nll_sd"] == pytest.approx(0.2828, abs=1e-3)
    assert p10["kl"] == pytest.approx(5.0)
    assert mnist.loc[("none", 0), "seeds"] == 1 and mnist.loc[("none", 0), "paper_nll"] == 89.9
    assert mnist.loc[("planar", 80), "paper_status"] == "C" and mnist.loc[("planar", 10), "paper_status"] == "U"
    assert mnist.loc[("planar", 80), "diff_nll"] == pytest.approx(86.0 - 85.1)
    fake = table[table["dataset"] == "fake"].iloc[0]
    assert math.isnan(fake["paper_nll"]) and fake["paper_status"] == ""


def test_settings_that_differ_split_rows(frame):
    extra = pd.DataFrame([result("planar", 10, nll=88.0, steps=5000)])
    table = vae.summarize(pd.concat([frame, extra], ignore_index=True))
    rows = table[(table["dataset"] == "mnist") & (table["flow"] == "planar") & (table["K"] == 10)]
    assert sorted(rows["setting"]) == ["steps=1000", "steps=5000"]


def test_settings_come_in_the_order_of_their_numbers_not_their_text(frame):
    extra = [result("planar", 10, nll=88.0, steps=steps) for steps in (120000, 95000)]
    table = vae.summarize(pd.concat([frame, pd.DataFrame(extra)], ignore_index=True))
    mnist = table[table["dataset"] == "mnist"]
    assert list(dict.fromkeys(mnist["setting"])) == ["steps=1000", "steps=95000", "steps=120000"]
    labels = pd.Series(["lr=0.01", "lr=0.0003", "lr=2e-05", "a=10, b=2", "a=9, b=30"])
    assert list(labels.iloc[common.natural_order(labels).argsort()]) == [
        "a=9, b=30", "a=10, b=2", "lr=2e-05", "lr=0.0003", "lr=0.01"]  # fmt: skip


def test_figure4_draws_the_settings_with_two_or_more_k_and_keeps_one_k_settings_in_the_table(frame):
    extra = [result("planar", 80, nll=85.2, steps=120000), result("nice", 80, nll=87.0, steps=120000, seed=1)]
    table = vae.summarize(pd.concat([frame, pd.DataFrame(extra)], ignore_index=True))
    assert set(table["setting"]) >= {"steps=1000", "steps=120000"}  # both settings are rows of Table 2
    drawn = [key for key, _ in vae.figure4_groups(table)]
    keys = dict.fromkeys(zip(table["dataset"], table["setting"], strict=True))
    assert drawn == [(d, s) for d, s in keys if s != "steps=120000"]
    assert ("fake", table[table["dataset"] == "fake"]["setting"].iloc[0]) in drawn  # one K, but its dataset's only


def test_write_produces_markdown_csv_latex_and_figure(frame, tmp_path):
    paths = vae.write(frame, tmp_path / "tables")
    assert [p.name for p in paths] == ["vae_table2.md", "vae_table2.csv", "vae_table2.tex", "vae_fig4.png"]
    md = table_cells(paths[0].read_text())
    assert "| DLGM + NF (planar) (K=80) | 90.00 ± 0.60 | 86.00 ± 0.50 | 4.00 ± 0.10 | 85.1 [C] | +0.90 | 1 |" in md
    assert "| DLGM + NF (planar) (K=10) | 94.20 ± 0.28 | 89.20 ± 0.28 |" in md
    assert "87.5 [U]" in md and "[U] unconfirmed" in md and "## dataset fake" in md
    csv = pd.read_csv(paths[1])
    assert {"dataset", "flow", "K", "neg_elbo", "nll", "kl", "paper_nll", "diff_nll", "seeds"} <= set(csv.columns)
    tex = paths[2].read_text()
    assert r"\begin{tabular}" in tex and r"85.1 [C]" in tex and r"$\pm$" in tex
    assert paths[3].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_empty_or_unevaluated_rows_write_nothing(tmp_path):
    frame = pd.DataFrame([{"task": "vae", "flow": "planar", "flow_length": 2}])
    assert vae.write(frame, tmp_path) == []


def test_validation_curves_come_from_each_runs_metrics_csv(frame, tmp_path):
    run = tmp_path / "planar_K10"
    run.mkdir()
    (run / "metrics.csv").write_text("step,train_neg_elbo,val_neg_elbo\n100,120.0,\n200,110.0,105.0\n400,100.0,98.5\n")
    frame = frame.assign(run_dir=[str(run)] + [str(tmp_path / "no_such_run")] * (len(frame) - 1))
    paths = vae.write(frame, tmp_path / "tables")
    assert paths[4].name == "vae_curves.png" and paths[4].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert common.validation_curves(frame.iloc[1:].assign(label="x"), "no curves") is None  # no metrics.csv: no figure


def test_curve_labels_name_each_runs_folder_so_repeats_differ():
    row = pd.Series({"run_dir": "results/mnist_k80_fast/planar_K80_seed0_200k", "label": "planar (K=80)", "seed": 0})
    assert common.curve_label(row) == "planar (K=80): mnist_k80_fast/planar_K80_seed0_200k"
    assert common.curve_label(pd.Series({**row.to_dict(), "seed": 2})).startswith("planar (K=80) (seed 2): ")


def test_other_evaluations_of_a_run_are_rows_of_their_own_setting(tmp_path):
    # nfvi evaluate eval.num_samples=5000 writes evaluations/<name>.json; the report shows it beside the S=200 row
    run = tmp_path / "runs" / "planar_K80_seed0"
    (run / "evaluations").mkdir(parents=True)
    headline = result("planar", 80, nll=86.0, neg_elbo=90.0)
    (run / "results.json").write_text(json.dumps(headline))
    (run / "evaluations" / "S200_n1000_best.json").write_text(json.dumps(headline))  # the headline's own copy
    s5000 = headline | {"num_importance_samples": 5000, "test_nll": 85.6, "test_kl": 4.4}
    (run / "evaluations" / "S5000_n1000_best.json").write_text(json.dumps(s5000))
    frame = collect([tmp_path / "runs"])
    assert sorted(frame["num_importance_samples"]) == [200, 5000] and set(frame["run_dir"]) == {str(run)}
    table = vae.summarize(frame)
    assert dict(zip(table["setting"], table["nll"], strict=True)) == {
        "num_importance_samples=200": pytest.approx(86.0),
        "num_importance_samples=5000": pytest.approx(85.6),
    }
