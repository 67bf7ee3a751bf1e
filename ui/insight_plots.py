"""Pure plot builders for the Calculator and Spectra tabs: plain data in, plotly figures out.

    fig = memory_figure(est.table_rows(), gpus=(16, 24, 40, 48, 80))   # stacked bar of the memory terms
    fig = accuracy_figure([("#3 r8", 1.2, 1.1), ...])                  # estimated vs measured peaks
    fig = sigma_figure({"#3 · model.layers.0.self_attn.q_proj": [σ1, σ2, ...]}, log=True, mode="sigma")
    fig = heatmap_figure(layers, kinds, grid, title="‖ΔW‖_F")           # layers × module kinds
    fig = steps_figure({50: [...], 100: [...]}, module="…q_proj")      # σ over checkpoints
    fig = similarity_figure(phi_grid, title="φ(A₁, A₂, i, j)")           # subspace similarity in [0, 1]

No gradio, no torch, no database. Traces are named after what they show, so tests can check them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go

GIB = 1024**3
LAYOUT = dict(
    template="plotly_white",
    margin=dict(l=60, r=20, t=50, b=45),
    legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1.0),
)
# One colour per memory term, fixed so that the same term keeps its colour from one estimate to the next.
TERM_COLORS = {
    "base weights: linear layers": "#4c78a8",
    "base weights: embeddings, norms, head": "#9ecae9",
    "LoRA weights": "#f58518",
    "optimizer states": "#ffbf79",
    "activations": "#54a24b",
    "logits + loss": "#e45756",
    "recomputed block": "#88d27a",
    "gradients": "#b279a2",
    "backward workspace": "#d6a5c9",
    "start-up packing check (extra)": "#ff9d98",
    "libraries loaded during the run": "#bab0ac",
    "freed memory malloc keeps (CPU)": "#d8d2ce",
    "CUDA context": "#79706e",
    "torch runtime": "#79706e",
}
SIGMA_MODES = {
    "sigma": "σ<sub>i</sub>",
    "normalised": "σ<sub>i</sub> / σ<sub>1</sub>",
    "energy": "energy in the top i: Σ<sub>k≤i</sub> σ<sub>k</sub>² / Σ σ²",
}


def _empty(fig: go.Figure, text: str) -> go.Figure:
    fig.add_annotation(text=text, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5, font=dict(color="#888"))
    return fig


# ---- calculator --------------------------------------------------------------------------------------


def memory_figure(
    rows: Sequence[tuple[str, int, str]],
    *,
    gpus: Sequence[float] = (16, 24, 40, 48, 80),
    title: str = "memory at the peak",
    device: str = "cuda",
) -> go.Figure:
    """One horizontal bar, one stacked segment per non-zero term (GiB), and a dashed line per GPU size up to
    the first one the total fits in. `rows` are Estimate.table_rows(); a final 'total' row is skipped."""
    terms = [(label, n, note) for label, n, note in rows if label != "total" and n > 0]
    total = sum(n for _, n, _ in terms) / GIB
    fig = go.Figure(
        layout=dict(
            LAYOUT,
            title=f"{title}: {total:.2f} GB (GiB)",
            height=300,
            barmode="stack",
            xaxis=dict(ticksuffix=" GB"),  # the unit on the ticks: no axis title for the legend to cover
            yaxis=dict(visible=False),
            margin=dict(l=20, r=20, t=70, b=40),
            legend=dict(orientation="h", yanchor="top", y=-0.3, xanchor="left", x=0.0),
        )
    )
    if not terms:
        return _empty(fig, "no estimate yet")
    for label, n, note in terms:
        fig.add_trace(
            go.Bar(
                x=[n / GIB],
                y=["memory"],
                orientation="h",
                name=label,
                marker_color=TERM_COLORS.get(label),
                hovertext=[note],
                hovertemplate=f"{label}: %{{x:.3f}} GB<br>%{{hovertext}}<extra></extra>",
            )
        )
    if device == "cuda":
        shown = [g for g in sorted(gpus) if g < total] + [g for g in sorted(gpus) if g >= total][:1]
        for g in shown:
            fig.add_vline(
                x=g,
                line=dict(color="#333" if g >= total else "#bbb", dash="dash", width=1),
                annotation_text=f"{g:g} GB",
                annotation_position="top",
            )
    return fig


def accuracy_figure(points: Sequence[tuple[str, float, float]]) -> go.Figure:
    """Past runs as (label, estimated GB, measured GB) dots against the line measured = estimated."""
    fig = go.Figure(
        layout=dict(
            LAYOUT,
            title="estimated vs measured peak",
            height=320,
            xaxis_title="measured GB",
            yaxis_title="estimated GB",
        )
    )
    if not points:
        return _empty(fig, "no finished run of this model has a measured peak yet")
    hi = max(max(e, m) for _, e, m in points) * 1.1
    fig.add_trace(
        go.Scatter(x=[0, hi], y=[0, hi], mode="lines", name="estimate = measured", line=dict(color="#999", dash="dot"))
    )
    fig.add_trace(
        go.Scatter(
            x=[m for _, _, m in points],
            y=[e for _, e, _ in points],
            mode="markers",
            name="runs",
            text=[label for label, _, _ in points],
            marker=dict(size=9),
            hovertemplate="%{text}: measured %{x:.3f} GB, estimated %{y:.3f} GB<extra></extra>",
        )
    )
    return fig


# ---- spectra -----------------------------------------------------------------------------------------


def sigma_series(sigma: Sequence[float], mode: str = "sigma") -> list[float]:
    """σ as given, divided by σ₁ ('normalised'), or the cumulative energy Σ_{k≤i}σ_k²/Σσ² ('energy')."""
    if mode not in SIGMA_MODES:
        raise ValueError(f"mode = {mode!r}: choose one of {', '.join(SIGMA_MODES)}")
    s = [abs(float(x)) for x in sigma]
    if mode == "sigma":
        return s
    if mode == "normalised":
        top = max(s, default=0.0)
        return [x / top if top else 0.0 for x in s]
    total = sum(x * x for x in s)
    out, acc = [], 0.0
    for x in s:
        acc += x * x
        out.append(acc / total if total else 0.0)
    return out


def sigma_figure(
    curves: Mapping[str, Sequence[float]],
    *,
    log: bool = False,
    mode: str = "sigma",
    title: str = "singular values of ΔW",
) -> go.Figure:
    """One line per module (and source): y = σᵢ (or σᵢ/σ₁, or the cumulative energy) against i = 1..r."""
    fig = go.Figure(
        layout=dict(
            LAYOUT,
            title=title,
            height=380,
            xaxis_title="i",
            yaxis_title=SIGMA_MODES[mode],
            showlegend=len(curves) <= 12,
        )
    )
    for label, sigma in curves.items():
        y = sigma_series(sigma, mode)
        if log and mode != "energy":
            y = [v if v > 0 else None for v in y]  # log axes cannot show 0 (B = 0 gives an all-zero spectrum)
        fig.add_trace(
            go.Scatter(
                x=list(range(1, len(y) + 1)),
                y=y,
                mode="lines+markers",
                name=label,
                marker=dict(size=4),
                hovertemplate=f"{label}<br>i = %{{x}}: %{{y:.4g}}<extra></extra>",
            )
        )
    if log and mode != "energy":
        fig.update_yaxes(type="log", exponentformat="e")
    if mode == "energy":
        fig.update_yaxes(range=[0, 1.02])
    return fig if curves else _empty(fig, "pick a run or an adapter folder, then modules")


def heatmap_figure(
    layers: Sequence[int],
    kinds: Sequence[str],
    grid: Sequence[Sequence[float | None]],
    *,
    title: str,
    colorscale: str = "Viridis",
    zmin: float | None = None,
    zmax: float | None = None,
) -> go.Figure:
    """layers (rows, layer 0 at the bottom) × module kinds (columns); empty cells are modules without LoRA."""
    fig = go.Figure(
        layout=dict(
            LAYOUT, title=title, height=max(260, 60 + 16 * len(layers)), xaxis_title="module", yaxis_title="layer"
        )
    )
    if not layers or not kinds:
        return _empty(fig, "no adapted module in numbered layers")
    fig.add_trace(
        go.Heatmap(
            z=[list(row) for row in grid],
            x=list(kinds),
            y=list(layers),
            colorscale=colorscale,
            zmin=zmin,
            zmax=zmax,
            name=title,
            hoverongaps=False,
            hovertemplate="layer %{y} · %{x}: %{z:.4g}<extra></extra>",
        )
    )
    fig.update_yaxes(dtick=1 if len(layers) <= 40 else None)
    return fig


def steps_figure(
    by_step: Mapping[int, Sequence[float]], *, module: str, log: bool = False, mode: str = "sigma"
) -> go.Figure:
    """One line per saved step for one module, from light (early) to dark (late)."""
    fig = go.Figure(
        layout=dict(
            LAYOUT,
            title=f"{module}: spectrum over checkpoints",
            height=360,
            xaxis_title="i",
            yaxis_title=SIGMA_MODES[mode],
        )
    )
    steps = sorted(by_step)
    for k, step in enumerate(steps):
        shade = 0.25 + 0.75 * (k / (len(steps) - 1) if len(steps) > 1 else 1.0)
        y = sigma_series(by_step[step], mode)
        if log and mode != "energy":
            y = [v if v > 0 else None for v in y]
        fig.add_trace(
            go.Scatter(
                x=list(range(1, len(y) + 1)),
                y=y,
                mode="lines+markers",
                name=f"step {step}",
                line=dict(color=f"rgba(31, 119, 180, {shade:.2f})"),
                marker=dict(size=4),
            )
        )
    if log and mode != "energy":
        fig.update_yaxes(type="log", exponentformat="e")
    return fig if steps else _empty(fig, "this run has no stored spectra for this module")


def similarity_figure(
    grid: Sequence[Sequence[float]], *, title: str, x_label: str = "j (second)", y_label: str = "i (first)"
) -> go.Figure:
    """φ(i, j) for i = 1..i_max (rows) and j = 1..j_max (columns), on a fixed 0–1 colour scale."""
    fig = go.Figure(layout=dict(LAYOUT, title=title, height=420, xaxis_title=x_label, yaxis_title=y_label))
    if not grid:
        return _empty(fig, "choose two sources and a module, then Compute φ")
    fig.add_trace(
        go.Heatmap(
            z=[list(r) for r in grid],
            x=list(range(1, len(grid[0]) + 1)),
            y=list(range(1, len(grid) + 1)),
            zmin=0.0,
            zmax=1.0,
            colorscale="Blues",
            name="φ",
            hovertemplate="i = %{y}, j = %{x}: φ = %{z:.3f}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed", dtick=1 if len(grid) <= 32 else None)  # the paper's layout: i = 1 on top
    fig.update_xaxes(dtick=1 if len(grid[0]) <= 32 else None)
    return fig


def share_figure(ranked: Sequence[tuple[int, float, float]], *, keep: float | None = None, title: str) -> go.Figure:
    """LoRA-drop's view: each layer's share of the output importance (bars, most important first) and the
    cumulative share (line), with the keep threshold as a dashed line."""
    fig = go.Figure(
        layout=dict(LAYOUT, title=title, height=300, xaxis_title="layer (most important first)", yaxis_title="share")
    )
    if not ranked:
        return _empty(fig, "no importance measured yet")
    x = [f"L{layer}" for layer, _, _ in ranked]
    fig.add_trace(go.Bar(x=x, y=[s for _, s, _ in ranked], name="share", marker_color="#4c78a8"))
    fig.add_trace(go.Scatter(x=x, y=[c for _, _, c in ranked], name="cumulative share", mode="lines+markers"))
    if keep is not None:
        fig.add_hline(y=keep, line_dash="dash", line_color="#e45756", annotation_text=f"keep {keep:.0%}")
    fig.update_yaxes(range=[0, 1.05])
    return fig


def budget_figure(series: Mapping[str, Sequence[tuple[int, float]]], *, title: str) -> go.Figure:
    """AdaLoRA's rank budget over the run: one line per series (the scheduler's budget, the ranks kept)."""
    fig = go.Figure(layout=dict(LAYOUT, title=title, height=300, xaxis_title="step", yaxis_title="singular values"))
    if not any(series.values()):
        return _empty(fig, "no budget recorded")
    for name, points in series.items():
        fig.add_trace(go.Scatter(x=[s for s, _ in points], y=[v for _, v in points], name=name, mode="lines"))
    return fig
