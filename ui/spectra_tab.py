"""Spectra tab: the singular values of every ΔW = s·B·A a run or an adapter folder learned.

Sources: runs from the store (the spectra the trainer saved at each checkpoint and at the end) and any
PEFT LoRA adapter folder (through `python -m engine spectra DIR --json` in a child process, cached).
Views: per-module σ curves (linear/log, σ/σ₁ or cumulative energy; modules chosen by kind and layer),
layers × module-kind heatmaps of ‖ΔW‖_F and of effective rank, one module's spectrum over the run's
checkpoints, and the LoRA paper's subspace similarity φ between two sources for one module.

φ needs the factors A and B themselves, not just σ: it is computed by a short child process
(`python -c PHI_CODE`, its request as JSON on stdin) that uses engine.spectra; the server imports no
torch. Handlers are plain module-level functions; store and backend are bound with functools.partial.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import gradio as gr

from ui.backend import cli_env, cli_error
from ui.insight_plots import heatmap_figure, sigma_figure, similarity_figure, steps_figure

ROOT = Path(__file__).resolve().parent.parent
MAX_CURVES = 48
SPECTRA_TIMEOUT_S = 180.0
PHI_TIMEOUT_S = 180.0
# How φ compares two sources (label → which factor, which side), after Hu et al. (LoRA, §7.2, App. G).
PHI_MODES = {
    "A: input space (the LoRA paper's choice)": ("A", "right"),
    "ΔW = B·A: input space": ("BA", "right"),
    "ΔW = B·A: output space": ("BA", "left"),
    "B: output space": ("B", "left"),
}
# Heatmap column order: the same as engine.spectra._KIND_ORDER (copied: engine.spectra imports torch).
KIND_ORDER = ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "Wqkv", "c_attn", "o_proj",
              "out_proj", "dense", "attn.c_proj", "gate_proj", "up_proj", "gate_up_proj", "w1", "w3", "fc1",
              "c_fc", "dense_h_to_4h", "down_proj", "w2", "fc2", "mlp.c_proj", "dense_4h_to_h")
EXPLAIN = """\
**Reading these plots.** σ₁ ≥ σ₂ ≥ … are the singular values of ΔW = s·B·A (s = α/r, or α/√r with
rsLoRA); ΔW has at most r of them, computed without forming ΔW (QR of B and Aᵀ, then an r × r SVD).
**‖ΔW‖_F** = √Σσ² is how much a module changed: the layers × modules heatmap shows where the adapter
acts.
**Effective rank** = exp(entropy of σ/Σσ) (Roy & Vetterli): 1 when one direction carries everything, r when
all are equal; **stable rank** = Σσ²/σ₁². **Energy in top k** = Σ_{i≤k}σᵢ²/Σσ²: the share of ‖ΔW‖²_F the
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


def parse_layers(text: str | None) -> set[int] | None:
    """'0-3,8' → {0, 1, 2, 3, 8}; empty → None (all layers). ValueError on anything else."""
    text = (text or "").strip()
    if not text:
        return None
    out: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ValueError(f"layers {text!r}: write indices and ranges like 0-3,8")
        lo, hi = int(m[1]), int(m[2] or m[1])
        out.update(range(min(lo, hi), max(lo, hi) + 1))
    return out


def run_label(r) -> str:
    lo = r.config.get("lora", {})
    return f"#{r.id} {r.name} (r{lo.get('r')}{', DoRA' if lo.get('use_dora') else ''})"


def run_choices(store, limit: int = 200) -> list[tuple[str, int]]:
    """Runs that have stored spectra, newest first."""
    return [(run_label(r), r.id) for r in store.list_runs(limit=limit) if store.spectra_steps(r.id)]


def module_stats(record) -> dict[str, Any]:
    """A SpectrumRecord → the engine's to_stats() dict, with sigma from the stored values."""
    stats = dict(record.extra or {})
    stats["sigma"] = list(record.values)
    name = record.module
    stats.setdefault("layer", next((int(p) for p in name.split(".") if p.isdigit()), None))
    stats.setdefault("kind", name.split(".")[-1])
    return stats


