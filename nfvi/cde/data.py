"""Data for ``nfvi cde``: the DDN benchmark suite's UCI tables and two synthetic sets; splits.

The seven UCI sets of Chen et al. (DDN, AAAI 2022; docs/paper.md section 8) are read from the files UCI
ships, in their original formats (``;``-separated csv for Fish, ``.xls`` for Concrete, ``.xlsx``
for Energy and Air, csv with ``?`` for SkillCraft, ...), so a user can point ``data_file`` at their
own download. Each loader applies the suite's cleaning (docs/cde.md, section "Data")
and returns a :class:`Table` with ``x`` of shape ``(N, D_x)`` and ``y`` of shape ``(N, D_y)``.

Missing files are fetched from UCI (``https://archive.ics.uci.edu/static/public/<id>/<name>.zip``)
through :func:`nfvi.download.download`: the zip goes to a temporary folder, the member is checked
and only then written atomically. UCI's zips carry no published checksum, so the **member** is
checked: its sha256 against the reference copy, or else the checksum of the cleaned table
(:func:`table_checksum`), since a byte-identical copy of some UCI files does not exist (the
Concrete workbook carries the name of whoever last opened it in Excel).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd

from nfvi.download import download, sha256_of
from nfvi.errors import NfviError, check_choice, check_range
from nfvi.runs import atomic_write_bytes

__all__ = [
    "UCISpec",
    "UCI_DATASETS",
    "SYNTHETIC_DATASETS",
    "DATASETS",
    "BENCHMARK_NF_NLL",
    "Table",
    "Split",
    "load_dataset",
    "load_uci",
    "read_uci_file",
    "fetch_uci",
    "table_checksum",
    "make_synthetic",
    "split_and_standardize",
]

UCI = "https://archive.ics.uci.edu/static/public"


@dataclass(frozen=True)
class UCISpec:
    """One UCI table: where it comes from, how to read it, which columns are x and y."""

    name: str
    filename: str  #: the file UCI ships (the zip member), looked for under <data_dir>/uci/
    url: str  #: UCI's zip archive holding ``filename``
    sha256: str  #: of the reference copy of the file, as UCI ships it
    table_sha256: str  #: of the cleaned table, see :func:`table_checksum`
    shape: tuple[int, int, int]  #: (rows, D_x, D_y) after cleaning
    x_columns: tuple[str, ...]
    y_columns: tuple[str, ...]
    names: tuple[str, ...] | None = None  #: column names of a file without a header row
    sep: str = ","  #: delimiter of the text formats
    decimal: str = "."
    dropna: bool = False  #: suite's cleaning: drop rows with any missing value (else missing values are errors)
    y_missing_code: float | None = None  #: a y value meaning "missing" (Air: -200); such rows are dropped
    max_rows: int | None = None  #: keep the first rows only (Energy: 768)
    doi: str = ""


def _spec(**kw) -> UCISpec:
    return UCISpec(**kw)


_FISH = ("CIC0", "SM1_Dz(Z)", "GATS1i", "NdsCH", "NdssC", "MLOGP", "LC50")
_CONCRETE_X = tuple(
    f"{name} (component {i})(kg in a m^3 mixture)"
    for i, name in enumerate(
        ["Cement", "Blast Furnace Slag", "Fly Ash", "Water", "Superplasticizer", "Coarse Aggregate", "Fine Aggregate"],
        start=1,
    )
) + ("Age (day)",)
_SKILL_X = (
    "LeagueIndex Age HoursPerWeek TotalHours APM SelectByHotkeys AssignToHotkeys UniqueHotkeys MinimapAttacks "
    "MinimapRightClicks TotalMapExplored WorkersMade UniqueUnitsMade ComplexUnitsMade ComplexAbilitiesUsed"
).split()
_PARK_X = (
    "Jitter(%) Jitter(Abs) Jitter:RAP Jitter:PPQ5 Jitter:DDP Shimmer Shimmer(dB) Shimmer:APQ3 Shimmer:APQ5 "
    "Shimmer:APQ11 Shimmer:DDA NHR HNR RPDE DFA PPE"
).split()
_TEMP_X = (
    "Present_Tmax Present_Tmin LDAPS_RHmin LDAPS_RHmax LDAPS_Tmax_lapse LDAPS_Tmin_lapse LDAPS_WS LDAPS_LH "
    "LDAPS_CC1 LDAPS_CC2 LDAPS_CC3 LDAPS_CC4 LDAPS_PPT1 LDAPS_PPT2 LDAPS_PPT3 LDAPS_PPT4 lat lon DEM Slope"
).split() + ["Solar radiation"]
_AIR_X = ("CO(GT)", "PT08.S1(CO)", "NMHC(GT)", "C6H6(GT)", "PT08.S2(NMHC)", "NOx(GT)", "PT08.S3(NOx)", "NO2(GT)")

UCI_DATASETS: dict[str, UCISpec] = {
    s.name: s
    for s in [
        _spec(
            name="fish",
            filename="qsar_fish_toxicity.csv",
            url=f"{UCI}/504/qsar+fish+toxicity.zip",
            sha256="ea70c73b8d4e5b77740861470dc036dd8cf0d6766354d1b247ce015c2dc71168",
            table_sha256="272f8ededb98131c7ab865997c2666e64cdc9f7529550447a02563c200efd45e",
            shape=(908, 6, 1),
            names=_FISH,
            x_columns=_FISH[:6],
            y_columns=_FISH[6:],
            sep=";",
            doi="10.24432/C5JG7B",
        ),
        _spec(
            name="concrete",
            filename="Concrete_Data.xls",
            url=f"{UCI}/165/concrete+compressive+strength.zip",
            sha256="1ecf19eb1c78cf20599f6ef90dd41af6ff99b496095bd9903483c1fec418f522",
            table_sha256="fbde196a31eab5bb29f4d0bab004ba14797c9f9c2bcd8b94d7a94b2493aeb677",
            shape=(1030, 8, 1),
            x_columns=_CONCRETE_X,
            y_columns=("Concrete compressive strength(MPa, megapascals)",),
            doi="10.24432/C5PK67",
        ),
        _spec(
            name="energy",
            filename="ENB2012_data.xlsx",
            url=f"{UCI}/242/energy+efficiency.zip",
            sha256="0089fcffc1415e41e2ff63730cca5280efe54fc43d722dfde1b0aaa808e35dc4",
            table_sha256="31567d77e1760a7ad2502783065b0ca86662b8967ca32651ab609e4ae96537d6",
            shape=(768, 8, 2),
            x_columns=tuple(f"X{i}" for i in range(1, 9)),
            y_columns=("Y1", "Y2"),
            max_rows=768,
            doi="10.24432/C51307",
        ),
        _spec(
            name="skillcraft",
            filename="SkillCraft1_Dataset.csv",
            url=f"{UCI}/272/skillcraft1+master+table+dataset.zip",
            sha256="8da329e6deadd65c27e0d1abfb3fbbf596a097c72e65a8175c92488a03e1373b",
            table_sha256="423a275f68bcc77e9a364599254923055e830889cb13212c9c3d2417e2483057",
            shape=(3338, 15, 4),
            x_columns=tuple(_SKILL_X),
            y_columns=("NumberOfPACs", "GapBetweenPACs", "ActionLatency", "ActionsInPAC"),
            dropna=True,
            doi="10.24432/C5161N",
        ),
        _spec(
            name="parkinsons",
            filename="parkinsons_updrs.data",
            url=f"{UCI}/189/parkinsons+telemonitoring.zip",
            sha256="f2c7d5025dec4e92e7feae367a5f7ccf58789a10ac6b54bdf15976c599f9dd39",
            table_sha256="079c7d0e387066b96eda792b38c355eff11cd83ba4659d42e60dea33c6b472c4",
            shape=(5875, 16, 2),
            x_columns=tuple(_PARK_X),
            y_columns=("motor_UPDRS", "total_UPDRS"),
            doi="10.24432/C5ZS3N",
        ),
        _spec(
            name="temperature",
            filename="Bias_correction_ucl.csv",
            url=f"{UCI}/514/bias+correction+of+numerical+prediction+model+temperature+forecast.zip",
            sha256="f1e630ba9a637e9dae3e2c75c9ec46c50c7f3a54377fc177dce6557f08676552",
            table_sha256="7e7e08170d5670e720276fff9452afc4519750e8ef62653af3b62d2d98d5a456",
            shape=(7588, 21, 2),
            x_columns=tuple(_TEMP_X),
            y_columns=("Next_Tmax", "Next_Tmin"),
            dropna=True,
            doi="10.24432/C59K76",
        ),
        _spec(
            name="air",
            filename="AirQualityUCI.xlsx",
            url=f"{UCI}/360/air+quality.zip",
            sha256="c92d102bb35cd4c0b42c0b6a1336c4065ccdca7069f80a6890ee1b7e3124bd5d",
            table_sha256="19f391eafcfb201e7c96e9a058ed4db17b60d73dbf15b6c327417045e9e40a98",
            shape=(8991, 8, 3),
            x_columns=_AIR_X,
            y_columns=("PT08.S4(NO2)", "PT08.S5(O3)", "T"),
            sep=";",
            decimal=",",
            y_missing_code=-200.0,
            doi="10.24432/C59K5F",
        ),
    ]
}

SYNTHETIC_DATASETS = ("sine", "bimodal")
DATASETS = (*UCI_DATASETS, *SYNTHETIC_DATASETS)

#: The "NF" row of the benchmark tables (test NLL, nats; docs/paper.md section 8). Units of y unconfirmed.
BENCHMARK_NF_NLL = {"fish": 1.24, "concrete": 1.24, "energy": 1.89, "skillcraft": 4.49}


@dataclass
class Table:
    """A conditional density data set: ``x`` ``(N, D_x)`` and ``y`` ``(N, D_y)``, float64."""

    name: str
    x: np.ndarray
    y: np.ndarray
    x_names: list[str]
    y_names: list[str]
    source: str
    file_sha256: str | None = None
    table_sha256: str | None = None
    #: synthetic sets only: the true E[-log p(y|x)] in nats (the conditional entropy)
    true_nll: float | None = None
    #: synthetic sets only: the true ``log p(y|x)``, ``(N, D_x), (N, D_y) -> (N,)``
    true_log_prob: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None


def table_checksum(x: np.ndarray, y: np.ndarray) -> str:
    """sha256 of the cleaned table: shapes, then ``x`` and ``y`` as C-ordered float32.

    float32 makes it independent of the last-bit differences between text-to-float parsers.
    """
    digest = hashlib.sha256(f"{x.shape}{y.shape}".encode())
    for a in (x, y):
        digest.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
    return digest.hexdigest()


def _fail(spec: UCISpec, path: Path, msg: str) -> NfviError:
    return NfviError(f"dataset={spec.name}: {path}: {msg}")


def _read_frame(spec: UCISpec, path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    header = None if spec.names else 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if suffix in (".xls", ".xlsx"):
                engine = "xlrd" if suffix == ".xls" else "openpyxl"
                return pd.read_excel(path, header=header, engine=engine)
            return pd.read_csv(
                path, sep=spec.sep, decimal=spec.decimal, header=header, na_values=["?"], skipinitialspace=True
            )
    except Exception as exc:  # the readers raise many types; report them in one line
        kind = "an Excel" if suffix in (".xls", ".xlsx") else f"a '{spec.sep}'-separated text"
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise _fail(spec, path, f"cannot read it as {kind} file ({reason[:200]})") from None


#: the largest magnitude a cell may have: its square (in the standard deviation) must not overflow float64
MAX_ABS_VALUE = 1e150


def _bad_cell(value: float) -> str:
    """Why a parsed cell cannot be standardised in float64, or ``""`` (NaN is a missing value, handled apart)."""
    if math.isinf(value):
        return "a non-finite value (inf; 1e309 and beyond overflow float64)"
    if abs(value) > MAX_ABS_VALUE:
        return f"a value beyond ±{MAX_ABS_VALUE:g} (its square overflows float64)"
    return ""


def _numeric(spec: UCISpec, path: Path, frame: pd.DataFrame, columns, header_rows: int = 0) -> pd.DataFrame:
    """``columns`` of ``frame`` as float64; a non-numeric, infinite or overflowing cell is a one-line error
    naming the file, its row (1-based, as in the file: ``header_rows`` header lines come first) and the column."""
    out = {}
    for c in columns:
        col = frame[c]
        num = pd.to_numeric(col, errors="coerce")
        bad = num.isna() & col.notna()
        if bad.any():
            i = int(np.argmax(bad.to_numpy()))
            raise _fail(spec, path, f"non-numeric value {col.iloc[i]!r} in column {c!r} (data row {i + 1})")
        num = num.astype(float)
        huge = ~np.isfinite(num.to_numpy()) & num.notna().to_numpy()
        huge |= np.abs(num.fillna(0.0).to_numpy()) > MAX_ABS_VALUE
        if huge.any():
            i = int(np.argmax(huge))
            row = int(frame.index[i]) + 1 + header_rows
            raise _fail(spec, path, f"{_bad_cell(num.iloc[i])} {col.iloc[i]} in column {c!r} at row {row} of the file")
        out[c] = num
    return pd.DataFrame(out, index=frame.index)


def read_uci_file(spec: UCISpec, path: str | Path) -> Table:
    """Read ``path`` (UCI's format, chosen by the file suffix) and apply the suite's cleaning."""
    path = Path(path)
    if not path.is_file():
        raise _fail(spec, path, "no such file")
    frame = _read_frame(spec, path).dropna(how="all")
    if spec.names:
        if frame.shape[1] != len(spec.names):
            hint = f" (wrong delimiter? the UCI file is '{spec.sep}'-separated)" if frame.shape[1] == 1 else ""
            raise _fail(spec, path, f"{frame.shape[1]} column(s) where {len(spec.names)} are expected{hint}")
        first = pd.to_numeric(frame.iloc[0], errors="coerce") if len(frame) else None
        if first is not None and first.isna().all():  # a header line added by someone: skip it
            frame = frame.iloc[1:]
        frame.columns = list(spec.names)
    else:
        frame.columns = [" ".join(str(c).split()) for c in frame.columns]
    if spec.max_rows is not None:
        frame = frame.iloc[: spec.max_rows]
    wanted = [*spec.x_columns, *spec.y_columns]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        hint = f" (wrong delimiter? the UCI file is '{spec.sep}'-separated)" if frame.shape[1] <= 2 else ""
        raise _fail(
            spec,
            path,
            f"column(s) {missing} missing; the file has {frame.shape[1]} column(s) {list(frame.columns)[:8]}{hint}",
        )
    if spec.dropna:  # the suite drops incomplete rows (over all columns, e.g. Temperature's min/max rows)
        frame = frame[frame.notna().all(axis=1)]
    data = _numeric(spec, path, frame, wanted, header_rows=0 if spec.names else 1)
    if not spec.dropna and data.isna().any().any():
        col = data.columns[data.isna().any()].tolist()
        raise _fail(spec, path, f"missing (NaN/empty) values in column(s) {col}; the UCI release has none there")
    y = data[list(spec.y_columns)].to_numpy()
    x = data[list(spec.x_columns)].to_numpy()
    if spec.y_missing_code is not None:
        keep = ~(y == spec.y_missing_code).any(axis=1)
        x, y = x[keep], y[keep]
    if len(y) < 10:
        raise _fail(spec, path, f"only {len(y)} usable rows after cleaning")
    return Table(spec.name, x, y, list(spec.x_columns), list(spec.y_columns), str(path), None, table_checksum(x, y))


def fetch_uci(spec: UCISpec, path: str | Path, url: str | None = None) -> Path:
    """Download ``spec``'s file to ``path``: the zip (or the file itself) from ``url``, checked, atomic.

    The member is accepted if its sha256 is the reference copy's, or if the table read from it has
    the reference table checksum; otherwise nothing is written and the error names both.
    """
    path = Path(path)
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _fetch_into(spec, path, url or spec.url)
    except BaseException:
        for folder in created:  # the folders made for the file (innermost first) go when nothing was written
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _fetch_into(spec: UCISpec, path: Path, url: str) -> Path:
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        archive = Path(tmp) / (Path(unquote(urlparse(url).path)).name or "download")
        try:
            download(url, archive)
        except NfviError as exc:
            raise NfviError(f"dataset={spec.name}: {path} is missing and the download failed: {exc}") from None
        if zipfile.is_zipfile(archive):
            try:
                with zipfile.ZipFile(archive) as zf:
                    members = [m for m in zf.namelist() if Path(m).name.lower() == spec.filename.lower()]
                    if not members:
                        raise NfviError(
                            f"dataset={spec.name}: the archive from {url} has no member {spec.filename} "
                            f"(it has {', '.join(zf.namelist()[:6])}); nothing was written to {path}"
                        )
                    data = zf.read(members[0])
            except (zipfile.BadZipFile, zlib.error, NotImplementedError, OSError, EOFError) as exc:
                raise NfviError(
                    f"dataset={spec.name}: the archive from {url} is corrupt ({exc}); nothing was written to {path}"
                ) from None
        else:
            data = archive.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != spec.sha256:
            candidate = Path(tmp) / f"candidate{path.suffix}"
            candidate.write_bytes(data)
            try:
                checksum = read_uci_file(spec, candidate).table_sha256
            except NfviError:
                checksum = None
            if checksum != spec.table_sha256:
                raise NfviError(
                    f"dataset={spec.name}: the file from {url} does not match the UCI release "
                    f"(sha256 {digest}, expected {spec.sha256}; table checksum {checksum}, expected "
                    f"{spec.table_sha256}); nothing was written to {path}"
                )
        atomic_write_bytes(path, data)
    return path


def load_uci(
    name: str,
    data_dir: str | Path,
    data_file: str | Path = "",
    download: bool = True,
    verify: bool = True,
    url: str = "",
) -> Table:
    """Load a UCI set from ``data_file`` (default ``<data_dir>/uci/<UCI file name>``), fetching it if missing.

    ``verify``: the cleaned table must have the reference checksum (set false for a modified copy).
    """
    check_choice("dataset", name, UCI_DATASETS)
    spec = UCI_DATASETS[name]
    path = Path(data_file) if data_file else Path(data_dir) / "uci" / spec.filename
    if not path.exists():
        if not download:
            raise NfviError(
                f"dataset={name}: {path} is missing; put UCI's {spec.filename} there (from {url or spec.url}), "
                f"or set NFVI_DATA / paths.data_dir / data_file, or allow download=true"
            )
        if path.suffix.lower() != Path(spec.filename).suffix.lower():
            raise NfviError(f"dataset={name}: {path} is missing and a download gives a {spec.filename}; fix data_file")
        fetch_uci(spec, path, url or None)
    table = read_uci_file(spec, path)
    if verify and table.table_sha256 != spec.table_sha256:
        raise NfviError(
            f"dataset={name}: the table read from {path} differs from the UCI release (checksum "
            f"{table.table_sha256[:16]}..., expected {spec.table_sha256[:16]}...); "
            "set verify=false to use a modified copy"
        )
    table.file_sha256 = sha256_of(path)
    return table


# ---------------------------------------------------------------- synthetic sets with a known density

_BIMODAL_SIGMA = 0.2


def _bimodal_mean(x: np.ndarray) -> np.ndarray:
    return 1.0 + 0.5 * np.sin(x)


def _normal_log_pdf(y: np.ndarray, mean: np.ndarray, sigma: float) -> np.ndarray:
    return -0.5 * ((y - mean) / sigma) ** 2 - math.log(sigma * math.sqrt(2 * math.pi))


def _sine_log_prob(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return _normal_log_pdf(y, np.sin(x), 0.1).sum(-1)


def _bimodal_log_prob(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    m, s = _bimodal_mean(x), _BIMODAL_SIGMA
    return (np.logaddexp(_normal_log_pdf(y, m, s), _normal_log_pdf(y, -m, s)) - math.log(2.0)).sum(-1)


@functools.lru_cache(maxsize=1)
def _bimodal_entropy() -> float:
    """E_x[H(y|x)] for the bimodal set by quadrature (x ~ U(-3, 3), y on a fine grid)."""
    x = np.linspace(-3.0, 3.0, 601)[:, None]
    y = np.linspace(-3.0, 3.0, 6001)[None, :]
    logp = _bimodal_log_prob(x[..., None], y[..., None])
    h = -np.trapezoid(np.exp(logp) * logp, y[0], axis=1)
    return float(h.mean())


def make_synthetic(name: str, n: int = 2000, seed: int = 12345) -> Table:
    """A 1-D conditional set with a known density; x ~ U(-3, 3), shape ``(n, 1)`` each.

    - ``sine``: y | x ~ N(sin x, 0.1^2); entropy 0.5 log(2 pi e 0.01) = -0.884 nats.
    - ``bimodal``: y | x ~ 0.5 N(m(x), 0.2^2) + 0.5 N(-m(x), 0.2^2), m(x) = 1 + 0.5 sin x.
    """
    check_choice("dataset", name, SYNTHETIC_DATASETS)
    check_range("synthetic_size", n, low=20, kind="a number of rows")
    rng = np.random.default_rng(seed)
    x = rng.uniform(-3.0, 3.0, size=(n, 1))
    if name == "sine":
        y = np.sin(x) + 0.1 * rng.standard_normal((n, 1))
        true_nll, log_prob = 0.5 * math.log(2 * math.pi * math.e * 0.01), _sine_log_prob
    else:
        sign = rng.choice([-1.0, 1.0], size=(n, 1))
        y = sign * _bimodal_mean(x) + _BIMODAL_SIGMA * rng.standard_normal((n, 1))
        true_nll, log_prob = _bimodal_entropy(), _bimodal_log_prob
    return Table(name, x, y, ["x"], ["y"], f"synthetic:{name}(n={n})", None, table_checksum(x, y), true_nll, log_prob)


def load_dataset(
    name: str,
    data_dir: str | Path = ".",
    data_file: str | Path = "",
    download: bool = True,
    verify: bool = True,
    url: str = "",
    synthetic_size: int = 2000,
) -> Table:
    """Any dataset of :data:`DATASETS`: a UCI table (:func:`load_uci`) or a synthetic one."""
    check_choice("dataset", name, DATASETS)
    if name in SYNTHETIC_DATASETS:
        return make_synthetic(name, synthetic_size)
    return load_uci(name, data_dir, data_file, download, verify, url)


# ---------------------------------------------------------------- splits


@dataclass
class Split:
    """One seed's standardised train/val/test parts (float32) and the training-split statistics.

    ``train``/``val`` together are the 70 % training split; its mean and std standardise x and y.
    ``log_std_y`` (sum over the D_y dimensions) converts a standardised NLL to original units:
    ``nll_original = nll_standardized + log_std_y``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    y_mean: np.ndarray
    y_std: np.ndarray
    test_index: np.ndarray  #: rows of the table in the test part

    @property
    def log_std_y(self) -> float:
        return float(np.log(self.y_std).sum())


def split_and_standardize(table: Table, seed: int, test_fraction: float = 0.3, val_fraction: float = 0.2) -> Split:
    """Random ``1 - test_fraction`` / ``test_fraction`` split by ``seed``; the last ``val_fraction`` of
    the training split is the validation part (early stopping). Standardise with training-split stats.

    Refused in one line (:class:`NfviError`) naming the dataset, its source and the column: a non-finite
    cell or one beyond ±:data:`MAX_ABS_VALUE` (also the table row, 1-based), a constant ``y`` column (no
    density to estimate: its NLL would be meaningless) and a column that float64 cannot standardise
    (:func:`_degenerate`). A constant ``x`` column is kept: centred, unscaled, it becomes 0 (no information).
    """
    check_range("test_fraction", test_fraction, low=0.05, high=0.9, kind="a fraction")
    check_range("val_fraction", val_fraction, low=0.05, high=0.9, kind="a fraction")
    n = len(table.y)
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(test_fraction * n))
    test, train = perm[:n_test], perm[n_test:]
    n_val = int(round(val_fraction * len(train)))
    fit, val = train[: len(train) - n_val], train[len(train) - n_val :]

    _check_cells(table)
    xm, xs = _stats(table, "x", train, seed)
    ym, ys = _stats(table, "y", train, seed)
    fx = lambda i: ((table.x[i] - xm) / xs).astype(np.float32)
    fy = lambda i: ((table.y[i] - ym) / ys).astype(np.float32)
    return Split(fx(fit), fy(fit), fx(val), fy(val), fx(test), fy(test), ym, ys, test)


