"""Calculator tab: exact LoRA parameter count and training-memory estimate for any model, instantly.

The model's anatomy (every LoRA-able module with its shape) comes once from the backend's cached
`python -m engine inspect MODEL --json` (a child process; the server never imports torch). After that
every knob change is pure arithmetic (engine.core.estimate, well under a millisecond): no subprocess per
slider move. Shown: trainable parameters (equal to peft's own count), % of all parameters, adapter
file size, a stacked bar of what is in memory at the peak, a "fits on" verdict for common GPUs,
suggestions when a chosen budget is exceeded, and past runs of the same model with their estimated and
measured peaks side by side.

Handlers are plain module-level functions; store and backend are bound with functools.partial.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import pandas as pd

from engine.core import estimate as E
from engine.core.batching import DataFacts
from engine.core.config import (
    DTYPES,
    EMBEDDED_MODEL,
    METHODS,
    QUANT_MODES,
    TARGET_PRESETS,
    ConfigError,
    RunConfig,
    field_help,
)
from ui.errors import warn
from ui.insight_plots import accuracy_figure, memory_figure

GPUS = (16, 24, 40, 48, 80)
CUSTOM = "custom kinds"
# Knobs in the order the handlers take them (after anatomy, device and budget).
KNOBS = (
    "r",
    "alpha",
    "targets",
    "kinds",
    "layers",
    "use_rslora",
    "use_dora",
    "freeze_A",
    "quant",
    "dtype",
    "batch_size",
    "max_seq_len",
    "gradient_checkpointing",
    "packing",
    "target_frac",
    "method",
)
KNOB_DEFAULTS = {
    "r": 8,
    "alpha": 16,
    "targets": "all-linear",
    "kinds": [],
    "layers": "",
    "use_rslora": False,
    "use_dora": False,
    "freeze_A": False,
    "quant": "none",
    "dtype": "auto",
    "batch_size": 4,
    "max_seq_len": 512,
    "gradient_checkpointing": False,
    "packing": True,
    "target_frac": 1.0,
    "method": "lora",
}
DEVICE_DEFAULT, BUDGET_DEFAULT = "cuda", 16.0
RUN_COLUMNS = ["run", "status", "device", "setup", "estimated GB", "measured GB", "error %", "measured as"]


# ---- model ---------------------------------------------------------------------------------------


def model_ref(choice: str | None, text: str | None) -> str:
    """The typed hub id / folder wins over the dropdown."""
    return (text or "").strip() or (choice or "").strip()


def anatomy_text(a: Mapping[str, Any]) -> str:
    kinds = ", ".join(
        f"{k.get('target', k['kind'])} ×{k['count']} ({k['in_features']}→{k['out_features']})"
        for k in a.get("kinds", [])
    )
    return (
        f"**{a.get('architecture', '?')}** · {int(a['total_params']):,} parameters · "
        f"{a.get('num_layers')} layers · hidden {a['hidden_size']} · "
        f"intermediate {a.get('intermediate_size')} · heads {a.get('num_attention_heads')} "
        f"(kv {a.get('num_key_value_heads')}) · vocab {int(a['vocab_size']):,}  \n"
        f"LoRA-able: {kinds}"
    )


def kind_choices(anatomy: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """(label, target) per module kind; the target disambiguates GPT-2's attn.c_proj / mlp.c_proj."""
    if not anatomy:
        return []
    return [
        (f"{k['group']} · {k.get('target', k['kind'])}", k.get("target", k["kind"])) for k in anatomy.get("kinds", [])
    ]


def load_model(choice: str, text: str, trust_remote_code: bool, *, backend):
    """Load button / model change → [anatomy text, anatomy state, kinds checklist]."""
    model = model_ref(choice, text)
    try:
        a = backend.inspect(model, bool(trust_remote_code))
    except ValueError as e:  # the old model's anatomy goes: nothing stale stays on the page
        return warn(f"Cannot inspect {model!r}: {e}"), None, gr.update(choices=[], value=[])
    return anatomy_text(a), a, gr.update(choices=kind_choices(a), value=[])


