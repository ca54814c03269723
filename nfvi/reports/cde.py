"""``nfvi report`` for ``task == "cde"``: test NLL per dataset and model beside the benchmark's NF row.

``write(frame, out_dir)`` takes one row per ``nfvi cde`` run (its flattened results.json) and writes

- ``cde.md``: a dataset x model table of test NLL (mean ± std over seeds, nats, original units of
  y, best model per dataset in bold) with the benchmark's NF column, then the long table with the
  standardised-units NLL, seeds and run folders;
- ``cde.csv``: the long table as numbers;
- ``cde.png``: test NLL per dataset and model, with the benchmark's NF row and the true density where known.

When several runs share a (dataset, model) cell, the most recent one (``finished_at``) is used; a run
whose ``test_nll_mean`` is missing or not finite is never used. A run with fewer seeds done (``n_seeds``)
than it names (``seeds``) is marked ``†`` (``unfinished`` column), with a legend under the table.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path

import numpy as np
import pandas as pd

from nfvi.cde.data import BENCHMARK_NF_NLL, DATASETS
from nfvi.reports.common import UNFINISHED_MARK, col, markdown_table, setting_labels, varying_config
from nfvi.runs import atomic_write_bytes, atomic_write_text

__all__ = ["write", "summarize", "pivot"]

_KIND_ORDER = {"gaussian": 0, "mdn": 1, "planar": 2, "radial": 3, "nice": 4}
UNFINISHED_LEGEND = f"{UNFINISHED_MARK} unfinished: fewer seeds were fitted than the run names (n_seeds < len(seeds))."


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_) and math.isfinite(value)


def _unfinished(n_seeds, seeds) -> str:
    """``""``, or ``"3/5 seeds"`` when a run fitted fewer seeds than it names."""
    if isinstance(seeds, list) and _finite(n_seeds) and n_seeds < len(seeds):
        return f"{int(n_seeds)}/{len(seeds)} seeds"
    return ""


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, model_name): the latest run's numbers, sorted by dataset then model.

    Runs that differ in any other config key (``optim.lr``, ...) are separate rows: the model's name then carries
    the keys that tell them apart (``planar (K=4), optim.lr=0.01``)."""
    finite = np.isfinite(pd.to_numeric(frame["test_nll_mean"], errors="coerce"))
    rows = frame[finite].copy()  # a NaN/inf/null run never replaces a good one
    rows["finished_at"] = col(rows, "finished_at", "").fillna("").astype(str)
    settings = setting_labels(rows, varying_config(rows, ["dataset", "model_name"]))
    rows["model_name"] = [f"{m}, {s}" if s else m for m, s in zip(rows["model_name"], settings, strict=True)]
    rows = rows.sort_values("finished_at").groupby(["dataset", "model_name"], as_index=False).tail(1)
    out = pd.DataFrame(
        {
            "dataset": rows["dataset"],
            "y_dim": col(rows, "y_dim"),
            "model": rows["model_name"],
            "n_seeds": col(rows, "n_seeds"),
            "test_nll_mean": rows["test_nll_mean"].astype(float),
            "test_nll_std": col(rows, "test_nll_std").astype(float),
            "test_nll_standardized_mean": col(rows, "test_nll_standardized_mean").astype(float),
            "test_nll_standardized_std": col(rows, "test_nll_standardized_std").astype(float),
            "benchmark_nf_nll": rows["dataset"].map(BENCHMARK_NF_NLL),
            "true_nll": col(rows, "true_nll"),
            "run_dir": col(rows, "run_dir", ""),
            "unfinished": [_unfinished(n, s) for n, s in zip(col(rows, "n_seeds"), col(rows, "seeds"), strict=True)],
        }
    )
    order = {name: i for i, name in enumerate(DATASETS)}
    keys = [(order.get(d, len(order)), *_model_key(m)) for d, m in zip(out["dataset"], out["model"], strict=True)]
    return out.iloc[sorted(range(len(out)), key=keys.__getitem__)].reset_index(drop=True)


def _model_key(label: str) -> tuple[int, int, str]:
    """Sort ``gaussian < mdn (C=.) < planar (K=.) < radial (K=.) < nice`` and by K within a kind."""
    kind = label.split(" ")[0]
    digits = "".join(ch for ch in label.split("=")[-1] if ch.isdigit()) if "=" in label else ""
    return _KIND_ORDER.get(kind, len(_KIND_ORDER)), int(digits or 0), label


