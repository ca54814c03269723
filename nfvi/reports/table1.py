"""``nfvi report``: Table 1 of the Sylvester-flows paper from the ``vae`` runs with ``model=gated_conv``.

van den Berg, Hasenclever, Tomczak & Welling, "Sylvester Normalizing Flows for Variational Inference",
UAI 2018 (arXiv 1803.05649), Table 1: test -ELBO and -ln p(x) (nats) of the gated-convnet VAE
(:mod:`nfvi.vae.gated_conv`) on statically binarized MNIST and on Omniglot, without a flow and with
planar flows, IAF and the three Sylvester flows (O-SNF, H-SNF, T-SNF: orthogonal, Householder and
triangular Q).

:func:`summarize_table1` takes the rows of :func:`is_table1_row` (``model == "gated_conv"``) and
gives one row per dataset x settings x flow label, where

- the label is ``no flow`` (``flow=none`` or K = 0), ``planar``, ``IAF`` (``flow=iaf``), and for
  ``flow=sylvester`` the ``flow_variant`` field: ``orthogonal`` -> ``O-SNF``, ``householder`` -> ``H-SNF``,
  ``triangular`` -> ``T-SNF``; any other kind keeps its own name;
- the settings are K, the latent size, the updates (``steps``), S (``num_importance_samples``) and
  the test images: runs that differ in them are not averaged together;
- the numbers are the mean ± standard deviation over seeds of ``test_neg_elbo`` and ``test_nll``
  (one seed: ± its standard error over test images), beside the published values (:data:`PUBLISHED`);
- each posterior's flow parameter count as its runs recorded it (``flow_params``, written by ``nfvi evaluate``)
  beside the authors' count (:data:`AUTHORS_FLOW_PARAMS`) where the settings are theirs.

:func:`write_table1` writes ``sylvester_table1.md``, ``.csv``, ``.tex``, ``sylvester_table1.png`` (-ELBO against
the flow label per dataset, the published -ELBO as open markers) and ``sylvester_curves.png`` (each run's
validation -ELBO against updates, when its folder holds a ``metrics.csv``).

Published values: the -ELBO column as recalled from the paper's Table 1; FFJORD (Grathwohl et al.
2019, Table 3) confirms no flow, planar, IAF and the best Sylvester flow per dataset ([C]); the
other SNF variants and the whole -ln p(x) column are unconfirmed ([U]).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from nfvi.reports.common import (
    col,
    latex_tabular,
    markdown_table,
    normalize_runs,
    setting_labels,
    setting_sort_key,
    validation_curves,
    varying_config,
)
from nfvi.runs import atomic_write_bytes, atomic_write_text

__all__ = [
    "AUTHORS_FLOW_PARAMS",
    "LABELS",
    "PUBLISHED",
    "Published",
    "SNF_LABELS",
    "flow_label",
    "is_table1_row",
    "summarize_table1",
    "table1_latex",
    "table1_markdown",
    "write_table1",
]

MODEL = "gated_conv"
#: row order of the table (the paper's)
LABELS = ("no flow", "planar", "IAF", "O-SNF", "H-SNF", "T-SNF")
_LABEL_RANK = {name: i for i, name in enumerate(LABELS)}
#: ``flow=sylvester``: ``flow_variant`` -> label
SNF_LABELS = {"orthogonal": "O-SNF", "householder": "H-SNF", "triangular": "T-SNF"}
KIND_LABELS = {"none": "no flow", "planar": "planar", "iaf": "IAF"}
DATASET_ORDER = ("mnist_static", "omniglot")
#: settings that split a dataset's runs into separate sections (``source``: the search folder, when a report
#: searches several; nfvi.reports.task.read_results)
SETTINGS = ("latent_dim", "steps", "num_importance_samples", "num_test_images", "source")
METRICS = ("test_neg_elbo", "test_nll", "test_kl")
#: the paper's evaluation: -ln p(x) by importance sampling with S = 5000 on the whole test set
PAPER_SAMPLES = 5000


class Published(NamedTuple):
    """One cell pair of the paper's Table 1: -ELBO (± sd over runs) and -ln p(x), each with a status.

    Status: ``C`` confirmed by FFJORD's Table 3, ``C*`` the best SNF's value confirmed there without the
    variant being named (Omniglot: O-SNF and H-SNF tie at 99.00 in the recalled Table 1), ``U`` unconfirmed.
    """

    neg_elbo: float
    neg_elbo_sd: float
    neg_elbo_status: str
    nll: float
    nll_status: str = "U"


#: (dataset, label) -> the paper's Table 1 values (nats)
PUBLISHED: dict[tuple[str, str], Published] = {
    ("mnist_static", "no flow"): Published(86.55, 0.06, "C", 82.14),
    ("mnist_static", "planar"): Published(86.06, 0.31, "C", 81.91),
    ("mnist_static", "IAF"): Published(84.20, 0.17, "C", 80.79),
    ("mnist_static", "O-SNF"): Published(83.32, 0.06, "C", 80.22),
    ("mnist_static", "H-SNF"): Published(83.40, 0.01, "U", 80.24),
    ("mnist_static", "T-SNF"): Published(83.40, 0.10, "U", 80.28),
    ("omniglot", "no flow"): Published(104.28, 0.39, "C", 97.25),
    ("omniglot", "planar"): Published(102.65, 0.42, "C", 96.04),
    ("omniglot", "IAF"): Published(102.41, 0.04, "C", 96.08),
    ("omniglot", "O-SNF"): Published(99.00, 0.29, "C*", 93.82),
    ("omniglot", "H-SNF"): Published(99.00, 0.04, "C*", 93.77),
    ("omniglot", "T-SNF"): Published(99.33, 0.23, "U", 93.97),
}

#: the authors' flow parameter counts (their code, riannevdberg/sylvester-flows: the flow's amortization heads, for
#: IAF its steps with the shared context Linear) at :data:`AUTHORS_SETTINGS`; nfvi's posteriors have the same
#: (tests/test_sylvester_models.py builds them)
AUTHORS_FLOW_PARAMS: dict[str, int] = {
    "no flow": 0,
    "planar": 132_612,  # u, w: Linear(256, K * 64) each; b: Linear(256, K)
    "IAF": 740_672,  # K x (64->320, 320->320, 320->64 mean, 320->64 gate) masked layers + Linear(256, 320)
    "O-SNF": 616_800,  # Linear(256, K * (M^2 + 3 M + 64 M)), M = 8
    "H-SNF": 4_934_400,  # Linear(256, K * (64^2 + 3 * 64 + 8 * 64)), 8 reflections
    "T-SNF": 4_408_064,  # Linear(256, K * (64^2 + 3 * 64))
}
#: the settings of :data:`AUTHORS_FLOW_PARAMS`: z=64, K=4 (their defaults), and per label the flow options
AUTHORS_SETTINGS = {"latent_dim": "64", "K": 4}
AUTHORS_OPTIONS: dict[str, dict[str, float]] = {
    "IAF": {"flow_hidden": 320, "flow_num_hidden": 2},
    "O-SNF": {"flow_num_vectors": 8},
    "H-SNF": {"flow_num_householder": 8},
}

#: dataset -> what its numbers mean next to the paper's
READINGS: dict[str, str] = {
    "mnist_static": "statically binarized MNIST (Larochelle & Murray's fixed binarization), the paper's data.",
    "omniglot": (
        "Omniglot here is a stand-in (omniglot28_rawresize.npz, resized here from the raw images), not Burda "
        "et al.'s chardata.mat split the paper uses: NOT comparable with the paper's values."
    ),
}
OMNIGLOT_PAPER_DATA = "Omniglot from Burda et al.'s chardata.mat (the paper's split)."
PARAMS_NOTE = (
    "Flow params: the flow's parameters with its amortization head (for IAF its steps and the shared context "
    "Linear), as recorded by each run's evaluation (blank in records written before nfvi recorded them); the "
    "authors' count from their code (riannevdberg/sylvester-flows) where the settings are theirs (z=64, K=4, "
    "O-SNF M=8, H-SNF 8 reflections, IAF width 320 with two masked layers per step)."
)
PROTOCOL_NOTE = (
    "A CPU profile's numbers (fewer epochs, a test subset, fewer importance samples) are not the paper's "
    f"protocol (-ln p(x) with S = {PAPER_SAMPLES} on the whole test set, after training to convergence) and "
    "are not comparable with its values."
)


def is_table1_row(frame: pd.DataFrame) -> pd.Series:
    """Boolean mask of the rows that belong in Table 1: ``model == "gated_conv"``."""
    if "model" not in frame:
        return pd.Series(False, index=frame.index)
    return frame["model"].fillna("").astype(str) == MODEL


def flow_label(kind: str, variant: str = "", length: int = 1) -> str:
    """Table 1's label of a flow: ``no flow`` at K = 0, ``O-SNF`` for ``sylvester``/``orthogonal``, etc."""
    if kind == "none" or length == 0:
        return "no flow"
    if kind == "sylvester":
        return SNF_LABELS.get(variant, f"SNF ({variant or 'variant?'})")
    return KIND_LABELS.get(kind, kind)