# ---- the estimate panel --------------------------------------------------------------------------


def calc_config(anatomy: Mapping[str, Any], knobs: Mapping[str, Any]) -> RunConfig:
    """The knobs → a validated RunConfig for this model (ConfigError lists every problem)."""
    targets = [knobs["targets"]] if knobs["targets"] in TARGET_PRESETS else list(knobs.get("kinds") or [])
    if not targets:
        raise ConfigError(["tick at least one module kind, or pick a preset"])
    return RunConfig.from_dict(
        {
            "model": str(anatomy.get("model") or EMBEDDED_MODEL),
            "quant": knobs["quant"],
            "dtype": knobs["dtype"],
            "train_on": "all" if float(knobs.get("target_frac") or 1.0) >= 1.0 else "responses",
            "lora": {
                "r": int(knobs["r"]),
                "alpha": float(knobs["alpha"]),
                "targets": targets,
                "layers": (knobs.get("layers") or "").strip(),
                "use_rslora": bool(knobs["use_rslora"]),
                "use_dora": bool(knobs["use_dora"]),
                "freeze_A": bool(knobs["freeze_A"]),
                "method": knobs.get("method") or "lora",
            },
            "train": {
                "batch_size": int(knobs["batch_size"]),
                "max_seq_len": int(knobs["max_seq_len"]),
                "gradient_checkpointing": bool(knobs["gradient_checkpointing"]),
                "packing": bool(knobs["packing"]),
            },
        }
    )


def breakdown_table(est: E.Estimate) -> pd.DataFrame:
    rows = [(label, round(E.gb(n), 3), note) for label, n, note in est.table_rows()]
    return pd.DataFrame(rows, columns=["term", "GB", "what it is"])


def fits_markdown(est: E.Estimate, gpus: Sequence[float] = GPUS) -> str:
    if est.device == "cpu":
        return (
            f"On CPU the run needs about **{est.total_gb:.2f} GB of RAM** (process total; the trainer records "
            f"the growth over its start, ≈ {E.gb(est.allocated_bytes):.2f} GB)."
        )
    marks = " · ".join(f"{g:g} GB {'✅' if ok else '❌'}" for g, ok in E.fits(est, gpus))
    return f"**Fits on** (5 % kept free): {marks}"


def summary_markdown(est: E.Estimate) -> str:
    moment = (
        "the start of backward (kept activations + the loss's N × vocab tensors)"
        if est.peak_moment == "loss"
        else "the last block's backward (gradients, workspace" + (", recomputed block)" if est.recompute_bytes else ")")
    )
    return (
        f"**Trainable: {est.trainable_params:,}** parameters ({est.trainable_pct:.3f} % of "
        f"{est.total_params:,}) in {est.n_modules} modules · adapter file ≈ "
        f"{est.adapter_file_bytes / 2**20:.2f} MiB  \n"
        f"**Peak ≈ {est.total_gb:.2f} GB** on {est.device} ({est.compute_dtype}"
        f"{', ' + est.quant if est.quant != 'none' else ''}); the trainer's own measure should read "
        f"≈ {E.gb(est.allocated_bytes):.2f} GB "
        f"({'max_memory_allocated' if est.device == 'cuda' else 'peak RSS growth'}). "
        f"Peak moment: {moment}."
    )


def calc_panel(anatomy, device: str, budget_gb, facts, *values: Any):
    """estimate_panel as Gradio calls it (the measured dataset's token counts before the knobs)."""
    return estimate_panel(anatomy, device, budget_gb, *values, facts=facts)