def run_source(store, run_id: int) -> dict[str, Any]:
    """The latest stored spectra of a run, with where its adapter lives (for φ)."""
    r = store.get_run(int(run_id))
    steps = store.spectra_steps(r.id)
    if not steps:
        raise ValueError(f"run #{r.id} has no stored spectra yet (they are saved at checkpoints and at the end)")
    records = store.get_spectra(r.id, steps[-1])
    adapter = r.adapter_dir or (str(Path(r.out_dir) / "adapter") if r.out_dir else None)
    return {"label": run_label(r), "run_id": r.id, "step": steps[-1], "steps": steps,
            "adapter_dir": adapter if adapter and (Path(adapter) / "adapter_config.json").is_file() else None,
            "modules": {name: module_stats(rec) for name, rec in records.items()}}


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
        _FOLDER_CACHE[key] = {"label": f"folder {path.name} ({path.parent.name})", "run_id": None, "step": None,
                              "steps": [], "adapter_dir": str(path.resolve()), "modules": data["modules"]}
    return _FOLDER_CACHE[key]


def summary_markdown(sources: Mapping[str, Mapping[str, Any]]) -> str:
    if not sources:
        return "Pick runs, or give an adapter folder and press **Add folder**."
    lines = []
    for label, src in sources.items():
        mods = list(src["modules"].values())
        fro = sum(m.get("fro_norm", 0.0) ** 2 for m in mods) ** 0.5
        eff = sum(m.get("effective_rank", 0.0) for m in mods) / len(mods) if mods else 0.0
        ranks = sorted({m.get("r") for m in mods if m.get("r") is not None})
        where = f"step {src['step']}" if src.get("step") is not None else "saved adapter"
        lines.append(f"- **{label}** · {where} · {len(mods)} modules · r {', '.join(map(str, ranks))} · "
                     f"‖ΔW‖_F over all modules {fro:.4g} · mean effective rank {eff:.2f} · "
                     f"largest σ₁ {max((m.get('spectral_norm', 0.0) for m in mods), default=0.0):.4g}")
        for note in sorted({m.get("note") for m in mods if m.get("note")}):
            lines.append(f"  - {note}")
    if any(uses_dora(s) for s in sources.values()):
        lines.append("\n" + DORA_NOTE)
    return "\n".join(lines)


def uses_dora(source: Mapping[str, Any]) -> bool:
    return any("DoRA" in (m.get("note") or "") for m in source["modules"].values())


def kind_choices(sources: Mapping[str, Mapping[str, Any]]) -> list[str]:
    kinds = {column_label(n, m, source["modules"]) for source in sources.values() for n, m in source["modules"].items()}
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
            gr.Warning(str(e))
            continue
        chosen[src["label"]] = src
    return refreshed({**chosen, **kept})


def add_folder(folder: str, sources: Mapping[str, Any] | None, *, backend):
    """Add folder button → the sources with this adapter folder added."""
    try:
        src = folder_source(folder, backend=backend)
    except ValueError as e:
        raise gr.Error(str(e)) from None
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
    pick = lambda options, i=0: options[min(i, len(options) - 1)] if options else None  # noqa: E731
    return (sources, summary_markdown(sources), gr.update(choices=kind_choices(sources), value=kind_choices(sources)),
            gr.update(choices=labels, value=pick(labels)), gr.update(choices=runs, value=pick(runs)),
            gr.update(choices=modules, value=first), gr.update(choices=adapters, value=pick(adapters)),
            gr.update(choices=adapters, value=pick(adapters, 1)), gr.update(choices=modules, value=first))


# ---- heatmap grids (engine.spectra.heatmap's layout, without torch) ----------------------------------


def kind_rank(label: str) -> int:
    parts = label.split(".")
    for key in (".".join(parts[-2:]), parts[-1]):
        if key in KIND_ORDER:
            return KIND_ORDER.index(key)
    return len(KIND_ORDER)


def column_label(name: str, stats: Mapping[str, Any], modules: Mapping[str, Mapping[str, Any]]) -> str:
    """The module's kind, or parent.kind where that kind repeats within a layer (GPT-2's attn.c_proj, mlp.c_proj)."""
    kind, layer = stats.get("kind") or name.split(".")[-1], stats.get("layer")
    same = sum(1 for m in modules.values() if m.get("layer") == layer and m.get("kind") == kind)
    return ".".join(name.split(".")[-2:]) if same > 1 else kind


