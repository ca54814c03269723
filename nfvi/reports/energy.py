"""``nfvi report`` for ``task == "energy"`` runs: Figure 3, Figure 3(d) and their tables.

Inputs: the rows of ``results.json`` files written by ``nfvi energy`` (one per run; ``run_dir``
points at the folder holding ``density.npz``). Outputs in ``out_dir``:

- ``energy_fig3.png``: rows = targets, columns = exp(-U) then q_K of each flow and length (paper Fig. 3);
- ``energy_fig3d.png``: the bound (nats) and KL on the box against flow length, per target (Fig. 3(d));
- ``energy.md`` and ``energy.csv``: the same numbers (the bound and KL pivoted by flow length in the
  markdown, one row per target, flow, length and schedule in the CSV).

Several runs of one (target, flow, length, steps) -- different seeds -- are averaged in the tables
(``runs`` counts them; repeated runs with the same seed count once, the latest). The figure shows,
per (target, flow, length), the run with the most steps (the latest among equals). A run with a
non-finite bound or KL is never used; a run that stopped before its configured ``trainer.steps`` (known
from the resolved config in results.json) is marked ``†`` in the pivots and noted in ``unfinished``. A KL
of a fit with more than 5% of its mass outside the box (``mass_outside_box``; ``nfvi energy``'s
``kl_warning``) is marked ``§`` in the KL pivot, with a legend.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd

from nfvi.reports.common import (
    UNFINISHED_LEGEND,
    UNFINISHED_MARK,
    group_unfinished,
    markdown_table,
    setting_labels,
    unfinished_notes,
    varying_config,
)
from nfvi.runs import atomic_write_bytes, atomic_write_text

__all__ = ["write", "summarize", "to_markdown"]

FLOW_ORDER = {"none": 0, "planar": 1, "radial": 2, "nice": 3, "iaf": 4, "householder": 5}
FLOW_LABEL = {
    "none": "Gaussian",
    "planar": "planar NF",
    "radial": "radial NF",
    "nice": "NICE",
    "iaf": "IAF",
    "householder": "Householder",
}
NUMBERS = ["bound", "kl", "kl_mc", "log_z", "mass_outside_box"]
#: marks a KL on the box of a fit with more than OUTSIDE_LIMIT of q_K's mass outside the box (any seed of the row)
OUTSIDE_MARK = "§"
OUTSIDE_LIMIT = 0.05  # nfvi.energy.task.MASS_OUTSIDE_LIMIT (kept torch-free here)
OUTSIDE_LEGEND = (
    f"{OUTSIDE_MARK} more than {OUTSIDE_LIMIT:.0%} of q_K's mass lies outside the box (mass_outside_box): the KL "
    "on the box describes only the rest of q_K; the fit left the box (e.g. a learning rate too high)."
)


def _series(frame: pd.DataFrame) -> pd.DataFrame:
    """Runs that differ in any config key beyond target, flow, length and schedule are different experiments (e.g.
    ``wall=0``, the raw, improper U2-U4, or another ``optim.lr``): each flow name then carries the keys that tell
    its runs apart (``planar, wall=0``), so no table cell, Figure 3 panel or Figure 3(d) line mixes them."""
    keys = [k for k in ("target", "flow", "flow_length") if k in frame]
    keyed = frame.drop(columns=["config/trainer/steps"], errors="ignore")  # schedules: the pivots' longest run
    if "wall" in frame and "config/wall" not in frame:  # results.json without its config: its wall field
        keyed = keyed.assign(**{"config/wall": frame["wall"]})
    labels = setting_labels(keyed, varying_config(keyed, keys))
    if (labels != "").any():
        frame = frame.assign(flow=[f"{f}, {s}" if s else f for f, s in zip(frame["flow"], labels, strict=True)])
    return frame


def _label(flow: str) -> str:
    """``planar`` -> ``planar NF``; ``planar, wall=0`` -> ``planar NF, wall=0``."""
    kind, sep, rest = flow.partition(", ")
    return FLOW_LABEL.get(kind, kind) + sep + rest


def _rank(flow: str) -> int:
    return FLOW_ORDER.get(flow.partition(", ")[0], len(FLOW_ORDER))


def _order(frame: pd.DataFrame) -> pd.DataFrame:
    key = frame["flow"].map(_rank)
    return frame.assign(_f=key).sort_values(["target", "_f", "flow", "flow_length", "steps"]).drop(columns="_f")


def _latest(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (target, flow, length, steps, seed): the latest finished."""
    frame = frame.copy()
    frame["finished_at"] = frame.get("finished_at", pd.Series("", index=frame.index)).fillna("").astype(str)
    frame = frame.sort_values("finished_at")
    keys = [k for k in ("target", "flow", "flow_length", "steps", "wall", "seed") if k in frame]
    return frame.drop_duplicates(keys, keep="last")


