"""``nfvi report`` for ``task == "vae"`` runs: the paper's Table 2 and Figure 4.

Inputs: one row per ``results.json`` written by ``nfvi train`` / ``nfvi evaluate`` (flattened).
Outputs in ``out_dir``:

- ``vae_table2.md``, ``vae_table2.csv``, ``vae_table2.tex``: rows = flow kind x length K (K = 0 is
  the diagonal-Gaussian DLGM, whatever flow kind was named); columns = our test -ELBO, -ln p(x) and
  KL = -ELBO - (-ln p(x)) in nats, the paper's -ln p(x) (Table 2) with ``ours - paper`` beside it,
  and the number of seeds. Paper values carry ``[C]`` (confirmed by secondary sources) or ``[U]``
  (unconfirmed, from memory; docs/paper.md section 3.2). The paper's column is filled for MNIST only.
- ``vae_fig4.png``: Figure 4, three panels against K: (a) the bound -ELBO, (b) KL(q || p(z|x)),
  (c) -ln p(x); one line per flow kind (planar NF, NICE, radial when present), all starting from
  the shared K = 0 point; the paper's Table 2 values are drawn as open markers in (c) for MNIST.
  One row of panels per dataset and setting with runs at two or more K (:func:`figure4_groups`: a setting
  run at one K only is a row of Table 2, not a curve).
- ``vae_curves.png``: the validation -ELBO of each run against parameter updates (from its
  ``metrics.csv``; :func:`nfvi.reports.common.validation_curves`), when the runs logged one.

Runs are grouped by dataset and by the settings that differ between runs of that dataset
(e.g. ``steps`` or ``num_importance_samples``); within a group, several seeds are averaged (mean ±
standard deviation over seeds); a single run shows ± its standard error over test images. Repeated
runs of one seed count once (the latest, by ``finished_at``); a run with a non-finite -ln p(x) or -ELBO
never counts. Markers (legends under the tables when used): ``†`` a row holding a run stopped before its
configured ``trainer.steps`` (with its updates done/configured); ``‡`` a KL that is negative or comes from
S < 100 importance samples, where the IS estimate is too noisy for -ELBO - (-ln p(x)) to be a KL.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pandas as pd

from nfvi.reports.cifar import is_table3_row, write_table3
from nfvi.reports.common import (
    FLOW_LABEL,
    FLOW_ORDER,
    NOISY_KL_LEGEND,
    NOISY_KL_MARK,
    UNFINISHED_LEGEND,
    UNFINISHED_MARK,
    col,
    group_unfinished,
    latex_tabular,
    markdown_table,
    noisy_kl,
    normalize_runs,
    setting_labels,
    setting_sort_key,
    unfinished_notes,
    validation_curves,
    varying_config,
)
from nfvi.reports.table1 import is_table1_row, write_table1
from nfvi.runs import atomic_write_bytes, atomic_write_text

__all__ = ["PAPER_TABLE2", "summarize", "to_markdown", "to_latex", "write"]

#: Table 2 of the paper, test -ln p(x) in nats: (flow, K) -> (value, status); see docs/paper.md section 3.2 / 11
PAPER_TABLE2: dict[tuple[str, int], tuple[float, str]] = {
    ("none", 0): (89.9, "U"),
    ("planar", 10): (87.5, "U"),
    ("planar", 20): (86.5, "U"),
    ("planar", 40): (85.7, "U"),
    ("planar", 80): (85.1, "C"),
    ("nice", 10): (88.6, "U"),
    ("nice", 20): (87.9, "U"),
    ("nice", 40): (87.3, "U"),
    ("nice", 80): (87.2, "C"),
}
PAPER_DATASETS = ("mnist", "mnist_static")
CURVE_LABEL = {"planar": "NF (planar)", "radial": "radial", "nice": "NICE"}
CURVE_STYLE = {"planar": ("C0", "o"), "nice": ("C3", "s"), "radial": ("C2", "^")}
#: settings that, when they differ between runs of a dataset, split the table into separate rows
SETTINGS = (
    "model",
    "latent_dim",
    "binarize",
    "steps",
    "annealing",
    "optim",
    "lr",
    "flow_lr_factor",
    "batch_size",
    "num_importance_samples",
    "num_test_images",
)
METRICS = ("test_neg_elbo", "test_nll", "test_kl")


def _prepare(frame: pd.DataFrame) -> pd.DataFrame:
    df = normalize_runs(frame, (*METRICS, "test_nll_se", "test_neg_elbo_se", "test_kl_se"))
    df["dataset"] = col(df, "dataset", "?").fillna("?").astype(str)
    df["unfinished"] = unfinished_notes(df)
    finite = df["test_nll"].map(math.isfinite) & df["test_neg_elbo"].map(math.isfinite)  # NaN/inf: never shown
    return df[finite]


def row_label(flow: str, k: int) -> str:
    """Table 2's name of a row: ``DLGM + NF (planar) (K=10)``, ``DLGM, diagonal covariance (K=0)``."""
    return f"{FLOW_LABEL.get(flow, flow)} (K={k})" if k else f"{FLOW_LABEL['none']} (K=0)"


