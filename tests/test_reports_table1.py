"""Sylvester flows Table 1 (nfvi.reports.table1) on synthetic results.json rows: selection, labels per flow and variant,
grouping and mean ± sd over seeds, the published column with its confirmed/unconfirmed markers, the written files."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from nfvi.reports.table1 import (
    AUTHORS_FLOW_PARAMS,
    LABELS,
    PUBLISHED,
    flow_label,
    is_table1_row,
    summarize_table1,
    table1_markdown,
    write_table1,
)
from tests.conftest import table_cells

FLOWS = [  # (flow, flow_variant, K) -> label
    ("none", "", 0, "no flow"),
    ("planar", "", 16, "planar"),
    ("iaf", "", 4, "IAF"),
    ("sylvester", "orthogonal", 16, "O-SNF"),
    ("sylvester", "householder", 16, "H-SNF"),
    ("sylvester", "triangular", 16, "T-SNF"),
]


def rows(datasets=("mnist_static", "omniglot"), seeds=(0, 1, 2), **extra) -> pd.DataFrame:
    """gated_conv rows: -ELBO = 100 + 10 * (dataset index) - flow index + seed; -ln p(x) = -ELBO - 3."""
    out = []
    for d, dataset in enumerate(datasets):
        for f, (flow, variant, k, _) in enumerate(FLOWS):
            for seed in seeds:
                neg_elbo = 100.0 + 10 * d - f + seed
                row = {"task": "vae", "dataset": dataset, "model": "gated_conv", "latent_dim": 64, "flow": flow,
                       "flow_length": k, "seed": seed, "steps": 500, "num_importance_samples": 100,
                       "num_test_images": 200, "test_images": "random subset of 200 of 10000",
                       "test_neg_elbo": neg_elbo, "test_neg_elbo_se": 0.5, "test_nll": neg_elbo - 3,
                       "test_nll_se": 0.4, "finished_at": f"2026-01-01T00:00:0{seed}",
                       "run_dir": f"/runs/{dataset}/{flow}{variant}/{seed}",
                       "data_source": "/data/omniglot28_rawresize.npz" if dataset == "omniglot" else "/data/x.amat",
                       **extra}  # fmt: skip
                if variant:
                    row["flow_variant"] = variant
                out.append(row)
    return pd.DataFrame(out)


def test_labels_per_flow_kind_and_variant():
    for flow, variant, k, label in FLOWS:
        assert flow_label(flow, variant, k) == label
    assert flow_label("planar", "", 0) == "no flow" and flow_label("sylvester", "orthogonal", 0) == "no flow"
    assert flow_label("sylvester", "", 8) == "SNF (variant?)" and flow_label("householder", "", 4) == "householder"


def test_only_gated_conv_rows_are_selected():
    frame = rows()
    other = frame.iloc[:2].assign(model="maxout", test_neg_elbo=1.0)
    mixed = pd.concat([frame, other, pd.DataFrame([{"task": "vae", "dataset": "mnist"}])], ignore_index=True)
    mask = is_table1_row(mixed)
    assert mask.sum() == len(frame) and not mask.iloc[len(frame) :].any()
    assert not is_table1_row(pd.DataFrame([{"task": "vae"}])).any()
    table = summarize_table1(mixed)
    assert len(table) == 12 and table["test_neg_elbo"].min() > 1.0  # the maxout rows (-ELBO 1.0) are not in it
    assert summarize_table1(other).empty and write_table1(other, "/nonexistent/never") == []


def test_grouping_mean_sd_and_published_column():
    frame = rows()
    frame = pd.concat([frame, frame.iloc[[0]].assign(test_neg_elbo=500.0, finished_at="2025-01-01")])  # older repeat
    table = summarize_table1(frame)
    assert list(table["dataset"]) == ["mnist_static"] * 6 + ["omniglot"] * 6
    assert list(table["label"]) == list(LABELS) * 2 and (table["seeds"] == 3).all()
    mnist = table[table["dataset"] == "mnist_static"].set_index("label")
    assert mnist.loc["no flow", "test_neg_elbo"] == pytest.approx(101.0)  # seeds 0, 1, 2: mean +1; repeat dropped
    assert mnist.loc["no flow", "test_neg_elbo_sd"] == pytest.approx(1.0)
    assert mnist.loc["T-SNF", "test_nll"] == pytest.approx(100 - 5 + 1 - 3)
    assert mnist.loc["IAF", "K"] == 4 and mnist.loc["O-SNF", "flow_variant"] == "orthogonal"
    assert mnist.loc["O-SNF", "paper_neg_elbo"] == 83.32 and mnist.loc["O-SNF", "paper_neg_elbo_status"] == "C"
    assert mnist.loc["H-SNF", "paper_neg_elbo_status"] == "U" and mnist.loc["planar", "paper_nll"] == 81.91
    assert (table["paper_nll_status"] == "U").all() and not table["paper_protocol"].any()
    assert mnist.loc["no flow", "diff_neg_elbo"] == pytest.approx(101.0 - 86.55)
    omni = table[table["dataset"] == "omniglot"].set_index("label")
    assert omni.loc["H-SNF", "paper_neg_elbo"] == 99.00 and omni.loc["H-SNF", "paper_neg_elbo_status"] == "C*"
    assert omni.loc["no flow", "paper_neg_elbo_sd"] == 0.39 and omni.loc["T-SNF", "paper_neg_elbo_status"] == "U"


def test_published_values_and_their_status():
    confirmed = {key for key, p in PUBLISHED.items() if p.neg_elbo_status == "C"}
    assert confirmed == {(d, label) for d in ("mnist_static", "omniglot") for label in ("no flow", "planar", "IAF")} | {
        ("mnist_static", "O-SNF")
    }
    assert {p.nll_status for p in PUBLISHED.values()} == {"U"}
    best = {d: min(p.neg_elbo for (dd, label), p in PUBLISHED.items() if dd == d and "SNF" in label) for d in
            ("mnist_static", "omniglot")}  # fmt: skip
    assert best == {"mnist_static": 83.32, "omniglot": 99.00}  # FFJORD's Table 3 "Sylvester" row


def test_settings_split_rows_and_other_datasets_have_no_published_values():
    frame = pd.concat([rows(("mnist_static",), seeds=(0,), steps=1000), rows(("mnist_static", "fake"), seeds=(0,))])
    table = summarize_table1(frame)
    assert len(table) == 18 and (table["seeds"] == 1).all()
    assert list(table["steps"]) == ["500"] * 6 + ["1000"] * 6 + ["500"] * 6  # by dataset, then updates as numbers
    assert table[table["dataset"] == "fake"]["paper_neg_elbo"].isna().all()
    md = table_cells(table1_markdown(table))
    assert "## dataset=mnist_static (latent_dim=64, updates=500, S=100, test images=200)" in md
    assert "## dataset=fake (" in md and "not one of the paper's datasets" in md
    assert "| no flow | 0 | 100.00 ± 0.50 | 97.00 ± 0.40 | 86.55 ± 0.06 [C] | 82.14 [U] | +13.45 | 1 |" in md


def test_omniglot_note_follows_the_data_source_and_protocol():
    md = table_cells(table1_markdown(summarize_table1(rows())))
    omni = md.split("## dataset=omniglot")[1]
    assert "stand-in" in omni and "not Burda" in omni and "NOT comparable" in omni
    assert "Not the paper's evaluation protocol" in omni and "A CPU profile's numbers" in md
    full = rows(num_importance_samples=5000, test_images="all", data_source="/data/chardata.mat")
    md = table_cells(table1_markdown(summarize_table1(full)))
    assert "stand-in" not in md and "chardata.mat (the paper's split)" in md and "Not the paper's evaluation" not in md


def test_files_are_written(tmp_path):
    frame = pd.concat([rows(), rows(seeds=(0,)).assign(model="conv")], ignore_index=True)
    paths = write_table1(frame, tmp_path / "tables")
    assert [p.name for p in paths] == [f"sylvester_table1.{ext}" for ext in ("md", "csv", "tex", "png")]
    md, csv, tex, png = paths
    text = table_cells(md.read_text())
    assert text.count("## dataset=") == 2 and "[C*]" in text and "[U]" in text and "99.33 ± 0.23 [U]" in text
    assert "| O-SNF | 16 | 98.00 ± 1.00 | 95.00 ± 1.00 | 83.32 ± 0.06 [C] | 80.22 [U] | +14.68 | 3 |" in text
    table = pd.read_csv(csv)
    assert len(table) == 12 and set(table["label"]) == set(LABELS) and not math.isnan(table["paper_nll"].iloc[0])
    assert r"\begin{tabular}" in tex.read_text() and r"$\pm$" in tex.read_text() and "mnist\\_static" in tex.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not list((tmp_path / "tables").glob(".*"))  # no temporary files left behind


def test_flow_parameter_counts_beside_the_table():
    """Issue 19: each posterior's flow parameter count (ours, as recorded by the run) beside the authors' count,
    which is shown only where the settings are theirs (z=64, K=4, O-SNF M=8, H-SNF 8 reflections, IAF 320 x 2)."""
    options = {"IAF": {"flow_hidden": 320, "flow_num_hidden": 2}, "O-SNF": {"flow_num_vectors": 8},
               "H-SNF": {"flow_num_householder": 8}}  # fmt: skip
    frame = rows(("mnist_static",), seeds=(0,))
    frame["flow_length"] = [0 if flow == "none" else 4 for flow in frame["flow"]]
    frame["flow_params"] = [AUTHORS_FLOW_PARAMS[label] for *_, label in FLOWS]
    for i, (*_, label) in enumerate(FLOWS):
        for key, value in options.get(label, {}).items():
            frame.loc[i, key] = value
    older = frame.assign(steps=1000, flow_hidden=320, flow_num_hidden=1).drop(columns="flow_params")  # no record
    table = summarize_table1(pd.concat([frame, older], ignore_index=True))
    new, old = table[table["steps"] == "500"].set_index("label"), table[table["steps"] == "1000"].set_index("label")
    assert (new["flow_params"] == new["authors_flow_params"]).all()
    assert new.loc["H-SNF", "flow_params"] == 4_934_400 and new.loc["IAF", "authors_flow_params"] == 740_672
    assert old["flow_params"].isna().all() and math.isnan(old.loc["IAF", "authors_flow_params"])  # 1 layer: not theirs
    assert old.loc["T-SNF", "authors_flow_params"] == 4_408_064
    md = table_cells(table1_markdown(table))
    assert "| flow params (ours) | flow params (authors) |" in md and "| 4,934,400 | 4,934,400 |" in md
    assert "Flow params:" in md


def test_runs_that_differ_in_a_config_key_are_separate_rows():
    """Two runs of one seed that differ in trainer.precision are two rows, each naming its setting (not the latest)."""
    a = rows(("mnist_static",), seeds=(0,), **{"config/trainer/precision": "fp32"})
    b = rows(("mnist_static",), seeds=(0,), **{"config/trainer/precision": "bf16"})
    b["test_neg_elbo"] += 0.25
    b["finished_at"] = "2026-01-02T00:00:00"
    table = summarize_table1(pd.concat([a, b]))
    assert len(table) == 12 and set(table["setting"]) == {"trainer.precision=fp32", "trainer.precision=bf16"}
    planar = table[table["label"] == "planar"].set_index("setting")["test_neg_elbo"]
    assert planar["trainer.precision=bf16"] - planar["trainer.precision=fp32"] == pytest.approx(0.25)
    md = table_cells(table1_markdown(table))
    assert "| planar (trainer.precision=bf16) | 16 |" in md and "| planar (trainer.precision=fp32) | 16 |" in md
    assert summarize_table1(a)["setting"].eq("").all()  # one setting: no label


def test_settings_come_in_the_order_of_their_numbers_not_their_text():
    """optim.lr=2e-05 comes before optim.lr=0.0003 and trainer.patience=9 before 10 (string order puts them after), as
    in Table 2's report."""
    frames = []
    for i, lr in enumerate(("0.001", "2e-05", "0.0003")):
        r = rows(("mnist_static",), seeds=(0,), **{"config/optim/lr": lr})
        r["finished_at"] = f"2026-01-0{i + 1}T00:00:00"
        frames.append(r)
    table = summarize_table1(pd.concat(frames))
    planar = table[table["label"] == "planar"]
    assert list(planar["setting"]) == ["optim.lr=2e-05", "optim.lr=0.0003", "optim.lr=0.001"]
    frames = [rows(("mnist_static",), seeds=(0,), **{"config/trainer/patience": p}) for p in (10, 9)]
    planar = summarize_table1(pd.concat(frames)).query("label == 'planar'")
    assert list(planar["setting"]) == ["trainer.patience=9", "trainer.patience=10"]
