"""``nfvi.reports.energy.write`` on synthetic run directories: Figure 3, Figure 3(d), markdown and CSV."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from nfvi.reports.energy import summarize, to_markdown, write
from nfvi.reports.task import collect
from nfvi.runs import write_json
from tests.conftest import table_cells


def _fake_run(root, target, flow, length, seed=0, steps=100, bound=-1.0, kl=0.5, finished="2026-01-01T00:00:00",
              density=True, wall=0.1):  # fmt: skip
    run = root / f"{target}_{flow}_K{length}_seed{seed}_{steps}_{finished[:4]}_wall{wall}"
    run.mkdir(parents=True)
    write_json(
        run / "results.json",
        {"task": "energy", "target": target, "flow": flow, "flow_length": length, "seed": seed, "steps": steps,
         "bound": bound, "kl": kl, "kl_mc": kl + 0.01, "log_z": 1.88, "mass_outside_box": 0.0, "wall": wall,
         "box": "[-4, 4]^2", "units": {"bound": "nats", "kl": "nats"}, "finished_at": finished},
    )  # fmt: skip
    if density:
        c = np.linspace(-3.8, 3.8, 20)
        z1, z2 = np.meshgrid(c, c)
        log_p = -0.5 * (z1**2 + z2**2) - math.log(2 * math.pi)
        np.savez(run / "density.npz", centres=c, log_q=log_p - 0.1 * z1, log_p=log_p, box=np.float64(4.0))
    return run


@pytest.fixture
def frame(tmp_path):
    runs = tmp_path / "runs"
    for target in ("U1", "U2"):
        for flow in ("planar", "nice"):
            for length in (2, 8):
                _fake_run(runs, target, flow, length, bound=-1.0 - length / 10, kl=1.0 / length)
    _fake_run(runs, "U1", "planar", 2, seed=1, bound=-1.4, kl=0.3)  # a second seed: averaged
    _fake_run(runs, "U1", "planar", 2, seed=1, bound=-9.0, kl=9.0, finished="2025-01-01T00:00:00")  # older: dropped
    _fake_run(runs, "U2", "radial", 8, density=False)  # no density.npz: an empty panel, not a crash
    return collect([runs])


def test_summarize_averages_seeds_and_keeps_the_latest_repeat(frame):
    table = summarize(frame)
    row = table[(table.target == "U1") & (table.flow == "planar") & (table.flow_length == 2)].iloc[0]
    assert row["runs"] == 2
    assert row["bound"] == pytest.approx((-1.2 - 1.4) / 2) and row["kl"] == pytest.approx((0.5 + 0.3) / 2)
    assert list(table[table.target == "U1"].flow.unique()) == ["planar", "nice"]  # paper order, not alphabetical


def test_write_produces_figures_and_tables(frame, tmp_path):
    out = tmp_path / "tables"
    paths = write(frame, out)
    names = sorted(p.name for p in paths)
    assert names == ["energy.csv", "energy.md", "energy_fig3.png", "energy_fig3d.png"]
    for p in paths:
        assert p.exists() and p.stat().st_size > 0
    for png in ("energy_fig3.png", "energy_fig3d.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    csv = pd.read_csv(out / "energy.csv")
    assert len(csv) == 9 and {"target", "flow", "flow_length", "steps", "runs", "bound", "kl"} <= set(csv.columns)
    md = table_cells((out / "energy.md").read_text())
    assert "| target | flow | K=2 | K=8 |" in md
    assert "| U1 | planar NF | -1.300 | -1.800 |\n| U1 | NICE | -1.200 | -1.800 |" in md  # planar: mean of 2 seeds
    assert "[-4, 4]^2" in md


def test_figure3_has_one_row_per_target_and_a_column_per_flow_and_length(frame, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    shapes = []
    real = plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda *a, **k: shapes.append(a[:2]) or real(*a, **k))
    write(frame, tmp_path / "tables")
    # Figure 3: 2 targets x (truth + planar K2, K8 + radial K8 + nice K2, K8); Figure 3(d): 2 rows x 2 targets
    assert shapes == [(2, 6), (2, 2)]


def test_runs_with_another_wall_get_their_own_rows_and_are_never_mixed_in(frame, tmp_path):
    """A wall=0 run (the raw, improper U2-U4) with a longer schedule must not take a wall=0.1 cell."""
    _fake_run(tmp_path / "runs", "U2", "planar", 8, steps=8000, bound=-9.0, wall=0.0)
    write(collect([tmp_path / "runs"]), tmp_path / "tables")
    md = table_cells((tmp_path / "tables" / "energy.md").read_text())
    assert "| U2 | planar NF, wall=0.1 | -1.200 | -1.800 |" in md
    assert "| U2 | planar NF, wall=0 |  | -9.000 |" in md


def test_to_markdown_formats_numbers_and_blanks():
    table = pd.DataFrame({"a": ["x", "y"], "b": [1.23456, math.nan]})
    # pandas' to_markdown (tabulate): columns padded to their widest cell; the numbers keep floatfmt's digits
    assert to_markdown(table, ".2f").splitlines() == [
        "| a   | b    |",
        "|:----|:-----|",
        "| x   | 1.23 |",
        "| y   |      |",
    ]
    assert to_markdown(pd.DataFrame({"n": [0.1, 1000.0]}), ".2f").splitlines()[2:] == ["| 0.10    |", "| 1000.00 |"]


def test_the_new_flow_kinds_get_labels_and_an_order():
    """Figure 3 / 3(d) tables name IAF and Householder fits (the kinds with an inverse for the grid density)."""
    from nfvi.reports.energy import FLOW_LABEL, FLOW_ORDER

    assert FLOW_LABEL["iaf"] == "IAF" and FLOW_LABEL["householder"] == "Householder"
    assert FLOW_ORDER["nice"] < FLOW_ORDER["iaf"] < FLOW_ORDER["householder"]