def layer_kind_grid(modules: Mapping[str, Mapping[str, Any]], value: str
                    ) -> tuple[list[int], list[str], list[list[float | None]]]:
    """(layers, kinds, grid) with grid[i][j] = `value` of kind j in layer i; modules outside layers left out."""
    inside = {n: m for n, m in modules.items() if m.get("layer") is not None}
    label = {n: column_label(n, m, inside) for n, m in inside.items()}
    layers = sorted({m["layer"] for m in inside.values()})
    first: dict[str, int] = {}
    for n in inside:
        first.setdefault(label[n], len(first))
    kinds = sorted(first, key=lambda k: (kind_rank(k), first[k]))
    grid: list[list[float | None]] = [[None] * len(kinds) for _ in layers]
    for n, m in inside.items():
        v = m.get(value)
        grid[layers.index(m["layer"])][kinds.index(label[n])] = None if v is None else float(v)
    return layers, kinds, grid


# ---- views ------------------------------------------------------------------------------------------


def sigma_view(sources: Mapping[str, Any] | None, kinds: Sequence[str] | None, layers_text: str, log: bool,
               mode: str) -> tuple[Any, str]:
    """→ [σ figure, note]: one curve per chosen module (and source), at most MAX_CURVES."""
    sources = sources or {}
    try:
        layers = parse_layers(layers_text)
    except ValueError as e:
        return sigma_figure({}), f"⚠ {e}"
    curves: dict[str, list[float]] = {}
    total = 0
    for label, src in sources.items():
        prefix = f"{label.split(' ')[0]} · " if len(sources) > 1 else ""
        for name, m in src["modules"].items():
            if kinds is not None and column_label(name, m, src["modules"]) not in kinds:
                continue
            if layers is not None and m.get("layer") not in layers:
                continue
            total += 1
            if len(curves) < MAX_CURVES:
                curves[prefix + name] = m["sigma"]
    note = f"{total} module(s)" + (f"; showing the first {MAX_CURVES} (narrow by kind or layer)" if total > MAX_CURVES
                                   else "")
    return sigma_figure(curves, log=bool(log), mode=mode), note


def heatmap_view(sources: Mapping[str, Any] | None, label: str | None):
    """→ [‖ΔW‖_F heatmap, effective-rank heatmap, DoRA magnitude heatmap (visible only with DoRA)]."""
    src = (sources or {}).get(label or "")
    if src is None:
        empty = heatmap_figure([], [], [], title="‖ΔW‖_F")
        return empty, heatmap_figure([], [], [], title="effective rank"), gr.update(visible=False)
    mods = src["modules"]
    fro = heatmap_figure(*layer_kind_grid(mods, "fro_norm"), title=f"‖ΔW‖_F · {label}", colorscale="Viridis")
    r_max = max((m.get("r") or 0 for m in mods.values()), default=0)
    eff = heatmap_figure(*layer_kind_grid(mods, "effective_rank"),
                         title=f"effective rank (of r ≤ {r_max}) · {label}", colorscale="Cividis", zmin=0,
                         zmax=r_max or None)
    has_magnitude = any(m.get("magnitude_change") is not None for m in mods.values())
    if not has_magnitude:
        return fro, eff, gr.update(visible=False)
    mag = heatmap_figure(*layer_kind_grid(mods, "magnitude_change"), title=f"DoRA: mean |m − m₀| / m₀ · {label}",
                         colorscale="Magma")
    return fro, eff, gr.update(value=mag, visible=True)


def checkpoint_view(sources: Mapping[str, Any] | None, label: str | None, module: str | None, log: bool,
                    mode: str, *, store):
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


# ---- subspace similarity φ (a child process: it needs A and B, hence torch) -----------------------------

