"""``nfvi report``: the paper's Table 3 (CIFAR-10) from the ``vae`` runs on CIFAR-10 data.

:func:`write_table3` takes the ``task == "vae"`` rows whose dataset is ``cifar10*`` (or the generated
stand-in ``fake_cifar10``; :func:`is_table3_row` says which) and writes into ``out_dir``:

- ``vae_table3.md``: one section per dataset (= reading of the paper) and settings (updates, S,
  test images, model, likelihood when they differ), rows = flow kind x length K (K = 0 is the
  diagonal-Gaussian DLGM), columns = test ``-ln p(x)`` (nats, mean over seeds, ± sd over seeds or,
  for one run, ± its standard error over test images), bits/dim (discrete likelihoods only),
  ``-ELBO``, ``KL = -ELBO - (-ln p(x))``, and the paper's Table 3 value. Every paper value is **[U]**
  (unconfirmed, docs/paper.md section 4); each section says how comparable it is.
- ``vae_table3.csv``: the same numbers, one row per (dataset, settings, flow, K), with run folders.

Rows holding a run stopped before its configured updates carry ``†`` (``unfinished`` column), KL cells
that are negative or come from S < 100 importance samples ``‡`` (``kl_noisy``); legends below the table.

The readings (docs/cifar10.md): ``cifar10`` is nfvi's standard one (whole images, discretized
logistic: a discrete ``-ln p(x)``, not comparable to the paper's negative continuous-density values);
``cifar10_patches`` is the reproductions' reading (3x8x8 patches, logit-normal density), the one the
paper's values may be compared with, with care.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from nfvi.reports.common import (
    FLOW_LABEL,
    FLOW_ORDER,
    NOISY_KL_LEGEND,
    NOISY_KL_MARK,
    UNFINISHED_LEGEND,
    UNFINISHED_MARK,
    col,
    group_unfinished,
    markdown_table,
    noisy_kl,
    normalize_runs,
    unfinished_notes,
)
from nfvi.runs import atomic_write_text

__all__ = ["PAPER_TABLE3", "READINGS", "is_table3_row", "summarize_table3", "table3_markdown", "write_table3"]

#: Table 3 of the paper as recalled (docs/paper.md section 4): test -ln p(x) in nats by flow length K; all [U]
PAPER_TABLE3: dict[int, float] = {0: -293.7, 2: -308.6, 5: -317.9, 10: -320.7}
#: dataset -> what its numbers mean next to the paper's
READINGS: dict[str, str] = {
    "cifar10": (
        "nfvi's standard reading: whole 3x32x32 images, 8-bit discretized logistic likelihood (a discrete "
        "-ln p(x), also in bits/dim). NOT comparable to the paper's values (a continuous density, negative)."
    ),
    "cifar10_patches": (
        "the reproductions' reading (docs/paper.md section 11, unconfirmed): random 3x8x8 patches, pixels scaled "
        "into [1e-4, 1-1e-4], logit-normal density with unit variance (nats, can be negative). The paper's "
        "values are comparable in kind, if this reading is right."
    ),
    "fake_cifar10": "generated 3x32x32 images (a smoke test of the pipeline): NOT CIFAR-10.",
}
#: settings that split a dataset's runs into separate sections (``source``: the search folder, when a report
#: searches several; nfvi.reports.task.read_results)
SETTINGS = ("model", "latent_dim", "likelihood", "steps", "num_importance_samples", "num_test_images", "source")
METRICS = ("test_nll", "test_neg_elbo", "test_kl", "test_bpd", "test_neg_elbo_bpd")


def is_table3_row(frame: pd.DataFrame) -> pd.Series:
    """Boolean mask of the rows that belong in Table 3 (dataset ``cifar10*`` or ``fake_cifar10``)."""
    if "dataset" not in frame:
        return pd.Series(False, index=frame.index)
    name = frame["dataset"].fillna("").astype(str)
    return name.str.startswith("cifar10") | (name == "fake_cifar10")


def summarize_table3(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, settings, flow, K); see the module docstring for the columns."""
    df = frame[is_table3_row(frame)]
    if df.empty:
        return pd.DataFrame()
    df = normalize_runs(df, (*METRICS, "test_nll_se"))
    for s in SETTINGS:
        df[s] = col(df, s, "").fillna("").astype(str)
    df["run_dir"] = col(df, "run_dir", "").fillna("").astype(str)
    df["unfinished"] = unfinished_notes(df)
    df = df[df["test_nll"].map(math.isfinite)]  # NaN/inf: never shown, never the latest
    rows = []
    keys = ["dataset", *SETTINGS, "flow", "flow_length"]
    for key, g in df.groupby(keys, sort=False):
        values = dict(zip(keys, key, strict=True))
        g = g.sort_values("finished_at").drop_duplicates(subset=["seed"], keep="last")
        flow, k = values["flow"], int(values["flow_length"])
        row = {**values, "K": k, "label": FLOW_LABEL.get(flow, flow), "seeds": int(g["seed"].nunique())}
        for m in METRICS:
            row[m] = float(g[m].mean()) if g[m].notna().any() else math.nan
        row["test_nll_sd"] = float(g["test_nll"].std(ddof=1)) if len(g) > 1 else math.nan
        row["test_nll_se"] = float(g["test_nll_se"].mean()) if g["test_nll_se"].notna().any() else math.nan
        paper = PAPER_TABLE3.get(k) if flow in ("none", "planar") else None
        row["paper_nll"] = paper if paper is not None else math.nan
        row["paper_status"] = "U" if paper is not None else ""
        row["run_dirs"] = ";".join(g["run_dir"])
        row["unfinished"] = group_unfinished(g["unfinished"])
        row["kl_noisy"] = noisy_kl(g["test_kl"].min(), values["num_importance_samples"])
        rows.append(row)
    table = pd.DataFrame(rows).drop(columns=["flow_length"])
    order = table["flow"].map(FLOW_ORDER).fillna(len(FLOW_ORDER))
    table = table.assign(_f=order).sort_values(["dataset", *SETTINGS, "_f", "K"], kind="stable")
    return table.drop(columns="_f").reset_index(drop=True)