def _prepare(frame: pd.DataFrame) -> pd.DataFrame:
    df = normalize_runs(frame[is_table1_row(frame)], (*METRICS, "test_nll_se", "test_neg_elbo_se"))
    df["dataset"] = col(df, "dataset", "?").fillna("?").astype(str)
    df["flow_variant"] = col(df, "flow_variant", "").fillna("").astype(str)
    df.loc[df["flow"] == "none", "flow_length"] = 0
    triples = zip(df["flow"], df["flow_variant"], df["flow_length"], strict=True)
    df["label"] = [flow_label(f, v, k) for f, v, k in triples]
    for s in SETTINGS:
        df[s] = col(df, s, "").fillna("").astype(str)
    for s in ("run_dir", "data_source", "test_images"):
        df[s] = col(df, s, "").fillna("").astype(str)
    for s in ("flow_params", *{k for options in AUTHORS_OPTIONS.values() for k in options}):
        df[s] = pd.to_numeric(col(df, s), errors="coerce")
    return df.dropna(subset=["test_neg_elbo", "test_nll"], how="all")


def _authors_params(values: dict, g: pd.DataFrame) -> float:
    """The authors' flow parameter count of this row's posterior, or NaN where its settings are not theirs."""
    label = values["label"]
    if label not in AUTHORS_FLOW_PARAMS:
        return math.nan
    if label != "no flow" and (
        values["latent_dim"] != AUTHORS_SETTINGS["latent_dim"] or int(values["flow_length"]) != AUTHORS_SETTINGS["K"]
    ):
        return math.nan
    options = AUTHORS_OPTIONS.get(label, {})
    if not all((g[key] == value).all() for key, value in options.items()):
        return math.nan
    return float(AUTHORS_FLOW_PARAMS[label])


