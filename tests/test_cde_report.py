"""nfvi.reports.cde: the dataset x model table beside the benchmark's NF numbers."""

from __future__ import annotations

import pandas as pd
import pytest

from nfvi.reports.cde import pivot, summarize, write
from tests.conftest import table_cells


def row(dataset, model, mean, std, finished="2026-01-01T00:00:00", y_dim=1, **extra):
    return {
        "task": "cde",
        "dataset": dataset,
        "model_name": model,
        "y_dim": y_dim,
        "n_seeds": 5,
        "test_nll_mean": mean,
        "test_nll_std": std,
        "test_nll_standardized_mean": mean - 1.0,
        "test_nll_standardized_std": std,
        "finished_at": finished,
        "run_dir": f"outputs/{dataset}_{model}",
        **extra,
    }


@pytest.fixture
def frame():
    return pd.DataFrame(
        [
            row("concrete", "radial (K=4)", 3.24, 0.09),
            row("fish", "radial (K=8)", 1.30, 0.05),
            row("fish", "radial (K=4)", 1.21, 0.05),
            row("fish", "gaussian", 1.23, 0.08),
            row("fish", "gaussian", 9.99, 0.01, finished="2025-01-01T00:00:00"),  # older: ignored
            row("energy", "planar (K=4)", 2.39, 0.29, y_dim=2),
            row("energy", "mdn (C=5)", 2.60, 0.27, y_dim=2),
        ]
    )


def test_summary_keeps_latest_run_and_orders_datasets_then_models(frame):
    summary = summarize(frame)
    assert list(zip(summary.dataset, summary.model, strict=True)) == [
        ("fish", "gaussian"),
        ("fish", "radial (K=4)"),
        ("fish", "radial (K=8)"),
        ("concrete", "radial (K=4)"),
        ("energy", "mdn (C=5)"),
        ("energy", "planar (K=4)"),
    ]
    assert summary.loc[0, "test_nll_mean"] == pytest.approx(1.23)
    assert summary.set_index("dataset").loc["concrete", "benchmark_nf_nll"] == pytest.approx(1.24)


def test_pivot_cells_bold_best_and_benchmark_column(frame):
    table = pivot(summarize(frame)).set_index("dataset")
    assert list(table.columns) == [
        "gaussian",
        "mdn (C=5)",
        "planar (K=4)",
        "radial (K=4)",
        "radial (K=8)",
        "NF (benchmark)",
    ]
    assert table.loc["fish (1-D)", "radial (K=4)"] == "**1.21 ± 0.05**"
    assert table.loc["fish (1-D)", "gaussian"] == "1.23 ± 0.08"
    assert table.loc["concrete (1-D)", "radial (K=4)"] == "3.24 ± 0.09"  # alone in its row: not bold
    assert table.loc["energy (2-D)", "gaussian"] == ""
    assert table.loc["energy (2-D)", "NF (benchmark)"] == "1.89"


def test_true_density_column_only_with_synthetic_rows(frame):
    assert "true density" not in pivot(summarize(frame)).columns
    with_truth = pd.concat([frame, pd.DataFrame([row("sine", "gaussian", -0.87, 0.01, true_nll=-0.8836)])])
    table = pivot(summarize(with_truth)).set_index("dataset")
    assert table.loc["sine (1-D)", "true density"] == "-0.88" and table.loc["fish (1-D)", "true density"] == ""


def test_write_creates_markdown_csv_and_figure(tmp_path, frame):
    paths = write(frame, tmp_path / "tables")
    assert [p.name for p in paths] == ["cde.md", "cde.csv", "cde.png"]
    assert paths[2].read_bytes()[:4] == b"\x89PNG"
    md = table_cells(paths[0].read_text())
    assert "| fish (1-D) | 1.23 ± 0.08 |" in md and "NF (benchmark)" in md and "test NLL (standardised y)" in md
    csv = pd.read_csv(paths[1])
    assert len(csv) == 6 and {"test_nll_mean", "test_nll_standardized_mean", "benchmark_nf_nll"} <= set(csv.columns)
