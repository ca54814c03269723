"""The shared table writers: pandas' to_markdown and to_latex, cells shown as the reports formatted them."""

from __future__ import annotations

import math

import pandas as pd

from nfvi.reports.common import latex_tabular, markdown_table


def test_markdown_table_shows_cells_as_given():
    frame = pd.DataFrame({"a": ["x", "0.10"], "b": ["1,000", None], "c": [math.nan, "+0.50 §"]})
    lines = markdown_table(frame, ["left", "right", "right"]).splitlines()
    assert lines == [
        "| a    |     b |       c |",
        "|:-----|------:|--------:|",
        "| x    | 1,000 |         |",
        "| 0.10 |       | +0.50 § |",
    ]


def test_latex_tabular_opens_each_section_with_its_caption():
    frame = pd.DataFrame({"A": ["x", "y", "z"], "B": ["1", None, r"2 $\pm$ 1"]})
    tex = latex_tabular([("first", frame.iloc[:1]), ("second", frame.iloc[1:])], ["A", "$-$B"], "lr", ["a note"])
    assert tex.splitlines() == [
        r"\begin{tabular}{lr}",
        r"\toprule",
        r"A & $-$B \\",
        r"\midrule",
        r"\multicolumn{2}{l}{\emph{first}} \\",
        r"\midrule",
        r"x & 1 \\",
        r"\midrule",
        r"\multicolumn{2}{l}{\emph{second}} \\",
        r"\midrule",
        r"y &  \\",
        r"z & 2 $\pm$ 1 \\",
        r"\bottomrule",
        r"\multicolumn{2}{p{0.95\linewidth}}{\footnotesize a note} \\",
        r"\end{tabular}",
    ]
    assert latex_tabular([], ["A"], "l").splitlines() == [
        r"\begin{tabular}{l}",
        r"\toprule",
        r"A \\",
        r"\bottomrule",
        r"\end{tabular}",
    ]