def estimate_panel(
    anatomy: Mapping[str, Any] | None,
    device: str,
    budget_gb: float | None,
    *values: Any,
    facts: Mapping[str, Any] | None = None,
):
    """Any knob → [summary, memory bar, breakdown table, fits verdict, suggestions]. Pure arithmetic.

    facts: a measured dataset (measure_dataset): when it was measured for this model and max_seq_len the
    estimate is sized on its largest micro-batch, and the worst case is shown beside it.
    """
    knobs = dict(zip(KNOBS, values))
    if not anatomy:
        msg = "Pick a model and press **Load** (its shapes are read once, in a child process)."
        return msg, memory_figure([]), breakdown_table_empty(), "", ""
    data, stale = data_for(anatomy, knobs, facts)
    try:
        cfg = calc_config(anatomy, knobs)
        frac = float(knobs.get("target_frac") or 1.0)
        worst = E.estimate(anatomy, cfg, device, target_frac=frac if frac < 1.0 else None)
        if data is not None:
            cfg = cfg.replace(train_on=facts["train_on"], dataset=facts["dataset"])
        est = E.estimate(anatomy, cfg, device, data=data) if data is not None else worst
    except ConfigError as e:
        return ("⚠ " + "  \n⚠ ".join(e.problems)), memory_figure([]), breakdown_table_empty(), "", ""
    budget = float(budget_gb or 0)
    tips = E.suggestions(anatomy, cfg, est, budget, data=data) if budget > 0 else []
    if budget > 0 and not tips:
        advice = f"Fits in the {budget:g} GB budget."
    elif tips:
        advice = f"**Over the {budget:g} GB budget.** Each change re-estimated:\n" + "\n".join(f"- {t}" for t in tips)
    else:
        advice = ""
    return (
        summary_markdown(est) + "  \n" + basis_markdown(est, worst, facts, stale),
        memory_figure(est.table_rows(), gpus=GPUS, device=device),
        breakdown_table(est),
        fits_markdown(est),
        advice,
    )


def data_for(anatomy, knobs: Mapping[str, Any], facts: Mapping[str, Any] | None) -> tuple[DataFacts | None, str]:
    """The measured dataset's token counts if they fit the model and max_seq_len, else (None, why not)."""
    if not facts:
        return None, ""
    if facts.get("model") != anatomy.get("model") or int(facts.get("max_seq_len", 0)) != int(knobs["max_seq_len"]):
        return None, (
            f"{facts.get('dataset')} was measured for {facts.get('model')} at max_seq_len {facts.get('max_seq_len')}: "
            "press **Measure** again"
        )
    return DataFacts.from_dict(facts["facts"]), ""


def basis_markdown(est: E.Estimate, worst: E.Estimate, facts: Mapping[str, Any] | None, stale: str) -> str:
    """Which basis the estimate used, and the other one beside it."""
    if est is not worst:
        return (
            f"**Basis: dataset lengths** ({facts['dataset']}, loss on {facts['train_on']}): {est.batch_note} → "
            f"**{est.total_gb:.2f} GB**; worst case ({worst.batch_note}) → {worst.total_gb:.2f} GB."
        )
    return f"**Basis: worst case** ({est.batch_note}). " + (
        stale or "**Measure** a dataset below to size the estimate on its token lengths."
    )


def measure_dataset(anatomy, dataset: str, train_on: str, max_seq_len: float, *, backend):
    """Measure button → [facts state, note]: the dataset's token counts for this model (`engine preview --facts`)."""
    if not anatomy:
        raise gr.Error("Load a model first: its tokenizer counts the tokens")
    model = str(anatomy.get("model"))
    try:
        p = backend.preview(model=model, dataset=dataset or "", train_on=train_on, max_seq_len=int(max_seq_len))
    except ValueError as e:
        raise gr.Error(f"Cannot measure the dataset: {e}") from None
    state = {
        "facts": p["facts"],
        "model": model,
        "dataset": dataset,
        "train_on": train_on,
        "max_seq_len": int(max_seq_len),
    }
    note = (
        f"{dataset}: {p['format']}, {p['train']:,} training examples, tokens per example median {p['len_p50']}, "
        f"max {p['len_max']} (of max_seq_len {int(max_seq_len)})"
    )
    return state, note


