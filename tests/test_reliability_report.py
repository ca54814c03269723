"""``nfvi report`` never loses a run silently and never shows a wrong number unflagged.

Skipped files get one warning line each (logger ``nfvi.report``); unfinished runs carry ``†``; a KL from a
noisy importance-sampling estimate (negative, or S < 100) carries ``‡``; a run with a non-finite headline
metric never replaces a good one.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from nfvi.reports import cde as cde_report
from nfvi.reports import energy as energy_report
from nfvi.reports import vae as vae_report
from nfvi.reports.cifar import summarize_table3, table3_markdown
from nfvi.reports.task import collect, run
from tests.conftest import table_cells
from tests.test_cde_report import row as cde_row
from tests.test_reports_vae import result as vae_row


def _write(root: Path, name: str, content) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    text = content if isinstance(content, str) else json.dumps(content)
    (run_dir / "results.json").write_text(text)
    return run_dir / "results.json"


def _report(root: Path, out: Path) -> dict:
    cfg = SimpleNamespace(search=[str(root)], out_dir=str(out), tasks=[], paths=SimpleNamespace(output_dir=str(root)))
    return run(cfg)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "nfvi.report" and r.levelno == logging.WARNING]


# ------------------------------------------------------------------ 1. every skipped file: one warning line


BAD_FILES = {
    "truncated": ('{"task": "vae", "test_nll": 9', "unreadable"),
    "array": ("[1, 2, 3]", "not a JSON object (a list)"),
    "number": ("42", "not a JSON object (a int)"),
    "no_task": ({"dataset": "mnist", "test_nll": 90.0}, "no 'task' field"),
    "unknown_task": ({"task": "gan", "fid": 3.0}, "unknown task 'gan'"),
    "list_task": ({"task": ["vae"]}, "unknown task ['vae']"),
    "missing": ({k: v for k, v in vae_row("planar", 2).items() if k != "test_nll"}, "'test_nll' is missing or null"),
    "wrong_type": (vae_row("planar", 2, flow_length="two"), "'flow_length' is not a number ('two')"),
    "wrong_str": (vae_row("planar", 2, dataset=7), "'dataset' is not a string (7)"),
    "fractional": (vae_row("planar", 2, seed=0.5), "'seed' is not a whole number (0.5)"),
    "energy_missing": ({"task": "energy", "target": "U1", "flow": "planar", "flow_length": 2}, "'steps' is missing"),
    "cde_null": (cde_row("fish", "gaussian", 1.0, 0.1) | {"test_nll_mean": None}, "'test_nll_mean' is missing"),
}


def test_each_unusable_file_is_skipped_with_one_warning_line_naming_it_and_why(tmp_path, caplog):
    root = tmp_path / "runs"
    paths = {name: _write(root, name, content) for name, (content, _) in BAD_FILES.items()}
    good = _write(root, "good", vae_row("planar", 2))
    (root / "binary").mkdir()
    (root / "binary" / "results.json").write_bytes(b"\xff\xfe\x00garbage")
    caplog.set_level(logging.WARNING, logger="nfvi.report")
    written = _report(root, tmp_path / "tables")
    assert list(written) == ["vae"]  # the good run is still reported
    assert "DLGM + NF (planar) (K=2)" in table_cells((tmp_path / "tables" / "vae_table2.md").read_text())
    messages = _warnings(caplog)
    assert len(messages) == len(BAD_FILES) + 1
    assert all("\n" not in m for m in messages)
    for name, (_, why) in BAD_FILES.items():
        [line] = [m for m in messages if str(paths[name]) in m]
        assert why in line, (name, line)
    assert any(str(root / "binary" / "results.json") in m and "unreadable" in m for m in messages)
    assert not any(str(good) in m for m in messages)


def test_cli_prints_the_warnings_on_stderr_without_a_traceback(tmp_path):
    import subprocess

    root = tmp_path / "outputs"
    _write(root, "array", "[]")
    _write(root, "good", vae_row("planar", 2))
    proc = subprocess.run(
        [sys.executable, "-m", "nfvi", "report", f"paths.output_dir={root}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if "skipping" in x]
    assert str(root / "array" / "results.json") in line and "not a JSON object" in line
    assert (root / "tables" / "vae_table2.md").is_file()


def test_only_unusable_files_is_a_one_line_error(tmp_path):
    from nfvi.errors import NfviError

    _write(tmp_path / "runs", "array", "[]")
    with pytest.raises(NfviError, match="no usable results.json"):
        _report(tmp_path / "runs", tmp_path / "tables")


def test_collect_keeps_non_objects_out_and_old_nan_tokens_parse(tmp_path, caplog):
    _write(tmp_path, "a", "[]")
    _write(tmp_path, "b", '{"task": "energy", "kl": NaN, "bound": Infinity}')
    frame = collect([tmp_path])
    assert len(frame) == 1 and pd.isna(frame.loc[0, "kl"]) and frame.loc[0, "bound"] == float("inf")


# ------------------------------------------------------------------ 4. a non-finite headline metric never wins


def test_cde_run_with_nan_never_replaces_the_good_one(tmp_path, caplog):
    root = tmp_path / "runs"
    _write(root, "good", cde_row("fish", "gaussian", 1.23, 0.08, finished="2026-01-01T00:00:00"))
    newer = cde_row("fish", "gaussian", 0.0, 0.0, finished="2026-06-01T00:00:00")
    bad = _write(root, "nan", json.dumps(newer).replace('"test_nll_mean": 0.0', '"test_nll_mean": NaN'))
    inf = _write(root, "inf", json.dumps(newer).replace('"test_nll_mean": 0.0', '"test_nll_mean": 1e400'))
    caplog.set_level(logging.WARNING, logger="nfvi.report")
    _report(root, tmp_path / "tables")
    md = table_cells((tmp_path / "tables" / "cde.md").read_text())
    assert "| fish (1-D) | 1.23 ± 0.08 |" in md
    messages = _warnings(caplog)
    assert any(str(bad) in m and "'test_nll_mean' is missing or null" in m for m in messages)
    assert any(str(inf) in m and "'test_nll_mean' is not finite (inf)" in m for m in messages)


def test_writers_themselves_never_choose_a_non_finite_run():
    frame = pd.DataFrame(
        [
            cde_row("fish", "gaussian", 1.23, 0.08, finished="2026-01-01T00:00:00"),
            cde_row("fish", "gaussian", float("nan"), 0.0, finished="2026-06-01T00:00:00"),
        ]
    )
    assert cde_report.summarize(frame)["test_nll_mean"].tolist() == [1.23]
    vae = pd.DataFrame([vae_row("planar", 2, nll=90.0), vae_row("planar", 2, nll=float("inf"), finished="2026")])
    assert vae_report.summarize(vae)["nll"].tolist() == [90.0]


def test_optional_non_finite_numbers_count_as_missing(tmp_path):
    root = tmp_path / "runs"
    _write(
        root,
        "se",
        json.dumps(vae_row("planar", 2, test_nll_se=0.0)).replace('"test_nll_se": 0.0', '"test_nll_se": NaN'),
    )
    _report(root, tmp_path / "tables")
    assert "| DLGM + NF (planar) (K=2) | 95.00 ± 0.60 | 90.00 |" in table_cells(
        (tmp_path / "tables" / "vae_table2.md").read_text()
    )


# ------------------------------------------------------------------ 2. unfinished runs are marked


def test_unfinished_vae_run_is_marked_in_table2_with_a_legend(tmp_path):
    root = tmp_path / "runs"
    _write(root, "short", vae_row("planar", 10, steps=661, config={"trainer": {"steps": 500000}}))
    _write(root, "done", vae_row("planar", 20, steps=1000, config={"trainer": {"steps": 1000}}))
    _write(
        root, "flag", vae_row("planar", 40, steps=1000) | {"finished": False}
    )  # no target recorded, but not finished
    _write(root, "unknown", vae_row("planar", 80, steps=1000))  # target unknown: not flagged
    _report(root, tmp_path / "tables")
    md = table_cells((tmp_path / "tables" / "vae_table2.md").read_text())
    assert "| DLGM + NF (planar) (K=10) † (unfinished: 661/500,000 updates) |" in md
    assert "| DLGM + NF (planar) (K=20) |" in md and "| DLGM + NF (planar) (K=80) |" in md
    assert "| DLGM + NF (planar) (K=40) † (unfinished: 1,000 updates, finished=false) |" in md
    assert md.count("† unfinished: the run stopped before its configured number of updates") == 1
    tex = (tmp_path / "tables" / "vae_table2.tex").read_text()
    assert r"(K=10) $^\dagger$ (unfinished: 661/500,000 updates)" in tex and r"$^\dagger$ unfinished:" in tex
    csv = pd.read_csv(tmp_path / "tables" / "vae_table2.csv").set_index("K")
    assert csv.loc[10, "unfinished"] == "661/500,000 updates" and pd.isna(csv.loc[20, "unfinished"])


def test_finished_runs_get_no_markers_and_no_legends(tmp_path):
    root = tmp_path / "runs"
    _write(root, "a", vae_row("planar", 10, config={"trainer": {"steps": 1000}}))
    _report(root, tmp_path / "tables")
    md = table_cells((tmp_path / "tables" / "vae_table2.md").read_text())
    assert "†" not in md and "‡" not in md


def test_unfinished_run_is_marked_in_table3():
    frame = pd.DataFrame(
        [
            vae_row(
                "planar",
                2,
                dataset="cifar10_patches",
                nll=-250.0,
                neg_elbo=-240.0,
                steps=5,
                **{"config/trainer/steps": 100},
            ),  # fmt: skip
        ]
    )
    md = table_cells(table3_markdown(summarize_table3(frame)))
    assert "| DLGM + NF (planar) † (unfinished: 5/100 updates) | 2 |" in md and "† unfinished:" in md


def test_unfinished_energy_run_is_marked(tmp_path):
    from tests.test_reports_energy import _fake_run

    runs = tmp_path / "runs"
    _fake_run(runs, "U1", "planar", 2)
    short = _fake_run(runs, "U1", "planar", 8, steps=50)
    data = json.loads((short / "results.json").read_text())
    (short / "results.json").write_text(json.dumps(data | {"config": {"trainer": {"steps": 100}}}))
    energy_report.write(collect([runs]), tmp_path / "tables")
    md = table_cells((tmp_path / "tables" / "energy.md").read_text())
    assert "| U1 | planar NF † |" in md and "50/100 updates" in md and "† unfinished:" in md
    csv = pd.read_csv(tmp_path / "tables" / "energy.csv")
    assert sorted(csv["unfinished"].fillna("")) == ["", "50/100 updates"]


def test_cde_run_with_fewer_seeds_than_named_is_marked(tmp_path):
    frame = pd.DataFrame(
        [
            cde_row("fish", "gaussian", 1.23, 0.08, n_seeds=3, seeds=[0, 1, 2, 3, 4]),
            cde_row("fish", "mdn (C=5)", 1.3, 0.1, seeds=[0, 1, 2, 3, 4]),
        ]
    )
    md = table_cells(cde_report.write(frame, tmp_path)[0].read_text())
    assert "| fish (1-D) | **1.23 ± 0.08 †** |" in md or "| fish (1-D) | **1.23 ± 0.08** † |" in md
    assert "3/5 seeds" in md and "† unfinished: fewer seeds" in md


# ------------------------------------------------------------------ 3. a KL from a noisy IS estimate carries a caveat


@pytest.mark.parametrize("kw", [{"nll": 96.0, "neg_elbo": 95.0}, {"num_importance_samples": 10}])
def test_negative_kl_or_small_s_carries_a_caveat_in_markdown_and_latex(tmp_path, kw):
    frame = collect([_write(tmp_path / "runs", "a", vae_row("planar", 10, **kw)).parent])
    paths = vae_report.write(frame, tmp_path / "tables")
    md, tex = table_cells(paths[0].read_text()), paths[2].read_text()
    kl_cell = md.split("| DLGM + NF (planar) (K=10) | ")[1].split(" | ")[2]
    assert kl_cell.endswith("‡")
    assert "‡ -ln p(x) is an importance-sampling estimate that is noisy" in md and "is then not a KL" in md
    assert r"$^\ddagger$" in tex and r"S $<$ 100" in tex


def test_table3_kl_caveat_at_small_s():
    frame = pd.DataFrame([vae_row("planar", 2, dataset="cifar10_patches", nll=-250.0, neg_elbo=-240.0,
                                  num_importance_samples=20)])  # fmt: skip
    md = table_cells(table3_markdown(summarize_table3(frame)))
    assert "| 10.00 ‡ |" in md and "is then not a KL" in md
