"""The Spectra tab's output-importance section (LoRA-drop): where the adapter acts on the data.

‖ΔW‖_F says how much a module's weights changed; LoRA-drop's importance says how much its output changed on
real inputs: the mean over a sample's tokens of ‖ΔW x‖² per module. It comes from `python -m engine importance
RUN_OR_FOLDER --json` in a child process (through ui.backend, cached by the engine per adapter and data
sample), shown as a layers × modules heatmap beside the ‖ΔW‖_F one, each layer's share with the cumulative
share, and the layers that carry a chosen share: put them in lora.layers for a LoRA-drop run (New run button).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import gradio as gr

from engine.core import importance as I
from engine.core.anatomy import layer_kind_grid
from ui.errors import warn
from ui.insight_plots import heatmap_figure, share_figure

IMPORTANCE_TIMEOUT_S = 900.0
EXPLAIN = """\
**Output importance** (LoRA-drop, Zhou et al. 2024): for every adapted module, the mean over the sample's
tokens of ‖ΔW x‖², the squared norm of what the adapter adds to the module's output (x = the module's input on
your data). Unlike ‖ΔW‖_F it depends on the data: a large ΔW that the inputs never excite counts for little,
and "the importance distributions differ across datasets". LoRA-drop keeps the LoRAs of the layers whose shares
add up to a threshold (0.9 in the paper) and drops the rest: **New run with these layers** fills the Train form
with this run's config and `lora.layers` set to the kept layers.
"""


def importance_args(source: Mapping[str, Any], dataset: str, examples: float, keep: float) -> list[str]:
    ref = str(source["run_id"]) if source.get("run_id") is not None else str(source.get("adapter_dir") or "")
    args = ["importance", ref, "--examples", str(int(examples)), "--keep", str(float(keep)), "--json"]
    return args + (["--dataset", dataset.strip()] if (dataset or "").strip() else [])


def importance_view(
    sources: Mapping[str, Any] | None, label: str | None, dataset: str, examples: float, keep: float, *, backend
):
    """Compute importance button → [importance heatmap, share figure, note, kept layers text]."""
    src = (sources or {}).get(label or "")
    if src is None or (src.get("run_id") is None and not src.get("adapter_dir")):
        return gr.skip(), gr.skip(), warn("choose a source (a run or an adapter folder) above"), gr.skip()
    try:
        report = backend.run(importance_args(src, dataset, examples, keep), IMPORTANCE_TIMEOUT_S)
    except ValueError as e:
        return gr.skip(), gr.skip(), warn(f"importance failed: {e}"), gr.skip()
    modules = report["modules"]
    heat = heatmap_figure(
        *layer_kind_grid(modules), title=f"output importance mean ‖ΔW x‖² · {label}", colorscale="Plasma"
    )
    share = share_figure(I.ranked_layers(modules), keep=float(keep), title="share of the importance by layer")
    kept = report["keep"]["layers"]
    note = (
        f"{report['examples']} examples ({report['tokens']:,} tokens) of {report['dataset']}"
        f"{' (cached)' if report.get('cached') else ''} · layers carrying {float(keep):.0%}: "
        f"{', '.join(map(str, kept)) or 'none'} of {len(report['layers'])}"
    )
    return heat, share, note, ",".join(map(str, kept))


def importance_section(w) -> None:
    gr.Markdown("### Where the adapter acts on the data: output importance (LoRA-drop)")
    with gr.Row():
        w.imp_dataset = gr.Textbox(
            "", label="Dataset", placeholder="the run's own (or a file / hub id)", scale=3, elem_id="importance-data"
        )
        w.imp_examples = gr.Number(32, precision=0, minimum=1, label="Examples", scale=1)
        w.imp_keep = gr.Slider(0.5, 1.0, I.DEFAULT_KEEP, step=0.05, label="Keep share", scale=1)
        w.imp_btn = gr.Button("Compute importance", scale=1, elem_id="spectra-importance")
    w.imp_note = gr.Markdown()
    with gr.Row():
        w.imp_plot = gr.Plot(heatmap_figure([], [], [], title="output importance"), elem_id="importance-heatmap")
        w.share_plot = gr.Plot(share_figure([], title="share of the importance by layer"))
    with gr.Row():
        w.imp_layers = gr.Textbox("", label="Kept layers (lora.layers)", interactive=False, scale=3)
        w.imp_run_btn = gr.Button("New run with these layers", scale=1, elem_id="importance-new-run")
    with gr.Accordion("What output importance means", open=False):
        gr.Markdown(EXPLAIN)


def wire_importance(w, backend) -> None:
    w.imp_btn.click(
        partial(importance_view, backend=backend),
        [w.sources, w.heat_source, w.imp_dataset, w.imp_examples, w.imp_keep],
        [w.imp_plot, w.share_plot, w.imp_note, w.imp_layers],
        api_name="spectra_importance",
    )


def source_run(sources: Mapping[str, Any] | None, label: str | None) -> int | None:
    """The run id behind the chosen source, for the New run button (folders have no run config to start from)."""
    src = (sources or {}).get(label or "")
    return None if src is None else src.get("run_id")


def prefill_kept(sources: Mapping[str, Any] | None, label: str | None, layers: str, anatomy, *, store):
    """New run with these layers → the Train form filled from the source's run, lora.layers = the kept layers."""
    from ui.errors import refuse
    from ui.train_form import FORM_FIELDS, prefill_form

    run_id = source_run(sources, label)
    if run_id is None:
        raise refuse("New run with these layers needs a run as the source (a folder has no run config to start from)")
    if not (layers or "").strip():
        raise refuse("Compute importance first: the kept layers are empty")
    out = prefill_form(run_id, anatomy, store=store)
    out[FORM_FIELDS.index("layers")] = layers.strip()
    return out