def _pm(mean, std, digits: int = 2) -> str:
    if pd.isna(mean):
        return ""
    return f"{mean:.{digits}f}" if pd.isna(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def pivot(summary: pd.DataFrame) -> pd.DataFrame:
    """Dataset rows x model columns of ``mean ± std`` (original units), best per row in bold, + NF (benchmark).

    A ``true density`` column (the synthetic sets' conditional entropy) appears when any row has one.
    """
    models = sorted(set(summary["model"]), key=_model_key)
    truth = "true_nll" in summary and summary["true_nll"].notna().any()
    table = []
    for dataset, rows in summary.groupby("dataset", sort=False):
        y_dim = rows["y_dim"].iloc[0]
        line = {"dataset": f"{dataset} ({int(y_dim)}-D)" if pd.notna(y_dim) else dataset}
        best = rows["test_nll_mean"].min()
        for _, r in rows.iterrows():
            cell = _pm(r["test_nll_mean"], r["test_nll_std"])
            cell += f" {UNFINISHED_MARK}" if r.get("unfinished") else ""
            line[r["model"]] = f"**{cell}**" if r["test_nll_mean"] == best and len(rows) > 1 else cell
        nf = BENCHMARK_NF_NLL.get(dataset)
        line["NF (benchmark)"] = f"{nf:.2f}" if nf is not None else ""
        if truth:
            t = rows["true_nll"].dropna()
            line["true density"] = f"{float(t.iloc[0]):.2f}" if len(t) else ""
        table.append(line)
    extra = ["true density"] if truth else []
    return pd.DataFrame(table, columns=["dataset", *models, "NF (benchmark)", *extra]).fillna("")


def figure(summary: pd.DataFrame) -> bytes:
    """PNG bytes: one panel per dataset, test NLL (mean ± std over seeds, original units of y) of each model,
    the benchmark's NF row (dashed) and, for the synthetic sets, the true density's NLL (dotted)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(summary["dataset"]))
    models = sorted(set(summary["model"]), key=_model_key)
    cols = min(len(datasets), 4)
    rows = -(-len(datasets) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(0.5 + 0.55 * len(models) * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(datasets) :]:
        ax.set_visible(False)
    for ax, dataset in zip(axes.flat, datasets, strict=False):
        r = summary[summary["dataset"] == dataset].set_index("model").reindex(models)
        x = np.arange(len(models))
        ax.errorbar(x, r["test_nll_mean"], yerr=r["test_nll_std"].fillna(0), fmt="o", capsize=3, label="nfvi")
        nf = BENCHMARK_NF_NLL.get(dataset)
        if nf is not None:
            ax.axhline(nf, color="C3", linestyle="--", linewidth=1, label="NF (benchmark)")
        truth = pd.to_numeric(r["true_nll"], errors="coerce").dropna() if "true_nll" in r else pd.Series([])
        if len(truth):
            ax.axhline(float(truth.iloc[0]), color="C2", linestyle=":", linewidth=1, label="true density")
        ax.set_xticks(x, models, rotation=60, ha="right", fontsize=7)
        ax.set_title(dataset, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("test NLL (nats)")
    axes[0, 0].legend(fontsize=7)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def write(frame: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write ``cde.md``, ``cde.csv`` and the figure ``cde.png`` into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(frame)
    long = summary.assign(
        **{
            "test NLL (original y)": [
                _pm(m, s, 3) for m, s in zip(summary.test_nll_mean, summary.test_nll_std, strict=True)
            ],
            "test NLL (standardised y)": [
                _pm(m, s, 3)
                for m, s in zip(summary.test_nll_standardized_mean, summary.test_nll_standardized_std, strict=True)
            ],
        }
    )
    flagged = summary["unfinished"].astype(bool).any()
    columns = ["dataset", "y_dim", "model", "n_seeds", "test NLL (original y)", "test NLL (standardised y)"]
    long = long[[*columns, *(["unfinished"] if flagged else []), "run_dir"]]
    text = "\n".join(
        [
            "# Conditional density estimation: test NLL (nats per test point, lower is better)",
            "",
            "Mean ± sample std over seeds (random 70/30 splits); original units of y. `NF (benchmark)` is the",
            "normalizing-flow row of the DDN suite's tables (Chen et al., AAAI 2022); whether its y was",
            "standardised is unconfirmed, so compare it with both columns of the second table.",
            "",
            markdown_table(pivot(summary)),
            "",
            "## All runs (latest per dataset and model)",
            "",
            markdown_table(long),
            "",
            *([UNFINISHED_LEGEND, ""] if flagged else []),
        ]
    )
    md, csv, png = out_dir / "cde.md", out_dir / "cde.csv", out_dir / "cde.png"
    atomic_write_text(md, text)
    atomic_write_text(csv, summary.to_csv(index=False))
    atomic_write_bytes(png, figure(summary))
    return [md, csv, png]
