"""Spectra tab: the singular values of every ΔW = s·B·A a run or an adapter folder learned.

Sources: runs from the store (the spectra the trainer saved at each checkpoint and at the end) and any
PEFT LoRA adapter folder (through `python -m engine spectra DIR --json` in a child process, cached).
Views: per-module σ curves (linear/log, σ/σ₁ or cumulative energy; modules chosen by kind and layer),
layers × module-kind heatmaps of ‖ΔW‖_F and of effective rank, one module's spectrum over the run's
checkpoints, and the LoRA paper's subspace similarity φ between two sources for one module.

φ needs the factors A and B themselves, not just σ: it comes from `python -m engine spectra --similarity A B
--module M --json` through the backend, like every other engine call; the server imports no torch.
Handlers are plain module-level functions; store and backend are bound with functools.partial.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr

from engine.core.anatomy import column_labels, kind_rank, layer_kind_grid
from engine.core.config import parse_layers
from engine.core.runs import saved_adapter
from engine.core.spectrum import record_stats, summarize
from ui.errors import warn
from ui.importance_panel import importance_section, wire_importance
from ui.insight_plots import heatmap_figure, sigma_figure, similarity_figure, steps_figure
from ui.rank_panel import rank_section, wire_ranks

MAX_CURVES = 48
SPECTRA_TIMEOUT_S = 180.0
# How φ compares two sources (label → which factor, which side), after Hu et al. (LoRA, §7.2, App. G).
PHI_MODES = {
    "A: input space (the LoRA paper's choice)": ("A", "right"),
    "ΔW = B·A: input space": ("BA", "right"),
    "ΔW = B·A: output space": ("BA", "left"),
    "B: output space": ("B", "left"),
}
EXPLAIN = """\
**Reading these plots.** σ₁ ≥ σ₂ ≥ … are the singular values of ΔW = s·B·A (s = α/r, or α/√r with
rsLoRA); ΔW has at most r of them, computed without forming ΔW (QR of B and Aᵀ, then an r × r SVD).
**‖ΔW‖_F** = √Σσ² is how much a module changed: the layers × modules heatmap shows where the adapter
acts.
**Effective rank** = exp(entropy of σ/Σσ) (Roy & Vetterli): 1 when one direction carries everything, r when
all are equal; **stable rank** = Σσ²/σ₁². **Energy in top k** = (σ₁² + … + σₖ²)/Σσ²: the share of ‖ΔW‖²_F the
best rank-k approximation keeps (the "cumulative energy" view). A spectrum that falls off after a few σ says
a smaller r would have done; a flat one says r was a bottleneck.
**φ(i, j)** = ‖U₁ᵢᵀU₂ⱼ‖²_F / min(i, j) (Hu et al., LoRA §7.2) compares the top-i singular directions of
one adapter with the top-j of another: 1 = the smaller subspace lies inside the larger, 0 = orthogonal.
The paper finds the top direction of r = 8 and r = 64 adapters shared (φ > 0.5) and the rest mostly not.
"""
DORA_NOTE = """\
**DoRA** splits each weight into a magnitude m (one number per output row) and a direction V/‖V‖, and applies LoRA
to the direction: W' = m · (W + s·B·A) / ‖W + s·B·A‖. The σ shown here are those of the **directional low-rank
part s·B·A**; the learned magnitudes are a separate change, shown below as the mean |m − m₀| / m₀ per module
(m₀ = ‖W‖ per row, what DoRA starts from). Adapter folders carry m but not W, so their magnitude change is not
computed.
"""


# ---- sources --------------------------------------------------------------------------------------


def layer_set(text: str | None) -> set[int] | None:
    """The layer filter: '0-3,8' → {0, 1, 2, 3, 8}; empty → None (all layers). ValueError on anything else
    (the config's own rule, engine.core.config.parse_layers)."""
    layers = parse_layers((text or "").strip())
    return set(layers) if layers else None


def run_label(r) -> str:
    lo = r.config.get("lora", {})
    return f"#{r.id} {r.name} (r{lo.get('r')}{', DoRA' if lo.get('use_dora') else ''})"


def run_choices(store, limit: int = 200) -> list[tuple[str, int]]:
    """Runs that have stored spectra, newest first."""
    return [(run_label(r), r.id) for r in store.list_runs(limit=limit) if store.spectra_steps(r.id)]


def run_source(store, run_id: int) -> dict[str, Any]:
    """The latest stored spectra of a run, with where its adapter lives (for φ)."""
    r = store.get_run(int(run_id))
    steps = store.spectra_steps(r.id)
    if not steps:
        raise ValueError(f"run #{r.id} has no stored spectra yet (they are saved at checkpoints and at the end)")
    records = store.get_spectra(r.id, steps[-1])
    adapter = saved_adapter(r)
    return {
        "label": run_label(r),
        "run_id": r.id,
        "step": steps[-1],
        "steps": steps,
        "adapter_dir": str(adapter) if adapter else None,
        "modules": {name: record_stats(rec) for name, rec in records.items()},
    }


_FOLDER_CACHE: dict[tuple, dict[str, Any]] = {}


def _folder_key(folder: Path) -> tuple:
    files = sorted(folder.glob("adapter_*"))
    return (str(folder.resolve()), *((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files))


def folder_source(folder: str, *, backend) -> dict[str, Any]:
    """Any PEFT LoRA folder → spectra through `python -m engine spectra DIR --json` (cached per file version)."""
    path = Path((folder or "").strip()).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise ValueError(f"{str(path)!r} is not a PEFT adapter folder (no adapter_config.json)")
    key = _folder_key(path)
    if key not in _FOLDER_CACHE:
        data = backend.run(["spectra", str(path.resolve()), "--json"], SPECTRA_TIMEOUT_S)
        _FOLDER_CACHE[key] = {
            "label": f"folder {path.name} ({path.parent.name})",
            "run_id": None,
            "step": None,
            "steps": [],
            "adapter_dir": str(path.resolve()),
            "modules": data["modules"],
        }
    return _FOLDER_CACHE[key]


def summary_markdown(sources: Mapping[str, Mapping[str, Any]]) -> str:
    if not sources:
        return "Pick runs, or give an adapter folder and press **Add folder**."
    lines = []
    for label, src in sources.items():
        sm = summarize(src["modules"])
        if not sm:
            continue
        where = f"step {src['step']}" if src.get("step") is not None else "saved adapter"
        lines.append(
            f"- **{label}** · {where} · {sm['modules']} modules · r {', '.join(map(str, sm['r']))} · "
            f"‖ΔW‖_F over all modules {sm['fro_norm_total']:.4g} · mean effective rank "
            f"{sm['effective_rank_mean']:.2f} · largest σ₁ {sm['spectral_norm_max']:.4g}"
        )
        lines.extend(f"  - {note}" for note in sm["notes"])
    if any(uses_dora(s) for s in sources.values()):
        lines.append("\n" + DORA_NOTE)
    return "\n".join(lines)


def uses_dora(source: Mapping[str, Any]) -> bool:
    return any("DoRA" in (m.get("note") or "") for m in source["modules"].values())


def kind_choices(sources: Mapping[str, Mapping[str, Any]]) -> list[str]:
    kinds = {label for source in sources.values() for label in column_labels(list(source["modules"])).values()}
    return sorted(kinds, key=lambda k: (kind_rank(k), k))


def module_choices(sources: Mapping[str, Mapping[str, Any]], only: Sequence[str] | None = None) -> list[str]:
    names: dict[str, None] = {}
    for label, source in sources.items():
        if only is None or label in only:
            names.update(dict.fromkeys(source["modules"]))
    return list(names)


def load_runs(run_ids: Sequence[int] | None, sources: Mapping[str, Any] | None, *, store):
    """Run picker → the sources: the chosen runs (fresh from the store) plus folders already added."""
    kept = {k: v for k, v in (sources or {}).items() if v.get("run_id") is None}
    chosen = {}
    for run_id in run_ids or []:
        try:
            src = run_source(store, run_id)
        except (KeyError, ValueError) as e:
            warn(str(e))
            continue
        chosen[src["label"]] = src
    return refreshed({**chosen, **kept})


def add_folder(folder: str, sources: Mapping[str, Any] | None, *, backend):
    """Add folder button → the sources with this adapter folder added."""
    try:
        src = folder_source(folder, backend=backend)
    except ValueError as e:  # a message, not an exception: the sources and plots stay as they are
        warn(str(e))
        return tuple(gr.skip() for _ in refreshed({}))
    return refreshed({**(sources or {}), src["label"]: src})


def clear_folders(sources: Mapping[str, Any] | None):
    return refreshed({k: v for k, v in (sources or {}).items() if v.get("run_id") is not None})


def refreshed(sources: dict[str, Any]):
    """→ [sources, summary, kinds, heatmap source, checkpoint run, module, φ A, φ B, φ module]."""
    labels = list(sources)
    runs = [k for k, v in sources.items() if v.get("run_id") is not None]
    adapters = [k for k, v in sources.items() if v.get("adapter_dir")]
    modules = module_choices(sources)
    first = modules[0] if modules else None
    pick = lambda options, i=0: options[min(i, len(options) - 1)] if options else None
    return (
        sources,
        summary_markdown(sources),
        gr.update(choices=kind_choices(sources), value=kind_choices(sources)),
        gr.update(choices=labels, value=pick(labels)),
        gr.update(choices=runs, value=pick(runs)),
        gr.update(choices=modules, value=first),
        gr.update(choices=adapters, value=pick(adapters)),
        gr.update(choices=adapters, value=pick(adapters, 1)),
        gr.update(choices=modules, value=first),
    )


def grid_of(modules: Mapping[str, Mapping[str, Any]], value: str):
    """(layers, kinds, grid) of one statistic, in engine.core.anatomy's layers × kinds layout."""
    return layer_kind_grid({n: m.get(value) for n, m in modules.items()})


# ---- views ------------------------------------------------------------------------------------------


def sigma_view(
    sources: Mapping[str, Any] | None, kinds: Sequence[str] | None, layers_text: str, log: bool, mode: str
) -> tuple[Any, str]:
    """→ [σ figure, note]: one curve per chosen module (and source), at most MAX_CURVES."""
    sources = sources or {}
    try:
        layers = layer_set(layers_text)
    except ValueError as e:
        return sigma_figure({}), f"⚠ layers {layers_text!r}: {e}"
    curves: dict[str, list[float]] = {}
    total = 0
    for label, src in sources.items():
        prefix = f"{label.split(' ')[0]} · " if len(sources) > 1 else ""
        columns = column_labels(list(src["modules"]))
        for name, m in src["modules"].items():
            if kinds is not None and columns[name] not in kinds:
                continue
            if layers is not None and m.get("layer") not in layers:
                continue
            total += 1
            if len(curves) < MAX_CURVES:
                curves[prefix + name] = m["sigma"]
    note = f"{total} module(s)" + (
        f"; showing the first {MAX_CURVES} (narrow by kind or layer)" if total > MAX_CURVES else ""
    )
    return sigma_figure(curves, log=bool(log), mode=mode), note


def heatmap_view(sources: Mapping[str, Any] | None, label: str | None):
    """→ [‖ΔW‖_F heatmap, effective-rank heatmap, DoRA magnitude heatmap (visible only with DoRA)]."""
    src = (sources or {}).get(label or "")
    if src is None:
        empty = heatmap_figure([], [], [], title="‖ΔW‖_F")
        return empty, heatmap_figure([], [], [], title="effective rank"), gr.update(visible=False)
    mods = src["modules"]
    fro = heatmap_figure(*grid_of(mods, "fro_norm"), title=f"‖ΔW‖_F · {label}", colorscale="Viridis")
    r_max = max((m.get("r") or 0 for m in mods.values()), default=0)
    eff = heatmap_figure(
        *grid_of(mods, "effective_rank"),
        title=f"effective rank (of r ≤ {r_max}) · {label}",
        colorscale="Cividis",
        zmin=0,
        zmax=r_max or None,
    )
    has_magnitude = any(m.get("magnitude_change") is not None for m in mods.values())
    if not has_magnitude:
        return fro, eff, gr.update(visible=False)
    mag = heatmap_figure(
        *grid_of(mods, "magnitude_change"), title=f"DoRA: mean |m − m₀| / m₀ · {label}", colorscale="Magma"
    )
    return fro, eff, gr.update(value=mag, visible=True)


def checkpoint_view(
    sources: Mapping[str, Any] | None, label: str | None, module: str | None, log: bool, mode: str, *, store
):
    """One module's spectrum at every step the run saved (checkpoints and the end)."""
    src = (sources or {}).get(label or "")
    if src is None or src.get("run_id") is None or not module:
        return steps_figure({}, module=module or "module")
    by_step = {}
    for step in store.spectra_steps(src["run_id"]):
        rec = store.get_spectra(src["run_id"], step).get(module)
        if rec is not None:
            by_step[step] = list(rec.values)
    return steps_figure(by_step, module=module, log=bool(log), mode=mode)


# ---- subspace similarity φ (`engine spectra --similarity`: it needs A and B, hence torch) ---------------

_PHI_CACHE: dict[str, dict[str, Any]] = {}


def phi_grid(
    a_dir: str, b_dir: str, module: str, use: str, side: str, i_max: int, j_max: int, *, backend
) -> dict[str, Any]:
    """{'grid': φ[i][j], 'r1', 'r2'} from `python -m engine spectra --similarity`; cached per adapter file version."""
    args = [
        "spectra",
        "--similarity",
        str(a_dir),
        str(b_dir),
        "--module",
        module,
        "--use",
        use,
        "--side",
        side,
        "--i-max",
        str(int(i_max)),
        "--j-max",
        str(int(j_max)),
        "--json",
    ]
    key = json.dumps([args, _folder_key(Path(a_dir)), _folder_key(Path(b_dir))])
    if key not in _PHI_CACHE:
        _PHI_CACHE[key] = backend.run(args, SPECTRA_TIMEOUT_S)
    return _PHI_CACHE[key]


def phi_view(
    sources: Mapping[str, Any] | None,
    a_label: str | None,
    b_label: str | None,
    module: str | None,
    mode: str,
    i_max: float,
    j_max: float,
    *,
    backend,
):
    """Compute φ button → [φ heatmap, note]."""
    sources = sources or {}
    a, b = sources.get(a_label or ""), sources.get(b_label or "")
    if not (a and b and module):
        return gr.skip(), warn("choose two sources that have an adapter folder, and a module")
    if not (a.get("adapter_dir") and b.get("adapter_dir")):
        return gr.skip(), warn("φ needs the adapters' factors: both sources must have an adapter folder")
    use, side = PHI_MODES[mode]
    try:
        out = phi_grid(a["adapter_dir"], b["adapter_dir"], module, use, side, int(i_max), int(j_max), backend=backend)
    except ValueError as e:
        return gr.skip(), warn(f"φ failed: {e}")
    grid = out["grid"]
    diag = [grid[k][k] for k in range(min(len(grid), len(grid[0]) if grid else 0))]
    note = (
        f"{module}: {a_label} (r = {out['r1']}) vs {b_label} (r = {out['r2']}), {mode}. "
        f"φ(1, 1) = {grid[0][0]:.3f}"
        + (f"; mean of the diagonal {sum(diag) / len(diag):.3f}" if diag else "")
        + (". Same adapter: the diagonal is 1 by construction." if a["adapter_dir"] == b["adapter_dir"] else "")
    )
    fig = similarity_figure(
        grid,
        title=f"φ({a_label.split(' ')[0]}, {b_label.split(' ')[0]}, i, j) · "
        f"{module.split('.', 1)[-1] if module.count('.') > 3 else module}",
        y_label=f"i: top directions of {a_label.split(' ')[0]}",
        x_label=f"j: top directions of {b_label.split(' ')[0]}",
    )
    return fig, note


# ---- layout ------------------------------------------------------------------------------------------


@dataclass
class SpectraTab:
    sources: Any
    run_pick: Any
    sigma_plot: Any
    refresh: Any = None  # (fn, inputs, outputs): the run picker's choices, on page load and when runs change
    new_run: Any = None  # (button, [sources, source, kept layers]): LoRA-drop's New run (wired by ui/__init__)


def refresh_runs(*, store):
    """The run picker's choices now (its ticks stay)."""
    return gr.update(choices=run_choices(store))


def build_spectra_tab(store, runner, home: Path, backend) -> SpectraTab:
    w = SimpleNamespace(sources=gr.State({}))
    sources_section(w, store)
    gr.Markdown("### Singular values per module")
    with gr.Row():
        w.kinds = gr.CheckboxGroup([], label="Module kinds", scale=3)
        w.layers = gr.Textbox("", label="Layers", placeholder="all (or 0-3,8)", scale=1)
    with gr.Row():
        w.log = gr.Checkbox(False, label="log y")
        w.mode = gr.Radio(
            [("σ", "sigma"), ("σ / σ₁", "normalised"), ("cumulative energy", "energy")], value="sigma", label="y"
        )
    w.sigma_note = gr.Markdown()
    w.sigma_plot = gr.Plot(sigma_figure({}), elem_id="spectra-sigma")
    gr.Markdown("### Where the adapter acts: layers × modules")
    w.heat_source = gr.Dropdown([], label="Source")
    with gr.Row():
        w.fro_plot = gr.Plot(heatmap_figure([], [], [], title="‖ΔW‖_F"))
        w.eff_plot = gr.Plot(heatmap_figure([], [], [], title="effective rank"))
    w.mag_plot = gr.Plot(visible=False, label="DoRA magnitude change")
    rank_section(w)
    importance_section(w)
    gr.Markdown("### One module over the run's checkpoints")
    with gr.Row():
        w.ckpt_run = gr.Dropdown([], label="Run")
        w.ckpt_module = gr.Dropdown([], label="Module")
    w.ckpt_plot = gr.Plot(steps_figure({}, module="module"))
    phi_section(w)
    wire_spectra(w, store, backend)
    wire_importance(w, backend)
    wire_ranks(w, store)
    refresh = (partial(refresh_runs, store=store), None, [w.run_pick])
    new_run = (w.imp_run_btn, [w.sources, w.heat_source, w.imp_layers])
    return SpectraTab(w.sources, w.run_pick, w.sigma_plot, refresh=refresh, new_run=new_run)


def sources_section(w, store) -> None:
    with gr.Row():
        w.run_pick = gr.Dropdown(
            run_choices(store),
            multiselect=True,
            label="Runs",
            scale=3,
            elem_id="spectra-runs",
            info="Runs with stored spectra (saved at every checkpoint and at the end)",
        )
        w.refresh_btn = gr.Button("↻", size="sm", scale=0, min_width=40)
    with gr.Row():
        w.folder = gr.Textbox(
            label="…or any PEFT LoRA adapter folder",
            scale=4,
            elem_id="spectra-folder",
            placeholder="/path/to/adapter (adapter_config.json + adapter_model.safetensors)",
        )
        w.add_btn = gr.Button("Add folder", scale=1, elem_id="spectra-add")
        w.clear_btn = gr.Button("Remove folders", scale=1, size="sm")
    w.summary = gr.Markdown(summary_markdown({}), elem_id="spectra-summary")
    with gr.Accordion("What the numbers mean", open=False):
        gr.Markdown(EXPLAIN)


def phi_section(w) -> None:
    gr.Markdown("### Subspace similarity φ between two adapters (or two ranks)")
    with gr.Row():
        w.phi_a = gr.Dropdown([], label="First (i)")
        w.phi_b = gr.Dropdown([], label="Second (j)")
        w.phi_module = gr.Dropdown([], label="Module")
    with gr.Row():
        w.phi_mode = gr.Radio(list(PHI_MODES), value=next(iter(PHI_MODES)), label="Directions compared")
        w.i_max = gr.Slider(1, 64, 8, step=1, label="i max")
        w.j_max = gr.Slider(1, 64, 8, step=1, label="j max")
        w.phi_btn = gr.Button("Compute φ", elem_id="spectra-phi")
    w.phi_note = gr.Markdown()
    w.phi_plot = gr.Plot(similarity_figure([], title="φ"))


def wire_spectra(w, store, backend) -> None:
    loaded = [w.sources, w.summary, w.kinds, w.heat_source, w.ckpt_run, w.ckpt_module, w.phi_a, w.phi_b, w.phi_module]
    w.refresh_btn.click(partial(refresh_runs, store=store), None, [w.run_pick], api_name=False)
    w.run_pick.change(partial(load_runs, store=store), [w.run_pick, w.sources], loaded, api_name="spectra_runs")
    w.add_btn.click(partial(add_folder, backend=backend), [w.folder, w.sources], loaded, api_name="spectra_folder")
    w.clear_btn.click(clear_folders, [w.sources], loaded, api_name=False)
    hidden = {"api_name": False, "show_progress": "hidden"}
    gr.on(
        [w.sources.change, w.kinds.change, w.layers.submit, w.log.change, w.mode.change],
        sigma_view,
        [w.sources, w.kinds, w.layers, w.log, w.mode],
        [w.sigma_plot, w.sigma_note],
        **hidden,
    )
    gr.on(
        [w.sources.change, w.heat_source.change],
        heatmap_view,
        [w.sources, w.heat_source],
        [w.fro_plot, w.eff_plot, w.mag_plot],
        **hidden,
    )
    gr.on(
        [w.ckpt_run.change, w.ckpt_module.change, w.log.change, w.mode.change],
        partial(checkpoint_view, store=store),
        [w.sources, w.ckpt_run, w.ckpt_module, w.log, w.mode],
        [w.ckpt_plot],
        **hidden,
    )
    w.phi_btn.click(
        partial(phi_view, backend=backend),
        [w.sources, w.phi_a, w.phi_b, w.phi_module, w.phi_mode, w.i_max, w.j_max],
        [w.phi_plot, w.phi_note],
        api_name="spectra_phi",
    )