def _usable(frame: pd.DataFrame) -> pd.DataFrame:
    """The runs with a finite bound and KL (a NaN/inf run never replaces a good one), each with its
    ``unfinished`` note (``""``, or updates done/configured: :func:`nfvi.reports.common.unfinished_notes`)."""
    frame = frame.assign(unfinished=unfinished_notes(frame))
    keep = pd.Series(True, index=frame.index)
    for name in ("bound", "kl"):
        keep &= np.isfinite(pd.to_numeric(frame[name], errors="coerce")) if name in frame else False
    return frame[keep]


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean of each number over seeds per (target, flow, flow_length, steps, wall), with ``runs``, the bound's sd
    and ``unfinished`` (``""`` when every run of the row did all its configured updates)."""
    frame = _latest(_usable(frame))
    for col in [*NUMBERS, "wall"]:
        if col not in frame:
            frame[col] = math.nan
    keys = ["target", "flow", "flow_length", "steps", "wall"]
    grouped = frame.groupby(keys, dropna=False)
    table = grouped[NUMBERS].mean()
    table.insert(0, "runs", grouped.size())
    table["bound_sd"] = grouped["bound"].std()
    table["mass_outside_box_max"] = grouped["mass_outside_box"].max()
    if "box" in frame:
        table["box"] = grouped["box"].first()
    table["unfinished"] = grouped["unfinished"].agg(group_unfinished)
    return _order(table.reset_index())


def to_markdown(table: pd.DataFrame, floatfmt: str = ".4f") -> str:
    """A GitHub-flavoured markdown table, floats formatted with ``floatfmt`` (NaN: an empty cell)."""

    def cell(v) -> str:
        if isinstance(v, float | np.floating):
            return "" if math.isnan(v) else format(v, floatfmt)
        return str(v)

    return markdown_table(table.map(cell))


def _pivot(table: pd.DataFrame, value: str, floatfmt: str | None = None) -> pd.DataFrame:
    """Rows (target, flow), columns ``K=<length>`` holding ``value`` (the longest schedule per cell).

    ``floatfmt``: format the cells as text, a cell of a row with mass outside the box (``mass_outside_box_max``
    above :data:`OUTSIDE_LIMIT`) followed by :data:`OUTSIDE_MARK`."""
    best = table.sort_values("steps").drop_duplicates(["target", "flow", "flow_length"], keep="last")
    if floatfmt is not None:
        outside = pd.to_numeric(best.get("mass_outside_box_max", pd.Series(0.0, index=best.index)), errors="coerce")
        cells = [
            "" if pd.isna(v) else format(v, floatfmt) + (f" {OUTSIDE_MARK}" if m > OUTSIDE_LIMIT else "")
            for v, m in zip(best[value], outside.fillna(0.0), strict=True)
        ]
        best = best.assign(**{value: cells})
    pivot = best.pivot_table(index=["target", "flow"], columns="flow_length", values=value, aggfunc="first")
    pivot.columns = [f"K={k}" for k in pivot.columns]
    pivot = pivot.reset_index()
    pivot = pivot.assign(_f=pivot["flow"].map(_rank))
    pivot = pivot.sort_values(["target", "_f", "flow"]).drop(columns="_f")
    notes = best.get("unfinished", pd.Series("", index=best.index)).fillna("")
    flagged = {(t, f) for t, f, u in zip(best["target"], best["flow"], notes, strict=True) if u}
    keys = zip(pivot["target"], pivot["flow"], strict=True)
    marks = [f" {UNFINISHED_MARK}" if key in flagged else "" for key in keys]
    pivot["flow"] = pivot["flow"].map(_label) + marks
    return pivot


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")  # a one-row Figure 3 keeps its titles and KLs
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _figure_runs(frame: pd.DataFrame) -> pd.DataFrame:
    frame = _latest(_usable(frame)).sort_values(["steps", "finished_at"])
    return _order(frame.drop_duplicates(["target", "flow", "flow_length"], keep="last"))


def plot_fig3(frame: pd.DataFrame, path: Path) -> None:
    """Rows: targets; columns: exp(-U) on the box, then q_K for each (flow, length) present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _figure_runs(frame)
    targets = sorted(runs["target"].unique())
    columns = list(dict.fromkeys(zip(runs["flow"], runs["flow_length"], strict=True)))
    n_rows, n_cols = len(targets), 1 + len(columns)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.6 * n_cols, 1.6 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for i, target in enumerate(targets):
        axes[i, 0].set_ylabel(target)
        truth_drawn = False
        for j, (flow, length) in enumerate(columns, start=1):
            ax = axes[i, j]
            if i == 0:
                ax.set_title(f"{_label(flow)}\nK={length}", fontsize=8)
            match = runs[(runs["target"] == target) & (runs["flow"] == flow) & (runs["flow_length"] == length)]
            npz = Path(str(match["run_dir"].iloc[0])) / "density.npz" if len(match) else None
            if npz is None or not npz.exists():
                ax.text(0.5, 0.5, "no run", ha="center", va="center", fontsize=7, transform=ax.transAxes)
                continue
            with np.load(npz) as data:
                box = float(data["box"])
                extent = (-box, box, -box, box)
                ax.imshow(np.exp(data["log_q"]), origin="lower", extent=extent, cmap="viridis")
                if not truth_drawn:
                    axes[i, 0].imshow(np.exp(data["log_p"]), origin="lower", extent=extent, cmap="viridis")
                    truth_drawn = True
            row = match.iloc[0]
            ax.set_xlabel(f"KL {row.get('kl', math.nan):.2f}", fontsize=7, labelpad=1)
    axes[0, 0].set_title("exp(-U)", fontsize=8)
    fig.tight_layout(pad=0.3)
    _save(fig, path)