def _mean_spread(g: pd.DataFrame, metric: str) -> tuple[float, float, float]:
    values = g[metric].dropna()
    mean = float(values.mean()) if len(values) else math.nan
    sd = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    se = pd.to_numeric(col(g, f"{metric}_se"), errors="coerce")
    return mean, sd, float(se.mean()) if se.notna().any() else math.nan


def _row(values: dict, g: pd.DataFrame) -> dict:
    g = g.sort_values("finished_at").drop_duplicates(subset=["seed"], keep="last")
    row = {**values, "flow": g["flow"].iloc[0], "flow_variant": g["flow_variant"].iloc[0], "seeds": g["seed"].nunique()}
    for metric in ("test_neg_elbo", "test_nll"):
        row[metric], row[f"{metric}_sd"], row[f"{metric}_se"] = _mean_spread(g, metric)
    paper = PUBLISHED.get((values["dataset"], values["label"]))
    row["paper_neg_elbo"] = paper.neg_elbo if paper else math.nan
    row["paper_neg_elbo_sd"] = paper.neg_elbo_sd if paper else math.nan
    row["paper_neg_elbo_status"] = paper.neg_elbo_status if paper else ""
    row["paper_nll"] = paper.nll if paper else math.nan
    row["paper_nll_status"] = paper.nll_status if paper else ""
    row["diff_neg_elbo"] = row["test_neg_elbo"] - row["paper_neg_elbo"]
    samples = pd.to_numeric(g["num_importance_samples"], errors="coerce")
    row["paper_protocol"] = bool((samples >= PAPER_SAMPLES).all() and (g["test_images"] == "all").all())
    row["data_source"] = ";".join(sorted(set(g["data_source"]) - {""}))
    row["run_dirs"] = ";".join(g["run_dir"])
    counts = g["flow_params"].dropna().unique()  # recorded by nfvi evaluate (absent from older records)
    row["flow_params"] = float(counts[0]) if len(counts) == 1 else math.nan
    row["authors_flow_params"] = _authors_params(values, g)
    return row


