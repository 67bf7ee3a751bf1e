"""Plots of a sweep (pure: plain data in, plotly figures out): an outcome against a varied field, one line per
combination of the other fields (the LoRA paper's Table 6 as a plot), and time or memory against a field.

    fig = outcome_figure({"targets=qv": [(1, 2.3), (4, 2.1)]}, x_label="lora.r", y_label="best val loss")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go

from ui.plots import LAYOUT, _empty

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def outcome_figure(
    lines: Mapping[str, Sequence[tuple[object, float]]], *, x_label: str, y_label: str, title: str = ""
) -> go.Figure:
    """One trace per line, named after the other fields' values; a log x axis for ranks (1, 2, 4, ... 64)."""
    fig = go.Figure(
        layout=dict(LAYOUT, title=title or f"{y_label} vs {x_label}", xaxis_title=x_label, yaxis_title=y_label)
    )
    numeric = True
    for i, (label, pts) in enumerate(lines.items()):
        x, y = [p[0] for p in pts], [p[1] for p in pts]
        numeric = numeric and all(isinstance(v, (int, float)) for v in x)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=label, line=dict(color=PALETTE[i % 8])))
    if not lines:
        return _empty(fig, "no finished member has this outcome yet")
    xs = sorted({p[0] for pts in lines.values() for p in pts}, key=str) if not numeric else []
    if numeric:
        vals = sorted({p[0] for pts in lines.values() for p in pts})
        if x_label.endswith(".r") and vals and vals[0] > 0 and vals[-1] / vals[0] >= 8:
            fig.update_xaxes(type="log", tickvals=vals, ticktext=[str(v) for v in vals])
        else:
            fig.update_xaxes(tickvals=vals)
    else:
        fig.update_xaxes(type="category", categoryorder="array", categoryarray=xs)
    return fig
