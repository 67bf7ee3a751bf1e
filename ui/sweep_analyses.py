"""The LoRA paper's analyses across a sweep's members (Hu et al. §7.2–7.3), under the Sweeps tab: φ(i, j)
between two members' adapters averaged over every module of a kind (`engine phi A B --kind K --json`) and
the amplification factor per module kind of one member (`engine amplification ID --json`, which loads the
base weights in its own process and caches the result). Both run through ui.backend.
"""

from __future__ import annotations

from functools import partial

import gradio as gr
import pandas as pd

from engine.core import sweep_report as SR
from engine.core.runs import saved_adapter
from ui.errors import warn
from ui.insight_plots import similarity_figure

ANALYSIS_TIMEOUT_S = 600.0
AMP_COLUMNS = ["kind", "modules", "r", "‖ΔW‖_F", "‖UᵀWV‖_F", "‖W top-r‖", "random", "factor", "random factor"]


def member_choices(sweep_id: int | None, *, store) -> list[tuple[str, int]]:
    """The sweep's members that have a saved adapter."""
    if sweep_id is None:
        return []
    try:
        runs = SR.members_of(store, int(sweep_id))
        varied = SR.varied_of(store.get_sweep(int(sweep_id)))
    except KeyError:
        return []
    rows = [SR.member_row(r, varied) for r in runs if saved_adapter(r) is not None]
    return [(f"#{m['id']} {m['label']}", m["id"]) for m in rows]


def refresh_members(sweep_id, a, b, *, store):
    choices = member_choices(sweep_id, store=store)
    ids = [i for _, i in choices]
    a = a if a in ids else (ids[0] if ids else None)
    b = b if b in ids else (ids[-1] if ids else None)
    return gr.update(choices=choices, value=a), gr.update(choices=choices, value=b)


def phi_view(a, b, kind: str, i_max: int, j_max: int, *, backend):
    """Compute φ → [heatmap, note]."""
    if a is None or b is None or not (kind or "").strip():
        return gr.skip(), warn("pick two members and a module kind (e.g. q_proj)")
    args = ["phi", str(a), str(b), "--kind", kind.strip(), "--i-max", str(int(i_max)), "--j-max", str(int(j_max))]
    try:
        out = backend.run([*args, "--json"], ANALYSIS_TIMEOUT_S)
    except ValueError as e:
        return gr.skip(), warn(f"φ failed: {e}")
    grid = out["mean"]
    fig = similarity_figure(grid, title=f"mean φ(i, j) over {len(out['modules'])} {kind} modules: #{a} vs #{b}")
    return fig, f"φ(1, 1) = {grid[0][0]:.3f} (mean over {len(out['modules'])} modules; 1 = shared, 0 = orthogonal)"


def amplification_view(a, *, backend):
    """Amplification of the first member → [table, note]."""
    if a is None:
        return gr.skip(), warn("pick a member first")
    try:
        out = backend.run(["amplification", str(a), "--json"], ANALYSIS_TIMEOUT_S)
    except ValueError as e:
        return gr.skip(), warn(f"amplification failed: {e}")
    rnd = lambda x, n=4: None if x is None else round(float(x), n)
    rows = [
        [kind, k["modules"], k["r"], rnd(k["delta_fro"]), rnd(k["proj_fro"]), rnd(k["w_top_proj_fro"])]
        + [rnd(k["random_proj_fro"]), rnd(k["factor"], 2), rnd(k["random_factor"], 2)]
        for kind, k in out["kinds"].items()
    ]
    note = (
        f"run #{a} on {out['model']}"
        + (" (cached)" if out.get("cached") else "")
        + "".join(f"; {n}" for n in out.get("notes") or [])
    )
    return pd.DataFrame(rows, columns=AMP_COLUMNS), note


def build_sweep_analyses(pick, store, backend) -> None:
    gr.Markdown("### The LoRA paper's analyses across members (§7.2 φ, §7.3 amplification)")
    with gr.Row():
        a = gr.Dropdown([], label="First member (i)", elem_id="sweep-phi-a")
        b = gr.Dropdown([], label="Second member (j)", elem_id="sweep-phi-b")
        kind = gr.Textbox("q_proj", label="Module kind")
        i_max = gr.Number(8, label="i max", precision=0)
        j_max = gr.Number(8, label="j max", precision=0)
    with gr.Row():
        phi_btn = gr.Button("Compute φ", size="sm")
        amp_btn = gr.Button("Amplification of the first member", size="sm")
    note = gr.Markdown()
    with gr.Row():
        phi_plot = gr.Plot(similarity_figure([], title="φ"))
        amp_table = gr.Dataframe(pd.DataFrame(columns=AMP_COLUMNS), interactive=False, label="Amplification per kind")
    hidden = {"api_name": False}
    pick.change(partial(refresh_members, store=store), [pick, a, b], [a, b], **hidden)
    phi_btn.click(partial(phi_view, backend=backend), [a, b, kind, i_max, j_max], [phi_plot, note], **hidden)
    amp_btn.click(partial(amplification_view, backend=backend), [a], [amp_table, note], **hidden)
