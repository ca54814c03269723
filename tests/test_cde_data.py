"""nfvi.cde.data: UCI readers (real files and generated ones), one-line errors, download, splits."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import socket
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nfvi.cde import data as cde_data
from nfvi.cde.data import (
    UCI_DATASETS,
    fetch_uci,
    load_uci,
    make_synthetic,
    read_uci_file,
    split_and_standardize,
    table_checksum,
)
from nfvi.errors import NfviError
from tests.conftest import LocalHTTPServer

DATA = os.environ.get("NFVI_DATA")
needs_data = pytest.mark.skipif(not DATA or not Path(DATA, "uci").is_dir(), reason="NFVI_DATA/uci not available")

# ------------------------------------------------------------------ the real files


@pytest.mark.data
@needs_data
@pytest.mark.parametrize("name", list(UCI_DATASETS))
def test_real_file_has_suite_shape_and_checksum(name):
    spec = UCI_DATASETS[name]
    table = load_uci(name, DATA, download=False)
    assert (len(table.y), table.x.shape[1], table.y.shape[1]) == spec.shape
    assert table.table_sha256 == spec.table_sha256
    assert table.file_sha256 == spec.sha256
    assert np.isfinite(table.x).all() and np.isfinite(table.y).all()


@pytest.mark.data
@needs_data
@pytest.mark.parametrize("name,csv", [("concrete", "Concrete_Data.csv"), ("energy", "ENB2012_data.csv")])
def test_derived_csv_gives_the_same_table(name, csv):
    table = load_uci(name, DATA, data_file=Path(DATA, "uci", csv), download=False)
    assert table.table_sha256 == UCI_DATASETS[name].table_sha256


@pytest.mark.data
@needs_data
def test_air_csv_version_is_rounded_so_verify_rejects_it_and_verify_false_accepts_it():
    csv = Path(DATA, "uci", "AirQualityUCI.csv")
    with pytest.raises(NfviError, match="verify=false") as err:
        load_uci("air", DATA, data_file=csv, download=False)
    assert "\n" not in str(err.value)
    assert load_uci("air", DATA, data_file=csv, download=False, verify=False).y.shape == (8991, 3)


# ------------------------------------------------------------------ generated files in UCI's formats


def fish_text(rows: int = 30, sep: str = ";", seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    values = rng.uniform(0, 5, size=(rows, 7)).round(3)
    return "\r\n".join(sep.join(f"{v:.3f}" for v in row) for row in values) + "\r\n"


def energy_frame(rows: int = 30) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    cols = [f"X{i}" for i in range(1, 9)] + ["Y1", "Y2"]
    return pd.DataFrame(rng.uniform(0, 40, size=(rows, 10)).round(2), columns=cols)


def skill_frame(rows: int = 30) -> pd.DataFrame:
    spec = UCI_DATASETS["skillcraft"]
    rng = np.random.default_rng(2)
    cols = ["GameID", *spec.x_columns[:10], *spec.y_columns, *spec.x_columns[10:]]
    frame = pd.DataFrame(rng.uniform(1, 9, size=(rows, len(cols))).round(3), columns=cols).astype(object)
    frame.loc[[3, 7], "Age"] = "?"
    return frame


def test_fish_reader_reads_semicolon_file_without_header(tmp_path):
    path = tmp_path / "qsar_fish_toxicity.csv"
    path.write_text(fish_text(30))
    table = read_uci_file(UCI_DATASETS["fish"], path)
    assert table.x.shape == (30, 6) and table.y.shape == (30, 1)
    raw = np.loadtxt(path, delimiter=";")
    np.testing.assert_allclose(table.y[:, 0], raw[:, 6])


def test_fish_reader_skips_a_header_line_someone_added(tmp_path):
    path = tmp_path / "fish.csv"
    path.write_text("CIC0;SM1_Dz(Z);GATS1i;NdsCH;NdssC;MLOGP;LC50\r\n" + fish_text(20))
    assert read_uci_file(UCI_DATASETS["fish"], path).y.shape == (20, 1)


def test_energy_reader_reads_xlsx_and_keeps_768_rows(tmp_path):
    path = tmp_path / "ENB2012_data.xlsx"
    energy_frame(800).to_excel(path, index=False)
    table = read_uci_file(UCI_DATASETS["energy"], path)
    assert table.x.shape == (768, 8) and table.y.shape == (768, 2)


def test_skillcraft_reader_drops_rows_with_question_marks(tmp_path):
    path = tmp_path / "SkillCraft1_Dataset.csv"
    skill_frame(30).to_csv(path, index=False)
    table = read_uci_file(UCI_DATASETS["skillcraft"], path)
    assert table.x.shape == (28, 15) and table.y.shape == (28, 4)


def _write_bad(kind: str, tmp_path: Path) -> tuple[str, Path]:
    if kind == "wrong delimiter":
        path = tmp_path / "fish.csv"
        path.write_text(fish_text(20, sep=","))
        return "fish", path
    if kind == "missing column":
        path = tmp_path / "energy.csv"
        energy_frame().drop(columns=["Y2"]).to_csv(path, index=False)
        return "energy", path
    if kind == "NaN":
        path = tmp_path / "fish.csv"
        lines = fish_text(20).splitlines()
        lines[4] = "3.252;0.223;;0;;2.51;4.093"  # the spurious incomplete line of one public copy
        path.write_text("\n".join(lines))
        return "fish", path
    if kind == "non-numeric":
        path = tmp_path / "energy.csv"
        frame = energy_frame().astype(object)
        frame.loc[5, "X3"] = "abc"
        frame.to_csv(path, index=False)
        return "energy", path
    if kind == "not excel":
        path = tmp_path / "Concrete_Data.xls"
        path.write_text("this is not a spreadsheet")
        return "concrete", path
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind,message",
    [
        ("wrong delimiter", "wrong delimiter"),
        ("missing column", "'Y2'"),
        ("NaN", "missing (NaN/empty) values"),
        ("non-numeric", "non-numeric value 'abc' in column 'X3'"),
        ("not excel", "cannot read it as an Excel file"),
    ],
)
def test_bad_file_gives_one_line_error(tmp_path, kind, message):
    name, path = _write_bad(kind, tmp_path)
    with pytest.raises(NfviError) as err:
        load_uci(name, tmp_path, data_file=path, download=False, verify=False)
    text = str(err.value)
    assert message in text and "\n" not in text and f"dataset={name}" in text


def test_missing_file_without_download_names_path_and_source(tmp_path):
    with pytest.raises(NfviError) as err:
        load_uci("concrete", tmp_path, download=False)
    text = str(err.value)
    assert str(tmp_path / "uci" / "Concrete_Data.xls") in text and "archive.ics.uci.edu" in text
    assert "\n" not in text


def test_modified_copy_fails_verify_but_loads_with_verify_false(tmp_path):
    path = tmp_path / "fish.csv"
    path.write_text(fish_text(25))
    with pytest.raises(NfviError, match="differs from the UCI release"):
        load_uci("fish", tmp_path, data_file=path, download=False)
    assert load_uci("fish", tmp_path, data_file=path, download=False, verify=False).x.shape == (25, 6)


# ------------------------------------------------------------------ download from a local HTTP server


def _server(files: dict[str, bytes]) -> LocalHTTPServer:
    """Serve ``files`` (name -> bytes) on 127.0.0.1 at ``url(name)``; a context manager."""
    return LocalHTTPServer({f"/{name}": (200, body, None) for name, body in files.items()})


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def fish_spec(monkeypatch, tmp_path_factory):
    """The fish spec with the checksums of a generated file (so these tests need no real data)."""
    content = fish_text(40).encode()
    path = tmp_path_factory.mktemp("spec") / "qsar_fish_toxicity.csv"
    path.write_bytes(content)
    spec = UCI_DATASETS["fish"]
    checksum = read_uci_file(spec, path).table_sha256
    spec = dataclasses.replace(spec, sha256=hashlib.sha256(content).hexdigest(), table_sha256=checksum)
    monkeypatch.setitem(cde_data.UCI_DATASETS, "fish", spec)
    return spec, content


def _corrupt(blob: bytes) -> bytes:
    data = bytearray(blob)
    start = 60  # inside the first member's compressed data: the CRC check fails
    data[start : start + 8] = bytes(b ^ 0xFF for b in data[start : start + 8])
    return bytes(data)


def test_download_good_zip_writes_the_member(tmp_path, fish_spec):
    spec, content = fish_spec
    files = {"fish.zip": _zip({"qsar_fish_toxicity.csv": content, "readme.txt": b"x"})}
    with _server(files) as server:
        table = load_uci("fish", tmp_path, url=server.url("fish.zip"))
    target = tmp_path / "uci" / "qsar_fish_toxicity.csv"
    assert target.read_bytes() == content
    assert table.y.shape == (40, 1) and table.file_sha256 == spec.sha256
    assert sorted(p.name for p in (tmp_path / "uci").iterdir()) == ["qsar_fish_toxicity.csv"]  # no leftovers


def test_download_accepts_the_raw_file_and_a_reencoded_copy_with_the_same_table(tmp_path, fish_spec):
    spec, content = fish_spec
    reencoded = content.replace(b"\r\n", b"\n")  # other bytes, same table
    with _server({"raw.csv": content, "lf.zip": _zip({"data/qsar_fish_toxicity.csv": reencoded})}) as server:
        fetch_uci(spec, tmp_path / "a.csv", server.url("raw.csv"))
        fetch_uci(spec, tmp_path / "b.csv", server.url("lf.zip"))
    assert (tmp_path / "a.csv").read_bytes() == content
    assert (tmp_path / "b.csv").read_bytes() == reencoded


@pytest.mark.parametrize(
    "case,message",
    [
        ("corrupt zip", "is corrupt"),
        ("other data", "does not match the UCI release"),
        ("no member", "has no member qsar_fish_toxicity.csv"),
        ("404", "download failed"),
        ("offline", "download failed"),
    ],
)
def test_download_failures_are_one_line_and_write_nothing(tmp_path, fish_spec, case, message):
    spec, content = fish_spec
    files = {
        "corrupt.zip": _corrupt(_zip({"qsar_fish_toxicity.csv": content})),
        "other.zip": _zip({"qsar_fish_toxicity.csv": fish_text(40, seed=9).encode()}),
        "nomember.zip": _zip({"something_else.csv": content}),
    }
    with _server(files) as server, socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
        url = {
            "corrupt zip": server.url("corrupt.zip"),
            "other data": server.url("other.zip"),
            "no member": server.url("nomember.zip"),
            "404": server.url("absent.zip"),
            "offline": f"http://127.0.0.1:{unused.getsockname()[1]}/fish.zip",
        }[case]
        with pytest.raises(NfviError) as err:
            load_uci("fish", tmp_path, url=url)
    text = str(err.value)
    assert message in text and "\n" not in text
    assert not (tmp_path / "uci").exists()  # the folder made for the file goes too; the data root stays
    assert tmp_path.exists()


# ------------------------------------------------------------------ synthetic sets and splits


def test_synthetic_entropies_match_monte_carlo():
    sine = make_synthetic("sine", 20000)
    assert sine.true_nll == pytest.approx(0.5 * np.log(2 * np.pi * np.e * 0.01))
    bimodal = make_synthetic("bimodal", 20000)
    mc = -bimodal.true_log_prob(bimodal.x, bimodal.y).mean()
    assert bimodal.true_nll == pytest.approx(mc, abs=0.02)
    assert bimodal.true_nll == pytest.approx(np.log(2) + 0.5 * np.log(2 * np.pi * np.e * 0.04), abs=0.01)


@pytest.mark.parametrize("seed", [0, 3])
def test_split_is_a_partition_standardised_by_training_split(seed):
    table = make_synthetic("bimodal", 500)
    split = split_and_standardize(table, seed, test_fraction=0.3, val_fraction=0.2)
    assert (len(split.y_train), len(split.y_val), len(split.y_test)) == (280, 70, 150)
    train_y = np.concatenate([split.y_train, split.y_val])
    np.testing.assert_allclose(train_y.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(train_y.std(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(split.y_test * split.y_std + split.y_mean, table.y[split.test_index], atol=1e-5)
    other = split_and_standardize(table, seed + 1)
    assert not np.array_equal(other.test_index, split.test_index)
    assert split.log_std_y == pytest.approx(np.log(table.y[np.setdiff1d(np.arange(500), split.test_index)].std()))


def test_table_checksum_ignores_float_noise_but_sees_a_change():
    x, y = np.random.default_rng(0).normal(size=(50, 3)), np.random.default_rng(1).normal(size=(50, 1))
    assert table_checksum(x, y) == table_checksum(x * (1 + 1e-15), y)
    y2 = y.copy()
    y2[7] += 1e-3
    assert table_checksum(x, y) != table_checksum(x, y2)


# ------------------------------------------------------------------ cells and columns float64 cannot standardise


def _fish_with_cell(tmp_path, row: int, col: int, text: str) -> Path:
    """A fish file (no header) whose 1-based ``row`` has ``text`` in column ``col`` (0-based)."""
    lines = fish_text(30).split("\r\n")
    cells = lines[row - 1].split(";")
    cells[col] = text
    lines[row - 1] = ";".join(cells)
    path = tmp_path / "qsar_fish_toxicity.csv"
    path.write_text("\r\n".join(lines))
    return path


@pytest.mark.parametrize("text", ["inf", "-inf", "1e400", "1e300", "-1e200"])
def test_non_finite_or_overflowing_cell_is_refused_naming_file_row_and_column(tmp_path, text):
    path = _fish_with_cell(tmp_path, 7, 6, text)
    with pytest.raises(NfviError) as err:
        read_uci_file(UCI_DATASETS["fish"], path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "'LC50'" in msg and "row 7 of the file" in msg


def test_bad_cell_row_counts_the_header_line(tmp_path):
    frame = energy_frame(30)
    frame.loc[4, "X3"] = np.inf  # the 5th data row: row 6 of the sheet, under the header
    path = tmp_path / "ENB2012_data.xlsx"
    frame.to_excel(path, index=False)
    with pytest.raises(NfviError, match=r"inf.*'X3' at row 6 of the file"):
        read_uci_file(UCI_DATASETS["energy"], path)


def _fish_table(tmp_path, **columns) -> cde_data.Table:
    table = read_uci_file(UCI_DATASETS["fish"], _fish_with_cell(tmp_path, 1, 0, "1.0"))
    table.x, table.y = table.x.copy(), table.y.copy()
    for name, values in columns.items():
        part, j = ("y", 0) if name == "LC50" else ("x", list(cde_data._FISH).index(name))
        getattr(table, part)[:, j] = values
    return table


def test_constant_target_is_refused_naming_the_column_and_dataset(tmp_path):
    table = _fish_table(tmp_path, LC50=3.0)
    with pytest.raises(NfviError, match=r"dataset=fish \(.*qsar_fish_toxicity.csv\): y column 'LC50' is constant"):
        split_and_standardize(table, 0)


@pytest.mark.parametrize("scale", [1e-200, 1e-160])
def test_target_too_small_for_float64_is_refused(tmp_path, scale):
    table = _fish_table(tmp_path)
    table.y = table.y * scale
    with pytest.raises(NfviError, match=r"y column 'LC50' cannot be standardised in float64 \(all its values"):
        split_and_standardize(table, 0)


def test_target_with_no_spread_relative_to_its_mean_is_refused(tmp_path):
    table = _fish_table(tmp_path)
    table.y = 1e6 + table.y * 1e-8  # spread 1e-14 of the mean: about 100 ulps
    with pytest.raises(NfviError, match=r"'LC50' cannot be standardised.*std .* below 1e-12 x \|mean\|"):
        split_and_standardize(table, 0)


def test_constant_feature_is_kept_as_zeros(tmp_path):
    table = _fish_table(tmp_path, NdsCH=2.0)
    split = split_and_standardize(table, 0)
    j = list(cde_data._FISH).index("NdsCH")
    assert (split.x_train[:, j] == 0).all() and np.isfinite(split.x_train).all()
    tiny = _fish_table(tmp_path)
    tiny.x[:, j] *= 1e-200  # not constant, but its spread underflows: refused rather than silently lost
    with pytest.raises(NfviError, match=r"x column 'NdsCH' cannot be standardised"):
        split_and_standardize(tiny, 0)


@pytest.mark.parametrize("value", [np.inf, np.nan, 1e300])
def test_split_refuses_a_bad_cell_of_any_table_naming_row_and_column(value):
    table = make_synthetic("sine", 50)
    table.y[11, 0] = value
    with pytest.raises(NfviError, match=r"dataset=sine \(synthetic:sine\(n=50\)\): .* in y column 'y' at table row 12"):
        split_and_standardize(table, 0)
    assert np.isfinite(split_and_standardize(make_synthetic("bimodal", 50), 0).y_train).all()