#: a column whose spread is below this fraction of its mean (or whose values are all below
#: :data:`MIN_ABS_SCALE` in magnitude) cannot be standardised in float64 without losing it
MIN_RELATIVE_STD = 1e-12
MIN_ABS_SCALE = 1e-150


def _where(table: Table) -> str:
    return f"dataset={table.name} ({table.source})"


def _check_cells(table: Table) -> None:
    """A non-finite or overflowing cell of ``table`` is a one-line error naming the table row (1-based) and column."""
    for part, names in (("x", table.x_names), ("y", table.y_names)):
        a = getattr(table, part)
        bad = ~np.isfinite(a) | (np.abs(np.nan_to_num(a)) > MAX_ABS_VALUE)
        if bad.any():
            i, j = (int(v) for v in np.argwhere(bad)[0])
            value = float(a[i, j])
            why = "a missing value (NaN)" if math.isnan(value) else _bad_cell(value)
            raise NfviError(f"{_where(table)}: {why} {value!r} in {part} column {names[j]!r} at table row {i + 1}")


def _degenerate(v: np.ndarray, mean: float, std: float) -> str:
    """Why float64 standardisation would lose column ``v`` (not constant), or ``""``."""
    scale = float(np.abs(v).max())
    if scale < MIN_ABS_SCALE:
        return f"all its values are below {MIN_ABS_SCALE:g} in magnitude (max {scale:.3g}): their squares underflow"
    if not std > MIN_RELATIVE_STD * abs(mean):
        return f"its std {std:.3g} is below {MIN_RELATIVE_STD:g} x |mean| = {abs(mean):.3g}: rounding would dominate"
    return ""


def _stats(table: Table, part: str, rows: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training-split mean and std of ``table.<part>`` ``(D,)`` each; std 1 for a constant ``x`` column."""
    a = getattr(table, part)[rows]
    names = table.x_names if part == "x" else table.y_names
    mean, std = a.mean(0), a.std(0)
    for j, name in enumerate(names):
        v = a[:, j]
        where = f"{_where(table)}: {part} column {name!r}"
        if v.min() == v.max():
            if part == "y":
                raise NfviError(
                    f"{where} is constant ({v[0]:g}) on the training split of seed {seed}: a constant target has "
                    "no density to estimate (its NLL would be meaningless)"
                )
            continue
        why = _degenerate(v, float(mean[j]), float(std[j]))
        if why:
            raise NfviError(f"{where} cannot be standardised in float64 ({why}); rescale that column in the file")
    return mean, np.where(std > 0, std, 1.0)