def summarize_table1(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, settings, flow label) of the ``gated_conv`` runs; see the module docstring.

    Columns: dataset, K (``flow_length``), the settings, label, ``setting`` (the config keys that tell runs apart
    beyond those, e.g. ``trainer.precision=bf16``: such runs are never merged; empty when none), flow, flow_variant,
    seeds, ``test_neg_elbo``
    and ``test_nll`` (means over seeds, nats) with ``*_sd`` (std over seeds; NaN for one seed) and ``*_se``
    (mean standard error over test images), ``paper_neg_elbo`` (± ``paper_neg_elbo_sd``, status C/C*/U),
    ``paper_nll`` (status U), ``diff_neg_elbo`` (ours - paper), ``paper_protocol`` (S >= 5000 on the whole
    test set), data_source, run_dirs. Empty when no row is a ``gated_conv`` run.
    """
    df = _prepare(frame)
    if df.empty:
        return pd.DataFrame()
    keys = ["dataset", *SETTINGS, "label", "flow_length"]
    varying = varying_config(df, keys)  # e.g. trainer.precision: such runs are never merged
    df["setting"] = setting_labels(df, varying)
    keys.append("setting")
    rows = [_row(dict(zip(keys, key, strict=True)), g) for key, g in df.groupby(keys, sort=False)]
    table = pd.DataFrame(rows).rename(columns={"flow_length": "K"})
    rank = {name: i for i, name in enumerate(DATASET_ORDER)}
    table["_d"] = table["dataset"].map(rank).fillna(len(rank))
    table["_l"] = table["label"].map(_LABEL_RANK).fillna(len(LABELS))
    numeric = [f"_{s}" for s in SETTINGS]  # sort 500 before 1000
    table[numeric] = table[list(SETTINGS)].apply(pd.to_numeric, errors="coerce").to_numpy()
    order = ["_d", "dataset", *numeric, *SETTINGS, "_l", "label", "K", "setting"]
    table = table.sort_values(order, kind="stable", key=setting_sort_key)  # lr=2e-05 before lr=0.0003
    return table.drop(columns=["_d", "_l", *numeric]).reset_index(drop=True)


def _num(value: float, fmt: str = ".2f") -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _pm(row, metric: str) -> str:
    text = _num(row[metric])
    spread = row[f"{metric}_sd"] if row["seeds"] > 1 else row[f"{metric}_se"]
    return f"{text} ± {_num(spread)}" if text and not math.isnan(spread) else text


def _paper_elbo(row) -> str:
    if math.isnan(row["paper_neg_elbo"]):
        return ""
    return f"{row['paper_neg_elbo']:.2f} ± {row['paper_neg_elbo_sd']:.2f} [{row['paper_neg_elbo_status']}]"


def _paper_nll(row) -> str:
    return "" if math.isnan(row["paper_nll"]) else f"{row['paper_nll']:.2f} [{row['paper_nll_status']}]"


def _count(value: float) -> str:
    return "" if value is None or math.isnan(value) else f"{int(value):,}"


def _cells(row) -> list[str]:
    """Model, K, -ELBO and -ln p(x) (ours), the paper's -ELBO and -ln p(x), ours - paper (-ELBO), seeds, and the
    flow's parameter count (ours, as recorded by the runs; the authors' where the settings are theirs)."""
    diff = _num(row["diff_neg_elbo"], "+.2f")
    ours = [_pm(row, "test_neg_elbo"), _pm(row, "test_nll")]
    counts = [_count(row.get("flow_params", math.nan)), _count(row.get("authors_flow_params", math.nan))]
    model = f"{row['label']} ({row['setting']})" if row.get("setting") else row["label"]
    return [model, str(row["K"]), *ours, _paper_elbo(row), _paper_nll(row), diff, str(row["seeds"]), *counts]


HEADER = ["Model", "K", "-ELBO (ours)", "-ln p(x) (ours)", "-ELBO (paper)", "-ln p(x) (paper)"]
HEADER += ["ours - paper (-ELBO)", "seeds", "flow params (ours)", "flow params (authors)"]


def _rows(g: pd.DataFrame) -> pd.DataFrame:
    """The rows of one section as text cells (:func:`_cells`) under :data:`HEADER`."""
    return pd.DataFrame([_cells(r) for _, r in g.iterrows()], columns=HEADER)


def _sections(table: pd.DataFrame):
    """``(dataset, caption, rows)`` per dataset and settings, in the table's order."""
    for key, g in table.groupby(["dataset", *SETTINGS], sort=False):
        values = dict(zip(["dataset", *SETTINGS], key, strict=True))
        names = {"num_importance_samples": "S", "num_test_images": "test images", "steps": "updates"}
        caption = ", ".join(f"{names.get(s, s)}={values[s]}" for s in SETTINGS if values[s] != "")
        yield values["dataset"], caption, g


