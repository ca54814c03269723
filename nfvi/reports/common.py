"""Helpers every report shares: a tolerant column reader and the VAE runs' normalisation and flow labels."""

from __future__ import annotations

import pandas as pd

__all__ = ["FLOW_ORDER", "FLOW_LABEL", "col", "normalize_runs"]

FLOW_ORDER = {"none": 0, "planar": 1, "radial": 2, "nice": 3}
FLOW_LABEL = {
    "none": "DLGM, diagonal covariance",
    "planar": "DLGM + NF (planar)",
    "radial": "DLGM + radial",
    "nice": "DLGM + NICE",
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