def _settings_varying(df: pd.DataFrame) -> list[str]:
    """The result fields of :data:`SETTINGS` that vary, then any other config key that tells runs apart
    (:func:`~nfvi.reports.common.varying_config`), so runs that differ in any config key are separate rows."""
    named = [s for s in SETTINGS if s in df and df[s].astype(str).nunique(dropna=False) > 1]
    keys = [*named, "flow", "flow_length"]
    return [*named, *varying_config(df, [*keys, *(k for k in ("steps", "dataset") if k in df and k not in keys)])]


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, varying settings, flow, K): means over seeds, spreads, the paper's value.

    Columns: dataset, the settings that vary within the dataset (``setting``: a readable summary),
    flow, K, label, seeds, runs, ``neg_elbo``/``nll``/``kl`` (means, nats), ``*_sd`` (std over seeds,
    NaN for one seed), ``*_se`` (mean of the runs' standard errors over test images), paper_nll,
    paper_status, diff_nll (ours - paper), steps, num_importance_samples, num_test_images, run_dirs,
    ``unfinished`` (``""``, or the updates done/configured of the runs stopped early) and ``kl_noisy``
    (a seed's KL is negative or S < :data:`~nfvi.reports.common.MIN_RELIABLE_SAMPLES`).
    """
    df = _prepare(frame)
    out = []
    for dataset, ddf in df.groupby("dataset", sort=True):
        varying = _settings_varying(ddf)
        ddf = ddf.assign(**{c: setting_labels(ddf, [c]) for c in varying if c.startswith("config/")})
        keys = [*varying, "flow", "flow_length"]
        for key, g in ddf.groupby(keys, sort=False, dropna=False):
            key = key if isinstance(key, tuple) else (key,)
            values = dict(zip(keys, key, strict=True))
            g = g.sort_values("finished_at").drop_duplicates(subset=["seed"], keep="last")
            flow, k = values["flow"], int(values["flow_length"])
            row = {
                "dataset": dataset,
                "setting": ", ".join(values[s] if s.startswith("config/") else f"{s}={values[s]}" for s in varying),
                "flow": flow,
                "K": k,
                "label": row_label(flow, k),
                "seeds": int(g["seed"].nunique()),
                "runs": int(len(g)),
            }
            for metric, name in zip(METRICS, ("neg_elbo", "nll", "kl"), strict=True):
                row[name] = float(g[metric].mean())
                row[f"{name}_sd"] = float(g[metric].std(ddof=1)) if len(g) > 1 else math.nan
                se = pd.to_numeric(col(g, f"{metric}_se"), errors="coerce")
                row[f"{name}_se"] = float(se.mean()) if se.notna().any() else math.nan
            paper = PAPER_TABLE2.get((flow, k)) if dataset in PAPER_DATASETS else None
            row["paper_nll"] = paper[0] if paper else math.nan
            row["paper_status"] = paper[1] if paper else ""
            row["diff_nll"] = row["nll"] - row["paper_nll"] if paper else math.nan
            for s in ("steps", "num_importance_samples", "num_test_images", "model", "annealing", "optim"):
                vals = col(g, s).dropna().unique()
                row[s] = vals[0] if len(vals) == 1 else ",".join(map(str, vals))
            row["run_dirs"] = ";".join(map(str, col(g, "run_dir", "").fillna("")))
            row["unfinished"] = group_unfinished(g["unfinished"])
            row["kl_noisy"] = noisy_kl(g["test_kl"].min(), row["num_importance_samples"])
            out.append(row)
    table = pd.DataFrame(out)
    if table.empty:
        return table
    table["_order"] = table["flow"].map(FLOW_ORDER).fillna(9)
    table = table.sort_values(["dataset", "setting", "_order", "K"], key=setting_sort_key)
    table = table.drop(columns="_order").reset_index(drop=True)
    return table


def _pm(mean: float, sd: float, se: float) -> str:
    if math.isnan(mean):
        return ""
    spread = sd if not math.isnan(sd) else se
    return f"{mean:.2f} ± {spread:.2f}" if not math.isnan(spread) else f"{mean:.2f}"


def _paper(row) -> str:
    return "" if math.isnan(row["paper_nll"]) else f"{row['paper_nll']:.1f} [{row['paper_status']}]"


def _diff(row) -> str:
    return "" if math.isnan(row["diff_nll"]) else f"{row['diff_nll']:+.2f}"


def _cells(r) -> list[str]:
    """One Table 2 row: model, -ELBO, -ln p(x), KL (ours), the paper's -ln p(x), ours - paper, seeds."""
    note = r.get("unfinished") or ""
    label = f"{r['label']} {UNFINISHED_MARK} (unfinished: {note})" if note else r["label"]
    kl = _pm(r["kl"], r["kl_sd"], r["kl_se"])
    return [
        label,
        _pm(r["neg_elbo"], r["neg_elbo_sd"], r["neg_elbo_se"]),
        _pm(r["nll"], r["nll_sd"], r["nll_se"]),
        f"{kl} {NOISY_KL_MARK}" if kl and r.get("kl_noisy", False) == True else kl,  # noqa: E712 (numpy bools)
        _paper(r),
        _diff(r),
        str(r["seeds"]),
    ]


def _caption(g: pd.DataFrame) -> str:
    first = g.iloc[0]
    parts = [f"dataset {first['dataset']}"]
    for key, fmt in (
        ("steps", "{} updates"),
        ("num_importance_samples", "-ln p(x) by IS with S={}"),
        ("num_test_images", "on {} test images"),
        ("annealing", "annealing {}"),
        ("optim", "optim {}"),
    ):
        vals = g[key].astype(str).unique()
        if len(vals) == 1 and vals[0] not in ("", "nan", "None"):
            parts.append(fmt.format(vals[0]))
    shown = ("steps", "num_importance_samples", "num_test_images", "annealing", "optim")
    parts += [item for item in str(first["setting"]).split(", ") if item and item.split("=")[0] not in shown]
    return "; ".join(parts)


HEADER = ["model", "-ELBO (ours)", "-ln p(x) (ours)", "KL (ours)", "-ln p(x) (paper)", "ours - paper", "seeds"]


def _rows(g: pd.DataFrame) -> pd.DataFrame:
    """The Table 2 rows of one (dataset, setting) group as text cells (:func:`_cells`) under :data:`HEADER`."""
    return pd.DataFrame([_cells(r) for _, r in g.iterrows()], columns=HEADER)


def to_markdown(table: pd.DataFrame) -> str:
    """Table 2 as markdown, one section per (dataset, setting)."""
    lines = ["# Table 2: test -ln p(x) on binarized images (nats, lower is better)", ""]
    for (_, _), g in table.groupby(["dataset", "setting"], sort=False):
        lines += [f"## {_caption(g)}", "", markdown_table(_rows(g), ["left"] + ["right"] * (len(HEADER) - 1)), ""]
    lines += [
        "Ours: means over test images (and over seeds when there are several); ± is the standard deviation over "
        "seeds, or for one seed the standard error over test images. KL = -ELBO - (-ln p(x)) estimates "
        "KL(q_K(z|x) || p(z|x)). -ln p(x) is an importance-sampling estimate (an upper bound in expectation).",
        "Paper: Rezende & Mohamed (2015), Table 2 (S=200 importance samples). [C] confirmed by secondary sources; "
        "[U] unconfirmed (from memory, docs/paper.md section 3.2): treat as approximate targets.",
        *_legends(table),
        "",
    ]
    return "\n".join(lines)


def _legends(table: pd.DataFrame) -> list[str]:
    """The legend lines of the markers the table uses (none when every row is plain)."""
    out = [UNFINISHED_LEGEND] if col(table, "unfinished", "").fillna("").astype(bool).any() else []
    return out + ([NOISY_KL_LEGEND] if col(table, "kl_noisy", False).fillna(False).astype(bool).any() else [])


def _tex(text: str) -> str:
    return (
        str(text)
        .replace("\\", r"\textbackslash{}")
        .replace("&", r"\&")
        .replace("%", r"\%")
        .replace("_", r"\_")
        .replace("#", r"\#")
        .replace("±", r"$\pm$")
        .replace("<", r"$<$")
        .replace(UNFINISHED_MARK, r"$^\dagger$")
        .replace(NOISY_KL_MARK, r"$^\ddagger$")
    )


def to_latex(table: pd.DataFrame) -> str:
    """Table 2 as a LaTeX ``tabular`` (booktabs), one block per (dataset, setting)."""
    header = [r"Model", r"$-$ELBO", r"$-\ln p(x)$", "KL", r"paper $-\ln p(x)$", r"ours $-$ paper", "seeds"]
    sections = [
        (_tex(_caption(g)), _rows(g).map(_tex)) for (_, _), g in table.groupby(["dataset", "setting"], sort=False)
    ]
    comment = "% nfvi report: Table 2 (test -ln p(x), nats). [U] = unconfirmed paper value, [C] = confirmed."
    body = latex_tabular(sections, header, "lrrrrrr", [_tex(text) for text in _legends(table)])
    return f"{comment}\n{body}"


def _paper_on_scale(g: pd.DataFrame, margin: float = 10.0) -> bool:
    """Whether our -ln p(x) values come within ``margin`` nats of the paper's (else the overlay squashes them)."""
    return bool(g["nll"].min() <= max(v for v, _ in PAPER_TABLE2.values()) + margin)


def figure4_groups(table: pd.DataFrame) -> list[tuple[tuple[str, str], pd.DataFrame]]:
    """The (dataset, setting) groups of :func:`summarize`'s table that Figure 4 draws, in the table's order.

    Figure 4 shows the effect of the flow length, so within a dataset only the settings with rows at two or
    more K are drawn; a setting run at one K only (a pilot, a longer run of one row) stays in Table 2 but adds
    no row of panels. A dataset none of whose settings has two K has all of them drawn.
    """
    groups = list(table.groupby(["dataset", "setting"], sort=False))
    curves = {key for key, g in groups if g["K"].nunique() > 1}
    with_curves = {dataset for dataset, _ in curves}
    return [(key, g) for key, g in groups if key in curves or key[0] not in with_curves]


def figure4(table: pd.DataFrame) -> bytes:
    """Figure 4 as PNG bytes: per (dataset, setting) of :func:`figure4_groups` a row of three panels against K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = figure4_groups(table)
    fig, axes = plt.subplots(len(groups), 3, figsize=(13, 4.4 * len(groups)), squeeze=False)
    panels = (
        ("neg_elbo", "(a) bound F(x) = -ELBO"),
        ("kl", "(b) KL(q || p(z|x)) = -ELBO - (-ln p(x))"),
        ("nll", "(c) -ln p(x) (importance sampling)"),
    )
    for row_axes, ((dataset, _), g) in zip(axes, groups, strict=True):
        base = g[g["flow"] == "none"]
        kinds = [k for k in ("planar", "nice", "radial") if k in set(g["flow"])] or ["none"]
        for ax, (metric, title) in zip(row_axes, panels, strict=True):
            for kind in kinds:
                cur = pd.concat([base, g[g["flow"] == kind]]) if kind != "none" else base
                cur = cur.sort_values("K")
                if cur.empty:
                    continue
                color, marker = CURVE_STYLE.get(kind, ("C7", "o"))
                sd = cur[f"{metric}_sd"].where(cur["seeds"] > 1)
                ax.errorbar(
                    cur["K"],
                    cur[metric],
                    yerr=sd.fillna(0).to_numpy(),
                    color=color,
                    marker=marker,
                    capsize=3,
                    label=CURVE_LABEL.get(kind, "diagonal"),
                )
            ks = set(g["K"])
            paper_shown = metric == "nll" and _paper_on_scale(g) and dataset in PAPER_DATASETS
            if paper_shown:
                for kind in ("planar", "nice"):
                    pts = sorted((k, v[0]) for (f, k), v in PAPER_TABLE2.items() if f in (kind, "none"))
                    ks |= {p[0] for p in pts}
                    color, marker = CURVE_STYLE[kind]
                    ax.plot(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        linestyle=":",
                        marker=marker,
                        color=color,
                        markerfacecolor="none",
                        alpha=0.7,
                        label=f"paper {CURVE_LABEL[kind]} (Table 2)",
                    )
            elif metric == "nll" and dataset in PAPER_DATASETS:
                title += "\n(the paper's Table 2, 85-90 nats, is off this scale)"
            ax.set_xlabel("flow length K")
            ax.set_ylabel("nats")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            ax.set_xticks(sorted(ks))
        flagged = [f"K={k} ({u})" for k, u in zip(g["K"], col(g, "unfinished", "").fillna(""), strict=True) if u]
        note = row_axes[0].annotate(
            _caption(g) + (f"; {UNFINISHED_MARK} unfinished: {', '.join(flagged)}" if flagged else ""),
            xy=(0.0, 1.16),
            xycoords="axes fraction",
            ha="left",
            va="bottom",
            fontsize=8,
            color="0.25",
        )
        note.set_in_layout(False)
        row_axes[2].legend(fontsize=7)
    fig.suptitle("Figure 4: effect of the flow length (test set)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()), h_pad=4.5)  # room for the title and caption
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def write(frame: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write Table 2 (md, csv, tex) and Figure 4 (png) for the VAE runs in ``frame``; return the paths.

    CIFAR-10 runs (:func:`nfvi.reports.cifar.is_table3_row`) go to Table 3 instead
    (:func:`nfvi.reports.cifar.write_table3`: ``vae_table3.md`` / ``.csv``), and runs of the Sylvester protocol
    (``model=gated_conv``, :func:`nfvi.reports.table1.is_table1_row`) to its Table 1
    (:func:`nfvi.reports.table1.write_table1`: ``sylvester_table1.md`` / ``.csv`` / ``.tex`` / ``.png``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if not frame.empty:
        for is_row, writer in ((is_table3_row, write_table3), (is_table1_row, write_table1)):
            mask = is_row(frame)
            if mask.any():
                written += writer(frame[mask].reset_index(drop=True), out_dir)
            frame = frame[~mask].reset_index(drop=True)
    table = summarize(frame) if not frame.empty else pd.DataFrame()
    if table.empty:
        return written
    paths = [out_dir / f"vae_table2.{ext}" for ext in ("md", "csv", "tex")] + [out_dir / "vae_fig4.png"]
    atomic_write_text(paths[0], to_markdown(table))
    csv = table.copy()
    for name in csv.select_dtypes("float").columns:
        csv[name] = csv[name].round(4)
    atomic_write_text(paths[1], csv.to_csv(index=False))
    atomic_write_text(paths[2], to_latex(table))
    atomic_write_bytes(paths[3], figure4(table))
    runs = _prepare(frame)
    runs = runs.assign(_o=runs["flow"].map(FLOW_ORDER)).sort_values(["_o", "flow_length"])
    runs["label"] = [row_label(f, k) for f, k in zip(runs["flow"], runs["flow_length"], strict=True)]
    curves = validation_curves(runs, "Validation bound during training (Table 2 runs)")
    if curves is not None:
        paths.append(out_dir / "vae_curves.png")
        atomic_write_bytes(paths[-1], curves)
    return paths + written