def _reading(dataset: str, g: pd.DataFrame) -> str:
    if dataset == "omniglot" and (g["data_source"] != "").all() and g["data_source"].str.contains("chardata.mat").all():
        text = OMNIGLOT_PAPER_DATA
    else:
        text = READINGS.get(dataset, "not one of the paper's datasets: no published values.")
    if not g["paper_protocol"].all():
        text += " Not the paper's evaluation protocol (S < 5000 or a test subset): not comparable."
    return text


def table1_markdown(table: pd.DataFrame) -> str:
    """Markdown of :func:`summarize_table1`'s table: one section per dataset and settings, then the notes."""
    lines = ["# Sylvester flows, Table 1: test -ELBO and -ln p(x) (nats, lower is better)", ""]
    if table.empty:
        return "\n".join([*lines, "(no model=gated_conv runs)", ""])
    for dataset, caption, g in _sections(table):
        lines += [f"## dataset={dataset} ({caption})", "", _reading(dataset, g), ""]
        lines += [markdown_table(_rows(g), ["left"] + ["right"] * (len(HEADER) - 1)), ""]
    lines += [
        "Ours: means over test images and seeds; ± is the standard deviation over seeds, or for one seed the "
        "standard error over test images. -ln p(x) by importance sampling with q_K as the proposal.",
        "Paper: van den Berg et al. (2018), Table 1 (mean ± sd over runs). [C] value confirmed by FFJORD's Table 3 "
        "(Grathwohl et al. 2019); [C*] the best Sylvester flow's value, confirmed there without the variant "
        "being named (O-SNF and H-SNF tie at 99.00 on Omniglot); [U] unconfirmed (recalled; the whole -ln p(x) "
        "column).",
        PARAMS_NOTE,
        PROTOCOL_NOTE,
        "",
    ]
    return "\n".join(lines)


