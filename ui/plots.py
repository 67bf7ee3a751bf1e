"""Pure plot builders: plain data in, plotly figures out. No gradio, no torch, no database.

    fig = loss_figure(train=[(1, 2.3), (2, 2.1)], val=[(2, 2.2)])
    fig = compare_figure({"#3 r8": [(1, 2.3), ...], "#4 r16": [...]}, x_label="step", smoothing=0.6)

Series are lists of (x, y) pairs sorted by x. Each builder returns a go.Figure whose traces are named
after what they show ("train loss", "val loss", "lr", or the run label) so tests can check them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go

Series = Sequence[tuple[float, float]]

LAYOUT = dict(
    template="plotly_white",
    height=300,
    margin=dict(l=50, r=20, t=40, b=40),
    legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
)


def ema(values: Sequence[float], smoothing: float) -> list[float]:
    """TensorBoard-style debiased exponential moving average; smoothing 0 returns the values unchanged.

    s_t = smoothing·s_{t-1} + (1 − smoothing)·v_t, divided by (1 − smoothing^t) so the first points
    are not pulled towards zero.
    """
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing = {smoothing!r}: must be in [0, 1)")
    if smoothing == 0:
        return list(values)
    out, s = [], 0.0
    for t, v in enumerate(values, start=1):
        s = smoothing * s + (1 - smoothing) * v
        out.append(s / (1 - smoothing**t))
    return out


def _xy(series: Series) -> tuple[list[float], list[float]]:
    return [p[0] for p in series], [p[1] for p in series]


def _empty(fig: go.Figure, text: str) -> go.Figure:
    fig.add_annotation(text=text, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5, font=dict(color="#888"))
    return fig


def _line_mode(x: Sequence[float]) -> str:
    return "lines" if len(x) > 1 else "lines+markers"  # one point draws no line: show it as a marker


def _single_x(fig: go.Figure, x: Sequence[float]) -> None:
    """With points at one step only, an x range around that step (plotly's default is a unit box at 0)."""
    if x and len(set(x)) == 1:
        fig.update_xaxes(range=[x[0] - 1, x[0] + 1])


def loss_figure(train: Series, val: Series = (), *, title: str = "loss") -> go.Figure:
    """Training loss as a line, validation loss as a line with markers (it is logged less often)."""
    fig = go.Figure(layout=dict(LAYOUT, title=title, xaxis_title="step", yaxis_title="loss"))
    if train:
        x, y = _xy(train)
        fig.add_trace(go.Scatter(x=x, y=y, mode=_line_mode(x), name="train loss", line=dict(color="#1f77b4")))
    if val:
        x, y = _xy(val)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name="val loss", line=dict(color="#d62728")))
    _single_x(fig, [p[0] for p in (*train, *val)])
    return fig if train or val else _empty(fig, "waiting for the first step…")


def lr_figure(lr: Series, *, title: str = "learning rate") -> go.Figure:
    """The learning rate per step, on an axis from 0 (never below: a learning rate is not negative)."""
    fig = go.Figure(layout=dict(LAYOUT, title=title, xaxis_title="step", yaxis_title="lr"))
    if not lr:
        return _empty(fig, "waiting for the first step…")
    x, y = _xy(lr)
    fig.add_trace(go.Scatter(x=x, y=y, mode=_line_mode(x), name="lr", line=dict(color="#2ca02c")))
    top = max(y)
    fig.update_yaxes(exponentformat="e", range=[0, 1.1 * top if top > 0 else 1e-3])
    _single_x(fig, x)
    return fig


def compare_figure(
    curves: Mapping[str, Series],
    *,
    x_label: str = "step",
    smoothing: float = 0.0,
    val_curves: Mapping[str, Series] | None = None,
    title: str = "loss",
) -> go.Figure:
    """One trace per run (smoothed; the raw curve stays as a faint line) plus dashed validation curves."""
    fig = go.Figure(layout=dict(LAYOUT, title=title, xaxis_title=x_label, yaxis_title="loss", height=360))
    palette = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
    for i, (label, series) in enumerate(curves.items()):
        color = palette[i % len(palette)]
        x, y = _xy(series)
        if smoothing > 0:
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=y,
                    mode="lines",
                    name=f"{label} (raw)",
                    showlegend=False,
                    opacity=0.25,
                    line=dict(color=color),
                    hoverinfo="skip",
                )
            )
        fig.add_trace(go.Scatter(x=x, y=ema(y, smoothing), mode="lines", name=label, line=dict(color=color)))
        val = (val_curves or {}).get(label)
        if val:
            vx, vy = _xy(val)
            fig.add_trace(
                go.Scatter(x=vx, y=vy, mode="lines+markers", name=f"{label} val", line=dict(color=color, dash="dash"))
            )
    return fig if curves else _empty(fig, "choose runs to compare")


def reindex(series: Series, axis: Series) -> list[tuple[float, float]]:
    """Re-express a per-step series on another axis (epoch, tokens seen) logged per step.

    Each point takes the axis value of the same step, or of the latest earlier step that has one;
    points before the axis' first step are dropped.
    """
    if not axis:
        return []
    by_step = sorted(axis)
    out, j, current = [], 0, None
    for step, y in sorted(series):
        while j < len(by_step) and by_step[j][0] <= step:
            current = by_step[j][1]
            j += 1
        if current is not None:
            out.append((current, y))
    return out