def breakdown_table_empty() -> pd.DataFrame:
    return pd.DataFrame([], columns=["term", "GB", "what it is"])


# ---- past runs: estimated vs measured ---------------------------------------------------------------


def run_setup(config: Mapping[str, Any]) -> str:
    lo, tr = config.get("lora", {}), config.get("train", {})
    quant = config.get("quant", "none")
    return (
        f"r{lo.get('r')} {','.join(lo.get('targets', []))}{' DoRA' if lo.get('use_dora') else ''}"
        f"{' ' + quant if quant not in ('none', None) else ''} · {tr.get('batch_size')}×{tr.get('max_seq_len')}"
        f"{' ckpt' if tr.get('gradient_checkpointing') else ''}"
    )


def past_runs(store, model: str) -> tuple[pd.DataFrame, list[tuple[str, float, float]]]:
    """Runs of this model with a measured peak: (table, [(label, estimated GB, measured GB)])."""
    rows, points = [], []
    for r in store.list_runs(model=model) if model else []:
        if r.peak_mem_gb is None:
            continue
        device = (r.device or "").split(":")[0]
        error = (
            100 * (r.est_mem_gb - r.peak_mem_gb) / r.peak_mem_gb
            if r.est_mem_gb is not None and r.peak_mem_gb > 0
            else None
        )
        rows.append(
            [
                f"#{r.id} {r.name}",
                r.status.value,
                device or "?",
                run_setup(r.config),
                None if r.est_mem_gb is None else round(r.est_mem_gb, 3),
                round(r.peak_mem_gb, 3),
                None if error is None else round(error, 1),
                "peak RSS growth" if device == "cpu" else "max_memory_allocated" if device == "cuda" else "?",
            ]
        )
        if r.est_mem_gb is not None:
            points.append((f"#{r.id}", r.est_mem_gb, r.peak_mem_gb))
    return pd.DataFrame(rows, columns=RUN_COLUMNS), points


def runs_panel(anatomy: Mapping[str, Any] | None, *, store):
    """→ [runs table, accuracy figure, note] for the loaded model."""
    model = str((anatomy or {}).get("model") or "")
    table, points = past_runs(store, model)
    if table.empty:
        note = "No finished run of this model has a measured peak yet." if model else ""
    else:
        errs = [abs(e) for e in table["error %"] if e is not None and e == e]
        note = (
            f"{len(table)} run(s); mean |error| {sum(errs) / len(errs):.1f} %, worst {max(errs):.1f} %. "
            if errs
            else ""
        ) + (
            "On CPU the measure is the growth of peak RSS over the trainer's start (it "
            "includes libraries loaded during the run and allocator caching); on a GPU it is "
            "torch.cuda.max_memory_allocated."
        )
    return table, accuracy_figure(points), note


# ---- layout ---------------------------------------------------------------------------------------


def machine_device(*, backend):
    """Page load → the device radio on this machine's device (from `engine doctor`, asked once per process)."""
    try:
        return gr.update(value=backend.doctor().get("device", DEVICE_DEFAULT))
    except ValueError as e:  # the engine could not start: keep the default and say why
        return gr.update(info=f"could not check this machine ({e}); estimating for {DEVICE_DEFAULT}")


@dataclass
class CalculatorTab:
    anatomy: Any
    knobs: dict[str, Any]
    summary: Any
    bar: Any
    runs: Any
    on_load: Any = None  # (fn, inputs, outputs) for page load: the device of this machine
    refresh: Any = None  # (fn, inputs, outputs): past runs, on load and whenever runs change