def _tex(text: str) -> str:
    out = str(text).replace("\\", r"\textbackslash{}").replace("&", r"\&").replace("%", r"\%").replace("_", r"\_")
    return out.replace("#", r"\#").replace("±", r"$\pm$")


def table1_latex(table: pd.DataFrame) -> str:
    """Table 1 as a LaTeX ``tabular`` (booktabs), one block per dataset and settings."""
    sections = [(_tex(f"{dataset} ({caption})"), _rows(g).map(_tex)) for dataset, caption, g in _sections(table)]
    comment = "% nfvi report: Sylvester flows Table 1 (nats). [C] confirmed, [C*] best SNF confirmed, [U] unconfirmed."
    return f"{comment}\n{latex_tabular(sections, [_tex(h) for h in HEADER], 'lrrrrrrrrr')}"


def table1_figure(table: pd.DataFrame) -> bytes:
    """PNG bytes: one panel per dataset, -ELBO against the flow label (ours ± spread; the paper's open)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(table["dataset"]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        d = table[table["dataset"] == dataset]
        labels = list(dict.fromkeys(d["label"]))
        pos = {label: i for i, label in enumerate(labels)}
        sections = list(_sections(d))
        for i, (_, caption, g) in enumerate(sections):
            shift = 0.08 * (i - (len(sections) - 1) / 2)
            spread = [r["test_neg_elbo_sd"] if r["seeds"] > 1 else r["test_neg_elbo_se"] for _, r in g.iterrows()]
            x = [pos[label] + shift for label in g["label"]]
            yerr = pd.Series(spread, dtype=float).fillna(0).to_numpy()
            ax.errorbar(x, g["test_neg_elbo"], yerr=yerr, fmt="o", capsize=3, label=f"ours ({caption})")
        paper = d.drop_duplicates("label").dropna(subset=["paper_neg_elbo"])
        if not paper.empty:
            ax.errorbar(
                [pos[label] for label in paper["label"]],
                paper["paper_neg_elbo"],
                yerr=paper["paper_neg_elbo_sd"].to_numpy(),
                fmt="s",
                color="0.3",
                markerfacecolor="none",
                capsize=3,
                label="van den Berg et al. 2018, Table 1",
            )
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set_ylabel("test -ELBO (nats)")
        ax.set_title(f"dataset={dataset}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.suptitle("Sylvester flows, Table 1: -ELBO by flow (model=gated_conv)", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_table1(frame: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write ``sylvester_table1.{md,csv,tex,png}`` for the ``gated_conv`` rows of ``frame``; [] when there are none."""
    table = summarize_table1(frame)
    if table.empty:
        return []
    out_dir = Path(out_dir)
    paths = [out_dir / f"sylvester_table1.{ext}" for ext in ("md", "csv", "tex", "png")]
    csv = table.copy()
    for name in csv.select_dtypes("float").columns:
        csv[name] = csv[name].round(4)
    atomic_write_text(paths[0], table1_markdown(table))
    atomic_write_text(paths[1], csv.to_csv(index=False))
    atomic_write_text(paths[2], table1_latex(table))
    atomic_write_bytes(paths[3], table1_figure(table))
    runs = _prepare(frame)
    runs = runs.assign(_l=runs["label"].map(_LABEL_RANK)).sort_values(["_l", "flow_length"])
    curves = validation_curves(runs, "Validation bound during training (Sylvester protocol runs)")
    if curves is not None:
        paths.append(out_dir / "sylvester_curves.png")
        atomic_write_bytes(paths[-1], curves)
    return paths