def plot_fig3d(table: pd.DataFrame, path: Path) -> None:
    """Per target: the bound (top) and the KL on the box (bottom, log scale) against flow length, one line per flow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = table.sort_values("steps").drop_duplicates(["target", "flow", "flow_length"], keep="last")
    targets = sorted(best["target"].unique())
    fig, axes = plt.subplots(2, len(targets), figsize=(3.2 * len(targets), 5.2), squeeze=False, sharex=True)
    for j, target in enumerate(targets):
        rows = best[best["target"] == target]
        for flow in sorted(rows["flow"].unique(), key=lambda f: (_rank(f), f)):
            r = rows[rows["flow"] == flow].sort_values("flow_length")
            label = _label(flow)
            axes[0, j].plot(r["flow_length"], r["bound"], marker="o", label=label)
            axes[1, j].plot(r["flow_length"], r["kl"].clip(lower=1e-4), marker="o", label=label)
        log_z = rows["log_z"].dropna()
        if len(log_z):
            axes[0, j].axhline(-log_z.iloc[0], color="gray", linestyle="--", linewidth=1, label="-log Z (box)")
        axes[0, j].set_title(target)
        axes[1, j].set_yscale("log")
        axes[1, j].set_xscale("log", base=2)
        lengths = sorted(rows["flow_length"].unique())
        axes[1, j].set_xticks(lengths, [str(k) for k in lengths])
        axes[1, j].set_xlabel("flow length K")
    axes[0, 0].set_ylabel("bound E[log q + U] (nats)")
    axes[1, 0].set_ylabel("KL on the box (nats)")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def write(frame: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write Figure 3, Figure 3(d), ``energy.md`` and ``energy.csv`` from the energy rows of ``nfvi report``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = _series(frame)
    table = summarize(frame)
    paths = [out_dir / "energy.csv", out_dir / "energy.md", out_dir / "energy_fig3.png", out_dir / "energy_fig3d.png"]
    atomic_write_text(paths[0], table.to_csv(index=False))
    box = ", ".join(sorted(map(str, table["box"].dropna().unique()))) if "box" in table else "?"
    md = [
        "# 2-D energies (paper Sec. 6.1, Table 1, Fig. 3)",
        "",
        "bound = E_q[log q_K(z_K) + U(z_K)] in nats (Fig. 3(d)); U includes the soft wall at the box edge if wall > 0 "
        "(without it U2-U4 are improper and the bound keeps falling as q spreads along z1).",
        f"KL = KL(q_box || p_box) in nats, q_K and exp(-U) restricted to the box {box} and renormalised there "
        "(quadrature with q_K's exact density); mass_outside_box = the part of q_K outside it.",
        "",
        "## Bound (nats) by flow length",
        "",
        to_markdown(_pivot(table, "bound"), ".3f"),
        "",
        "## KL on the box (nats) by flow length",
        "",
        to_markdown(_pivot(table, "kl", ".3f")),
        "",
        *([OUTSIDE_LEGEND, ""] if (table["mass_outside_box_max"] > OUTSIDE_LIMIT).any() else []),
        "## All runs (means over seeds)",
        "",
        "`wall`: the width of the soft wall at the box edge (0: the raw Table 1 energy); `runs`: the seeds averaged.",
        "",
        to_markdown(table if table["unfinished"].astype(bool).any() else table.drop(columns="unfinished")),
        "",
        *([UNFINISHED_LEGEND, ""] if table["unfinished"].astype(bool).any() else []),
    ]
    atomic_write_text(paths[1], "\n".join(md))
    plot_fig3(frame, paths[2])
    plot_fig3d(table, paths[3])
    return paths