def build_calculator_tab(store, runner, home: Path, backend) -> CalculatorTab:
    D = KNOB_DEFAULTS
    initial = backend.cached_inspect(EMBEDDED_MODEL)  # no process at build time: only an existing cache entry
    device = (backend.known_doctor() or {}).get("device", DEVICE_DEFAULT)  # this machine's, once known
    first = estimate_panel(initial, device, BUDGET_DEFAULT, *(D[n] for n in KNOBS))
    first_runs = runs_panel(initial, store=store)
    w = SimpleNamespace(anatomy=gr.State(initial), facts=gr.State(None))
    k: dict[str, Any] = {}
    gr.Markdown(
        "Exact trainable parameters and a per-term memory estimate for any model. The model's shapes are "
        "read once (meta device, no weights); every change below is recomputed instantly."
    )
    with gr.Row():
        w.model_choice = gr.Dropdown(
            [EMBEDDED_MODEL],
            value=EMBEDDED_MODEL,
            label="Model",
            scale=3,
            allow_custom_value=True,
            elem_id="calc-model",
        )
        w.model_text = gr.Textbox(
            label="…or a hub id / local folder",
            scale=3,
            elem_id="calc-model-text",
            placeholder="HuggingFaceTB/SmolLM2-360M-Instruct or /path/to/model",
        )
        w.trust = gr.Checkbox(False, label="trust_remote_code", scale=1)
        w.load_btn = gr.Button("Load", scale=1, elem_id="calc-load")
    w.anatomy_md = gr.Markdown(anatomy_text(initial) if initial else "Press **Load** to read the model's shapes.")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            knob_widgets(k, w, initial, device)
            data_widgets(w, home, getattr(backend, "data_dirs", []))
        with gr.Column(scale=3):
            w.summary = gr.Markdown(first[0], elem_id="calc-summary")
            w.bar = gr.Plot(first[1], label="Memory at the peak", elem_id="calc-bar")
            w.fits = gr.Markdown(first[3], elem_id="calc-fits")
            w.advice = gr.Markdown(first[4], elem_id="calc-advice")
            w.table = gr.Dataframe(first[2], label="Breakdown", interactive=False, wrap=True)
    gr.Markdown("### Past runs of this model: estimated vs measured peak")
    w.runs_note = gr.Markdown(first_runs[2])
    with gr.Row():
        w.runs_df = gr.Dataframe(first_runs[0], interactive=False, scale=3)
        w.acc_plot = gr.Plot(first_runs[1], scale=2)
    w.refresh_btn = gr.Button("Refresh past runs", size="sm")
    wire_calculator(k, w, store, backend)
    return CalculatorTab(
        anatomy=w.anatomy,
        knobs=k,
        summary=w.summary,
        bar=w.bar,
        runs=w.runs_df,
        on_load=(partial(machine_device, backend=backend), None, [w.device]),
        refresh=(partial(runs_panel, store=store), [w.anatomy], [w.runs_df, w.acc_plot, w.runs_note]),
    )