PHI_CODE = r"""
import json, sys
from engine.spectra import load_adapter, subspace_similarity
req = json.load(sys.stdin)
def factor(folder):
    _, factors, _ = load_adapter(folder)
    if req["module"] not in factors:
        raise SystemExit("error: " + folder + " has no LoRA on " + req["module"])
    A, B, _ = factors[req["module"]]
    return {"A": A, "B": B, "BA": (A, B)}[req["use"]], A.shape[0]
M1, r1 = factor(req["a"])
M2, r2 = factor(req["b"])
i, j = min(req["i_max"], r1), min(req["j_max"], r2)
grid = subspace_similarity(M1, M2, i, j, side=req["side"])
print(json.dumps({"grid": grid, "r1": r1, "r2": r2}))
"""
_PHI_CACHE: dict[str, dict[str, Any]] = {}


def phi_grid(a_dir: str, b_dir: str, module: str, use: str, side: str, i_max: int, j_max: int, *,
             python: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """{'grid': φ[i][j], 'r1', 'r2'} from a child process; cached per adapter file version and request."""
    req = {"a": str(a_dir), "b": str(b_dir), "module": module, "use": use, "side": side,
           "i_max": int(i_max), "j_max": int(j_max)}
    key = json.dumps([req, _folder_key(Path(a_dir)), _folder_key(Path(b_dir))])
    if key in _PHI_CACHE:
        return _PHI_CACHE[key]
    try:
        proc = subprocess.run([python, "-c", PHI_CODE], input=json.dumps(req), capture_output=True, text=True,
                              timeout=PHI_TIMEOUT_S, cwd=ROOT, env=cli_env(dict(env or {})))
    except subprocess.TimeoutExpired:
        raise ValueError(f"φ took longer than {PHI_TIMEOUT_S:.0f} s and was stopped") from None
    if proc.returncode != 0:
        raise ValueError(cli_error(proc.stdout, proc.stderr, proc.returncode))
    _PHI_CACHE[key] = json.loads(proc.stdout)
    return _PHI_CACHE[key]


def phi_view(sources: Mapping[str, Any] | None, a_label: str | None, b_label: str | None, module: str | None,
             mode: str, i_max: float, j_max: float, *, backend):
    """Compute φ button → [φ heatmap, note]."""
    sources = sources or {}
    a, b = sources.get(a_label or ""), sources.get(b_label or "")
    if not (a and b and module):
        raise gr.Error("choose two sources that have an adapter folder, and a module")
    if not (a.get("adapter_dir") and b.get("adapter_dir")):
        raise gr.Error("φ needs the adapters' factors: both sources must have an adapter folder")
    use, side = PHI_MODES[mode]
    try:
        out = phi_grid(a["adapter_dir"], b["adapter_dir"], module, use, side, int(i_max), int(j_max),
                       python=backend.python, env=backend.env)
    except ValueError as e:
        raise gr.Error(f"φ failed: {e}") from None
    grid = out["grid"]
    diag = [grid[k][k] for k in range(min(len(grid), len(grid[0]) if grid else 0))]
    note = (f"{module}: {a_label} (r = {out['r1']}) vs {b_label} (r = {out['r2']}), {mode}. "
            f"φ(1, 1) = {grid[0][0]:.3f}" + (f"; mean of the diagonal {sum(diag) / len(diag):.3f}" if diag else "")
            + (". Same adapter: the diagonal is 1 by construction." if a["adapter_dir"] == b["adapter_dir"] else ""))
    fig = similarity_figure(grid, title=f"φ({a_label.split(' ')[0]}, {b_label.split(' ')[0]}, i, j) · "
                                        f"{module.split('.', 1)[-1] if module.count('.') > 3 else module}",
                            y_label=f"i: top directions of {a_label.split(' ')[0]}",
                            x_label=f"j: top directions of {b_label.split(' ')[0]}")
    return fig, note


# ---- layout ------------------------------------------------------------------------------------------


@dataclass
class SpectraTab:
    sources: Any
    run_pick: Any
    sigma_plot: Any


def build_spectra_tab(store, runner, home: Path, backend) -> SpectraTab:
    sources = gr.State({})
    with gr.Row():
        run_pick = gr.Dropdown(run_choices(store), multiselect=True, label="Runs", scale=3, elem_id="spectra-runs",
                               info="Runs with stored spectra (saved at every checkpoint and at the end)")
        refresh_btn = gr.Button("↻", size="sm", scale=0, min_width=40)
    with gr.Row():
        folder = gr.Textbox(label="…or any PEFT LoRA adapter folder", scale=4, elem_id="spectra-folder",
                            placeholder="/path/to/adapter (adapter_config.json + adapter_model.safetensors)")
        add_btn = gr.Button("Add folder", scale=1, elem_id="spectra-add")
        clear_btn = gr.Button("Remove folders", scale=1, size="sm")
    summary = gr.Markdown(summary_markdown({}), elem_id="spectra-summary")
    with gr.Accordion("What the numbers mean", open=False):
        gr.Markdown(EXPLAIN)

    gr.Markdown("### Singular values per module")
    with gr.Row():
        kinds = gr.CheckboxGroup([], label="Module kinds", scale=3)
        layers = gr.Textbox("", label="Layers", placeholder="all (or 0-3,8)", scale=1)
    with gr.Row():
        log = gr.Checkbox(False, label="log y")
        mode = gr.Radio([("σ", "sigma"), ("σ / σ₁", "normalised"), ("cumulative energy", "energy")], value="sigma",
                        label="y")
    sigma_note = gr.Markdown()
    sigma_plot = gr.Plot(sigma_figure({}), elem_id="spectra-sigma")

    gr.Markdown("### Where the adapter acts: layers × modules")
    heat_source = gr.Dropdown([], label="Source")
    with gr.Row():
        fro_plot = gr.Plot(heatmap_figure([], [], [], title="‖ΔW‖_F"))
        eff_plot = gr.Plot(heatmap_figure([], [], [], title="effective rank"))
    mag_plot = gr.Plot(visible=False, label="DoRA magnitude change")

    gr.Markdown("### One module over the run's checkpoints")
    with gr.Row():
        ckpt_run = gr.Dropdown([], label="Run")
        ckpt_module = gr.Dropdown([], label="Module")
    ckpt_plot = gr.Plot(steps_figure({}, module="module"))

    gr.Markdown("### Subspace similarity φ between two adapters (or two ranks)")
    with gr.Row():
        phi_a = gr.Dropdown([], label="First (i)")
        phi_b = gr.Dropdown([], label="Second (j)")
        phi_module = gr.Dropdown([], label="Module")
    with gr.Row():
        phi_mode = gr.Radio(list(PHI_MODES), value=next(iter(PHI_MODES)), label="Directions compared")
        i_max = gr.Slider(1, 64, 8, step=1, label="i max")
        j_max = gr.Slider(1, 64, 8, step=1, label="j max")
        phi_btn = gr.Button("Compute φ", elem_id="spectra-phi")
    phi_note = gr.Markdown()
    phi_plot = gr.Plot(similarity_figure([], title="φ"))

    loaded = [sources, summary, kinds, heat_source, ckpt_run, ckpt_module, phi_a, phi_b, phi_module]
    refresh_btn.click(lambda: gr.update(choices=run_choices(store)), None, [run_pick], api_name=False)
    run_pick.change(partial(load_runs, store=store), [run_pick, sources], loaded, api_name="spectra_runs")
    add_btn.click(partial(add_folder, backend=backend), [folder, sources], loaded, api_name="spectra_folder")
    clear_btn.click(clear_folders, [sources], loaded, api_name=False)
    gr.on([sources.change, kinds.change, layers.submit, log.change, mode.change], sigma_view,
          [sources, kinds, layers, log, mode], [sigma_plot, sigma_note], api_name=False, show_progress="hidden")
    gr.on([sources.change, heat_source.change], heatmap_view, [sources, heat_source], [fro_plot, eff_plot, mag_plot],
          api_name=False, show_progress="hidden")
    gr.on([ckpt_run.change, ckpt_module.change, log.change, mode.change], partial(checkpoint_view, store=store),
          [sources, ckpt_run, ckpt_module, log, mode], [ckpt_plot], api_name=False, show_progress="hidden")
    phi_btn.click(partial(phi_view, backend=backend), [sources, phi_a, phi_b, phi_module, phi_mode, i_max, j_max],
                  [phi_plot, phi_note], api_name="spectra_phi")
    return SpectraTab(sources=sources, run_pick=run_pick, sigma_plot=sigma_plot)
