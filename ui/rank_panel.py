"""The Spectra tab's AdaLoRA section: the rank each module ended with (layers × modules) and the budget over steps.

AdaLoRA's pruned singular values are exactly 0 in its stored spectra, so a module's final rank is the count of
its non-zero σ; the budget comes from the run's metrics `adalora/budget` (the scheduler's) and
`adalora/rank_total` (the ranks kept), logged by engine.ml.adalora.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import gradio as gr

from engine.core.anatomy import layer_kind_grid
from ui.insight_plots import budget_figure, heatmap_figure

SERIES = {"budget (scheduler)": "adalora/budget", "ranks kept": "adalora/rank_total"}


def is_adalora(source: Mapping[str, Any]) -> bool:
    return any((m.get("note") or "").startswith("AdaLoRA") for m in source["modules"].values())


def final_ranks(source: Mapping[str, Any]) -> dict[str, int]:
    return {n: sum(1 for s in m["sigma"] if s > 0) for n, m in source["modules"].items()}


def rank_view(sources: Mapping[str, Any] | None, label: str | None, *, store):
    """→ [final-rank heatmap, budget plot], visible only for an AdaLoRA source."""
    src = (sources or {}).get(label or "")
    if src is None or not is_adalora(src):
        return gr.update(visible=False), gr.update(visible=False)
    ranks = final_ranks(src)
    heat = heatmap_figure(
        *layer_kind_grid(ranks), title=f"AdaLoRA final rank (total {sum(ranks.values())}) · {label}", colorscale="Blues"
    )
    if src.get("run_id") is None:
        return gr.update(value=heat, visible=True), gr.update(visible=False)
    series = {name: store.metric_series(src["run_id"], metric) for name, metric in SERIES.items()}
    budget = budget_figure(series, title="AdaLoRA rank budget over steps")
    return gr.update(value=heat, visible=True), gr.update(value=budget, visible=True)


def rank_section(w) -> None:
    with gr.Row():
        w.rank_plot = gr.Plot(visible=False, label="AdaLoRA final ranks", elem_id="adalora-ranks")
        w.budget_plot = gr.Plot(visible=False, label="AdaLoRA budget")


def wire_ranks(w, store) -> None:
    gr.on(
        [w.sources.change, w.heat_source.change],
        partial(rank_view, store=store),
        [w.sources, w.heat_source],
        [w.rank_plot, w.budget_plot],
        api_name=False,
        show_progress="hidden",
    )
