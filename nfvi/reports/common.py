"""Helpers every report shares: a tolerant column reader, the VAE runs' normalisation and flow labels, the
markers of runs whose numbers need a caveat (:data:`UNFINISHED_MARK`, :data:`NOISY_KL_MARK`), and the Markdown
and LaTeX table writers (pandas' ``to_markdown`` and ``to_latex``, cells formatted as text first)."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "FLOW_ORDER",
    "FLOW_LABEL",
    "UNFINISHED_MARK",
    "UNFINISHED_LEGEND",
    "NOISY_KL_MARK",
    "NOISY_KL_LEGEND",
    "MIN_RELIABLE_SAMPLES",
    "col",
    "normalize_runs",
    "natural_order",
    "setting_sort_key",
    "unfinished_notes",
    "group_unfinished",
    "noisy_kl",
    "validation_curves",
    "markdown_table",
    "latex_tabular",
]

#: marks a row holding a run stopped before its configured number of updates
UNFINISHED_MARK = "†"
UNFINISHED_LEGEND = (
    f"{UNFINISHED_MARK} unfinished: the run stopped before its configured number of updates (trainer.steps); "
    "its numbers are not those of the planned experiment."
)
#: importance samples S below which -ln p(x) (and so KL = -ELBO - (-ln p(x))) is flagged as noisy
MIN_RELIABLE_SAMPLES = 100
#: marks a KL cell that is negative or estimated with S < MIN_RELIABLE_SAMPLES importance samples
NOISY_KL_MARK = "‡"
NOISY_KL_LEGEND = (
    f"{NOISY_KL_MARK} -ln p(x) is an importance-sampling estimate that is noisy and biased upward at this S "
    f"(few samples: S < {MIN_RELIABLE_SAMPLES}, or a negative KL): -ELBO - (-ln p(x)) is then not a KL "
    "(a KL is never negative); raise eval.num_samples."
)

FLOW_ORDER = {"none": 0, "planar": 1, "radial": 2, "nice": 3, "iaf": 4, "householder": 5, "sylvester": 6}
FLOW_LABEL = {
    "none": "DLGM, diagonal covariance",
    "planar": "DLGM + NF (planar)",
    "radial": "DLGM + radial",
    "nice": "DLGM + NICE",
    "iaf": "DLGM + IAF",
    "householder": "DLGM + Householder",
    "sylvester": "DLGM + Sylvester",
}


def col(frame: pd.DataFrame, name: str, default=None) -> pd.Series:
    """Column ``name`` of ``frame``, or ``default`` in every row when no run recorded it."""
    return frame[name] if name in frame else pd.Series([default] * len(frame), index=frame.index)


def normalize_runs(frame: pd.DataFrame, metrics) -> pd.DataFrame:
    """The ``results.json`` rows of VAE runs with typed columns (shared by Table 2 and Table 3).

    ``flow_length`` and ``seed`` as ints, ``flow`` = ``none`` at K = 0 (the same model whatever the kind),
    ``metrics`` as floats (NaN where missing), ``test_kl`` = -ELBO - (-ln p(x)) when no run recorded it,
    ``finished_at`` as text (to keep the latest repeat of a seed).
    """
    df = frame.copy()
    for key in ("flow_length", "seed"):
        df[key] = pd.to_numeric(col(df, key, 0), errors="coerce").fillna(0).astype(int)
    df["flow"] = col(df, "flow", "none").fillna("none").astype(str)
    df.loc[df["flow_length"] == 0, "flow"] = "none"
    for m in metrics:
        df[m] = pd.to_numeric(col(df, m), errors="coerce")
    if df["test_kl"].isna().all():
        df["test_kl"] = df["test_neg_elbo"] - df["test_nll"]
    df["finished_at"] = col(df, "finished_at", "").fillna("").astype(str)
    return df


def _fmt_int(value: float) -> str:
    return f"{int(value):,}"


#: config keys that never make two runs different experiments (where they ran, how they were logged, the seed)
INCIDENTAL_CONFIG = (
    "seed", "device", "threads", "resume", "overwrite", "run_dir", "paths/", "logger", "eval/progress",
    "trainer/progress", "trainer/log_every", "trainer/ckpt_every", "eval/batch_size", "eval/chunk", "eval/seed",
)  # fmt: skip


def config_key(column: str) -> str:
    """``config/optim/lr`` -> ``optim.lr``."""
    return column.removeprefix("config/").replace("/", ".")


def _as_text(value) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return format(value, "g")
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def varying_config(frame: pd.DataFrame, keys: list[str]) -> list[str]:
    """The ``config/...`` columns of ``frame`` (each run's resolved config, flattened) that tell runs apart
    beyond ``keys``: a column is listed when grouping by ``keys`` and the columns listed so far, plus it, splits
    some group; incidental keys (:data:`INCIDENTAL_CONFIG`) never count. A report groups by ``keys`` + these, so
    two runs that differ in any config key (``optim.lr``, ``wall``, ...) are never merged into one row. The
    ``source`` column (the search folder, when a report searches several) counts like a config key.
    """
    columns = [c for c in frame.columns if c.startswith("config/") or c == "source"]  # source: nfvi.reports.task
    incidental = tuple(k.replace("/", ".") for k in INCIDENTAL_CONFIG)
    columns = [c for c in columns if not config_key(c).startswith(incidental) and c not in keys]
    if frame.empty or not columns:
        return []
    text = frame[columns].apply(lambda s: s.map(_as_text))
    chosen: list[str] = []
    base = frame[keys].astype(str) if keys else pd.DataFrame(index=frame.index)
    for c in sorted(columns):
        seen = text[c][text[c] != ""]
        if seen.nunique() <= 1:
            continue
        current = pd.concat([base, text[chosen]], axis=1)
        before = current.groupby(list(current.columns), dropna=False).ngroups if len(current.columns) else 1
        after = pd.concat([current, text[c]], axis=1)
        if after.groupby(list(after.columns), dropna=False).ngroups > before:
            chosen.append(c)
    return chosen


def setting_labels(frame: pd.DataFrame, columns: list[str]) -> pd.Series:
    """``optim.lr=0.01, wall=0`` per row for the ``columns`` from :func:`varying_config` (``""`` when none)."""
    if not columns:
        return pd.Series("", index=frame.index)
    return frame[columns].apply(lambda row: ", ".join(f"{config_key(c)}={_as_text(v)}" for c, v in row.items()), axis=1)


def natural_order(labels: pd.Series) -> pd.Series:
    """A sort key for setting labels (:func:`setting_labels`) that orders the numbers in them by value, so
    ``steps=95000`` comes before ``steps=120000`` (string order puts it after): each number is written with leading
    zeros to a fixed width (numbers below 10^29)."""
    pattern = re.compile(r"\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
    return labels.astype(str).map(lambda s: pattern.sub(lambda m: f"{float(m.group()):045.15f}", s))


def setting_sort_key(column: pd.Series) -> pd.Series:
    """``key`` for ``DataFrame.sort_values``: the ``setting`` column in :func:`natural_order`, the others as they
    are (Table 1's and Table 2's row order)."""
    return natural_order(column) if column.name == "setting" else column


def unfinished_notes(frame: pd.DataFrame) -> pd.Series:
    """Per run, ``""`` or why it is unfinished: ``"661/500,000 updates"`` (``steps`` below its target).

    The target is the resolved config's ``config/trainer/steps`` when results.json records it (provenance),
    else ``trainer/steps`` (a run that ``stopped_early`` is finished); with no target, a run whose results.json
    says ``finished: false`` gives ``"661 updates, finished=false"``; otherwise the run is not flagged.
    """
    done = pd.to_numeric(col(frame, "steps"), errors="coerce")
    target = pd.to_numeric(col(frame, "config/trainer/steps"), errors="coerce")
    target = target.fillna(pd.to_numeric(col(frame, "trainer/steps"), errors="coerce"))
    finished = col(frame, "finished")
    early = col(frame, "stopped_early", False).fillna(False)
    notes = []
    for d, t, f, stopped in zip(done, target, finished, early, strict=True):
        if stopped is True or stopped is np.True_:  # early stopping ended it (trainer.patience): finished
            notes.append("")
        elif pd.notna(d) and pd.notna(t) and d < t:
            notes.append(f"{_fmt_int(d)}/{_fmt_int(t)} updates")
        elif pd.isna(t) and isinstance(f, bool | np.bool_) and not f:
            notes.append(f"{_fmt_int(d)} updates, finished=false" if pd.notna(d) else "finished=false")
        else:
            notes.append("")
    return pd.Series(notes, index=frame.index, dtype=object)


def group_unfinished(notes: pd.Series) -> str:
    """The notes of a group of runs (one table row) joined: ``""`` when every run finished."""
    return "; ".join(dict.fromkeys(n for n in notes if n))


def noisy_kl(kl: float, num_samples) -> bool:
    """Whether a KL = -ELBO - (-ln p(x)) needs :data:`NOISY_KL_MARK`: negative, or S below
    :data:`MIN_RELIABLE_SAMPLES` (``num_samples`` may be several values joined by commas; unknown: not flagged)."""
    if pd.notna(kl) and kl < 0:
        return True
    values = pd.to_numeric(pd.Series(str(num_samples).split(",")), errors="coerce").dropna()
    return bool(len(values) and values.min() < MIN_RELIABLE_SAMPLES)


def curve_label(row: pd.Series) -> str:
    """One run's legend entry in :func:`validation_curves`: the caller's ``label``, a nonzero ``seed``, and the
    run's folder as ``<parent>/<name>`` (runs of one setting, e.g. repeats or other lengths, differ only there)."""
    seed = row.get("seed", 0)
    label = f"{row['label']} (seed {seed})" if seed else row["label"]
    folder = Path(row["run_dir"])
    return f"{label}: {folder.parent.name}/{folder.name}"


def validation_curves(runs: pd.DataFrame, title: str) -> bytes | None:
    """PNG bytes of each run's validation -ELBO against updates, read from ``<run_dir>/metrics.csv``.

    ``runs``: one row per run, in legend order, with ``run_dir`` and ``label`` (the caller's name of the flow;
    the legend entry is :func:`curve_label`); a folder named twice is drawn once. The curve is the ``step`` and
    ``val_neg_elbo`` columns that ``nfvi train`` logs every ``trainer.val_every`` updates; rows whose folder
    holds no such file or column are left out. The y axis starts at the lowest value and ends at the highest
    value after the first tenth of each curve, so that the early fall does not flatten the rest. None when
    no row has a curve.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = []
    for _, row in runs.drop_duplicates("run_dir").iterrows():
        try:
            metrics = pd.read_csv(Path(row["run_dir"]) / "metrics.csv", usecols=["step", "val_neg_elbo"]).dropna()
        except (OSError, ValueError):  # no file, or no such columns
            continue
        if not metrics.empty:
            curves.append((curve_label(row), metrics["step"].to_numpy(), metrics["val_neg_elbo"].to_numpy()))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for label, steps, values in curves:
        ax.plot(steps, values, label=label, linewidth=1.2, marker="o", markersize=3 if len(steps) <= 20 else 0)
    low = min(v.min() for _, _, v in curves)
    high = max(v[len(v) // 10 :].max() for _, _, v in curves)
    if np.isfinite(low) and np.isfinite(high) and high > low:
        ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    ax.set_xlabel("parameter updates")
    ax.set_ylabel("validation -ELBO (nats)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the axes, not over the curves
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def markdown_table(frame: pd.DataFrame, align: list[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table of ``frame`` (pandas ``to_markdown``, so tabulate pads the columns).

    The cells are shown as given: format numbers as text first (tabulate would otherwise re-format numeric-looking
    strings such as ``"0.10"`` or ``"1,000"``); NaN and None print as empty cells. ``align``: one of ``"left"``,
    ``"right"``, ``"center"`` per column (default: tabulate's, left for text)."""
    cells = frame.astype(object).where(frame.notna(), "").astype(str)
    return cells.to_markdown(index=False, tablefmt="pipe", colalign=align, disable_numparse=True)


def latex_tabular(
    sections: list[tuple[str, pd.DataFrame]], header: list[str], column_format: str, notes: list[str] = ()
) -> str:
    """One booktabs ``tabular`` (pandas ``to_latex``) of several sections of rows with the same columns.

    ``sections``: ``(caption, rows)`` pairs; each caption (LaTeX) opens its rows as an italic full-width row between
    two rules. ``header``: the column heads (LaTeX). Every cell is LaTeX already (escaped by the caller), so pandas
    escapes nothing. ``notes``: footnote lines (LaTeX) set as full-width rows under the bottom rule."""
    frames = [rows.astype(object).where(rows.notna(), "").astype(str).set_axis(header, axis=1) for _, rows in sections]
    body = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=header)
    lines = body.to_latex(index=False, escape=False, column_format=column_format).splitlines()
    # to_latex: \begin{tabular}, \toprule, the header, \midrule, one line per row, \bottomrule, \end{tabular}
    head, rows, tail = lines[:3], lines[4:-2], lines[-2:]
    span = len(header)
    out, start = head, 0
    for (caption, _), n in zip(sections, [len(f) for f in frames], strict=True):
        out += [r"\midrule", rf"\multicolumn{{{span}}}{{l}}{{\emph{{{caption}}}}} \\", r"\midrule"]
        out += rows[start : start + n]
        start += n
    out.append(tail[0])
    out += [rf"\multicolumn{{{span}}}{{p{{0.95\linewidth}}}}{{\footnotesize {text}}} \\" for text in notes]
    return "\n".join([*out, tail[1], ""])