def knob_widgets(k: dict[str, Any], w, initial: Mapping[str, Any] | None, device: str = DEVICE_DEFAULT) -> None:
    HL, HT, H = field_help("lora"), field_help("train"), field_help()
    D = KNOB_DEFAULTS
    with gr.Row():
        k["r"] = gr.Slider(1, 256, D["r"], step=1, label="Rank r", info=HL["r"]["help"])
        k["alpha"] = gr.Slider(1, 512, D["alpha"], step=1, label="Alpha α", info=HL["alpha"]["help"])
    k["targets"] = gr.Radio(
        [*TARGET_PRESETS, CUSTOM],
        value=D["targets"],
        label="Targets",
        info="A preset, or tick module kinds below and choose 'custom kinds'",
    )
    k["kinds"] = gr.CheckboxGroup(kind_choices(initial), value=D["kinds"], label="Module kinds")
    k["layers"] = gr.Textbox(
        D["layers"], label="Layers", placeholder="all (or 0-11, 0,2,4-6)", info=HL["layers"]["help"]
    )
    with gr.Row():
        k["use_rslora"] = gr.Checkbox(D["use_rslora"], label="rsLoRA")
        k["use_dora"] = gr.Checkbox(D["use_dora"], label="DoRA", info="+ one magnitude vector per module")
        k["freeze_A"] = gr.Checkbox(D["freeze_A"], label="LoRA-FA (freeze A)")
    k["method"] = gr.Radio(list(METHODS), value=D["method"], label="Update shape", info=HL["method"]["help"])
    with gr.Row():
        k["quant"] = gr.Radio(list(QUANT_MODES), value=D["quant"], label="Quantization", info=H["quant"]["help"])
        k["dtype"] = gr.Radio(list(DTYPES), value=D["dtype"], label="Compute dtype")
    with gr.Row():
        k["batch_size"] = gr.Slider(1, 64, D["batch_size"], step=1, label="Batch size")
        k["max_seq_len"] = gr.Slider(32, 8192, D["max_seq_len"], step=32, label="Max seq len")
    with gr.Row():
        k["gradient_checkpointing"] = gr.Checkbox(
            D["gradient_checkpointing"], label="Gradient checkpointing", info=HT["gradient_checkpointing"]["help"]
        )
        k["packing"] = gr.Checkbox(
            D["packing"], label="Packing", info="the trainer's default: the output head runs on targets only"
        )
    k["target_frac"] = gr.Slider(
        0.05,
        1.0,
        D["target_frac"],
        step=0.05,
        label="Share of tokens with a loss target",
        info="1 = every token (train_on all, and the worst case of responses); lower it to your data's response share",
    )
    with gr.Row():
        w.device = gr.Radio(["cuda", "cpu"], value=device, label="Device", info="defaults to this machine's")
        w.budget = gr.Number(BUDGET_DEFAULT, label="Budget GB (for suggestions)", minimum=0)


def data_widgets(w, home: Path, data_dirs=()) -> None:
    """A dataset to size the estimate on (its token lengths), measured once through the engine."""
    from ui.train_form import dataset_choices

    with gr.Row():
        w.data_box = gr.Dropdown(
            dataset_choices(home, data_dirs),
            value="builtin:persona",
            label="Dataset to size the estimate on",
            allow_custom_value=True,
            scale=3,
            elem_id="calc-dataset",
        )
        w.data_train_on = gr.Radio(["responses", "all"], value="responses", label="Loss on", scale=2)
        w.measure_btn = gr.Button("Measure", scale=1, elem_id="calc-measure")
    w.data_note = gr.Markdown(elem_id="calc-data-note")


def wire_calculator(k: dict[str, Any], w, store, backend) -> None:
    knob_inputs = [k[name] for name in KNOBS]
    load = partial(load_model, backend=backend)
    model = [w.model_choice, w.model_text, w.trust]
    w.load_btn.click(load, model, [w.anatomy_md, w.anatomy, k["kinds"]], api_name="calc_load")
    w.model_choice.input(load, model, [w.anatomy_md, w.anatomy, k["kinds"]], api_name=False)
    w.measure_btn.click(
        partial(measure_dataset, backend=backend),
        [w.anatomy, w.data_box, w.data_train_on, k["max_seq_len"]],
        [w.facts, w.data_note],
        api_name="calc_measure",
    )
    gr.on(
        [w.anatomy.change, w.device.change, w.budget.change, w.facts.change, *(c.change for c in knob_inputs)],
        calc_panel,
        [w.anatomy, w.device, w.budget, w.facts, *knob_inputs],
        [w.summary, w.bar, w.table, w.fits, w.advice],
        api_name="calc_estimate",
        show_progress="hidden",
        trigger_mode="always_last",
    )
    gr.on(
        [w.anatomy.change, w.refresh_btn.click],
        partial(runs_panel, store=store),
        [w.anatomy],
        [w.runs_df, w.acc_plot, w.runs_note],
        api_name="calc_runs",
        show_progress="hidden",
    )