def _num(value: float, fmt: str = ".2f") -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _nll(row) -> str:
    spread = row["test_nll_sd"] if row["seeds"] > 1 else row["test_nll_se"]
    text = _num(row["test_nll"])
    return f"{text} ± {_num(spread)}" if text and not math.isnan(spread) else text


def table3_markdown(table: pd.DataFrame) -> str:
    """Markdown of :func:`summarize_table3`'s table: a heading, then one section per dataset and settings."""
    lines = [
        "# Table 3: CIFAR-10, test -ln p(x)",
        "",
        "Paper values are **[U]**: recalled, not confirmed from the paper (docs/paper.md section 4). "
        "K = 0 is the diagonal-Gaussian DLGM. -ln p(x) by importance sampling with q_K as the proposal "
        "(S samples per image; ± sd over seeds, or ± standard error over test images for one run); "
        "KL = -ELBO - (-ln p(x)).",
    ]
    if table.empty:
        return "\n".join([*lines, "", "(no CIFAR-10 runs)", ""])
    for key, g in table.groupby(["dataset", *SETTINGS], sort=False):
        values = dict(zip(["dataset", *SETTINGS], key, strict=True))
        dataset = values["dataset"]
        setting = ", ".join(f"{s}={values[s]}" for s in SETTINGS if values[s] != "")
        lines += ["", f"## dataset={dataset} ({setting})", "", READINGS.get(dataset, "not a known reading."), ""]
        bpd = g["test_bpd"].notna().any()
        head = ["Model", "K", "-ln p(x) (nats)"] + (["bits/dim"] if bpd else [])
        head += ["-ELBO (nats)", "KL (nats)", "paper -ln p(x) [U]", "seeds"]
        rows = []
        for _, row in g.iterrows():
            note = row.get("unfinished") or ""
            label = f"{row['label']} {UNFINISHED_MARK} (unfinished: {note})" if note else row["label"]
            cells = [label, str(row["K"]), _nll(row)] + ([_num(row["test_bpd"], ".3f")] if bpd else [])
            paper = _num(row["paper_nll"], ".1f")
            kl = _num(row["test_kl"])
            kl = f"{kl} {NOISY_KL_MARK}" if kl and row.get("kl_noisy", False) == True else kl  # noqa: E712
            rows.append([*cells, _num(row["test_neg_elbo"]), kl, paper, str(row["seeds"])])
        lines.append(markdown_table(pd.DataFrame(rows, columns=head), ["left"] + ["right"] * (len(head) - 1)))
    legends = [UNFINISHED_LEGEND] if col(table, "unfinished", "").fillna("").astype(bool).any() else []
    legends += [NOISY_KL_LEGEND] if col(table, "kl_noisy", False).fillna(False).astype(bool).any() else []
    return "\n".join([*lines, *(["", *legends] if legends else [])]) + "\n"


def write_table3(frame: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write ``vae_table3.md`` and ``vae_table3.csv`` for the Table 3 rows of ``frame``; [] when there are none."""
    table = summarize_table3(frame)
    if table.empty:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, csv = out_dir / "vae_table3.md", out_dir / "vae_table3.csv"
    atomic_write_text(md, table3_markdown(table))
    atomic_write_text(csv, table.to_csv(index=False))
    return [md, csv]
