"""Train tab: the form (model, LoRA, dataset, training) → RunConfig → JobRunner.submit, and the live view.

Every handler is a plain module-level function of explicit inputs; dependencies (store, runner, home,
backend) are bound with functools.partial in build_train_tab. The form is one dict of widgets keyed by
FORM_FIELDS, so `config_from_form(dict(zip(FORM_FIELDS, values)))` is the whole mapping.

Live view: a gr.Timer calls poll_run with a cursor (the last metric id seen, in gr.State); when nothing
new arrived the plots get gr.skip(), and when the selected run is over and nothing else is queued or
running the timer turns itself off. The run selector defaults to the newest running or queued run, so
closing the page and coming back re-attaches.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import gradio as gr

from engine.config import (BUILTIN_DATASETS, DATASET_FORMATS, DTYPES, EMBEDDED_MODEL, INITS, QUANT_MODES, SCHEDULERS,
                           TARGET_PRESETS, TRAIN_ON, ConfigError, LoraSpec, RunConfig, TrainSpec, field_help)
from engine.estimate import Q_OR_V, estimate, gb
from engine.events import format_duration
from engine.home import datasets_dir
from storage import TERMINAL, RunStatus
from ui.backend import DATASET_SUFFIXES, cached_hub_models, save_upload
from ui.plots import loss_figure, lr_figure

# Form fields follow the config's dataclasses, so a field added there gets a widget (under "More") and a
# place in config_from_form without touching this file.
TOP_KEYS = tuple(f.name for f in fields(RunConfig) if f.name not in ("model", "lora", "train"))
LORA_KEYS = tuple(f.name for f in fields(LoraSpec) if f.name != "targets")
TRAIN_KEYS = tuple(f.name for f in fields(TrainSpec))
FORM_FIELDS = ("model_choice", "model_text", "targets", *TOP_KEYS, *LORA_KEYS, *TRAIN_KEYS)
STR_KEYS = {f.name for cls in (RunConfig, LoraSpec, TrainSpec) for f in fields(cls) if f.type == "str"} | {"layers"}
PLOTTED = ("train/loss", "val/loss", "lr")


# ---- form ↔ config ---------------------------------------------------------------------------------


def targets_for(selected: Sequence[str] | None, preset: str) -> tuple[str, ...]:
    """The preset chosen with a preset button, else the module kinds ticked in the checklist."""
    return (preset,) if preset else tuple(selected or ())


def config_from_form(form: Mapping[str, Any], preset: str = "") -> RunConfig:
    """Every form field → a validated RunConfig; ConfigError lists every problem at once."""
    def val(k: str) -> Any:
        v = form[k]
        return ("" if v is None else str(v)) if k in STR_KEYS else v

    model = (form["model_text"] or "").strip() or (form["model_choice"] or "").strip()
    d = {"model": model, **{k: val(k) for k in TOP_KEYS},
         "lora": {**{k: val(k) for k in LORA_KEYS}, "targets": list(targets_for(form["targets"], preset))},
         "train": {k: val(k) for k in TRAIN_KEYS}}
    return RunConfig.from_dict(d)


def form_from_config(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The inverse of config_from_form: (form values by FORM_FIELDS, preset) for a config dict."""
    c = RunConfig.from_dict(cfg)
    d = c.to_dict()
    targets = list(c.lora.targets)
    preset = targets[0] if targets and targets[0] in TARGET_PRESETS else ""
    form = {"model_choice": EMBEDDED_MODEL, "model_text": "" if c.model == EMBEDDED_MODEL else c.model,
            "targets": [] if preset else targets, **{k: d[k] for k in TOP_KEYS},
            **{k: d["lora"][k] for k in LORA_KEYS}, **{k: d["train"][k] for k in TRAIN_KEYS}}
    form["layers"] = layers_text(c.lora.layers)
    return form, preset


def layers_text(layers: Sequence[int]) -> str:
    """(0, 1, 2, 3, 8) → '0-3,8', the form's way of writing a layer range."""
    parts: list[str] = []
    for i in sorted(set(layers)):
        if parts and "-" in parts[-1] and int(parts[-1].split("-")[1]) == i - 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{i}"
        elif parts and "-" not in parts[-1] and int(parts[-1]) == i - 1:
            parts[-1] = f"{parts[-1]}-{i}"
        else:
            parts.append(str(i))
    return ",".join(parts)


def problems_text(problems: Sequence[str]) -> str:
    n = len(problems)
    return f"The form has {n} problem{'s' if n != 1 else ''}:\n" + "\n".join(f"• {p}" for p in problems)


# ---- model picker and module checklist ------------------------------------------------------------


def model_choices() -> list[str]:
    return [EMBEDDED_MODEL, *cached_hub_models()]


def kind_choices(anatomy: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """(label, kind) per LoRA-able module kind, grouped: 'attention · q_proj ×30 · 576→576'."""
    if not anatomy:
        return []
    kinds = sorted(anatomy["kinds"], key=lambda k: (k["group"] != "attention", k["group"] != "mlp", k["group"]))
    return [(f"{k['group']} · {k['kind']} ×{k['count']} · {k['in_features']}→{k['out_features']}", k["kind"])
            for k in kinds]


def preset_kinds(anatomy: Mapping[str, Any] | None, preset: str) -> list[str]:
    """Module kinds a preset selects (the trainer's rule, engine.estimate.select_modules)."""
    if not anatomy:
        return []
    return [k["kind"] for k in anatomy["kinds"]
            if preset == "all-linear" or (preset == "attention" and k["group"] == "attention")
            or (preset == "mlp" and k["group"] == "mlp")
            or (preset == "qv" and k["group"] == "attention" and Q_OR_V.match(k["kind"]))]


def anatomy_markdown(a: Mapping[str, Any]) -> str:
    groups: dict[str, int] = {}
    for k in a["kinds"]:
        groups[k["group"]] = groups.get(k["group"], 0) + k["count"]
    return (f"**{a['architecture']}** ({a['model_type']}) · {a['total_params']:,} parameters · "
            f"{a['num_layers']} layers (0–{int(a['num_layers']) - 1}) · hidden {a['hidden_size']} · heads "
            f"{a['num_attention_heads']} (kv {a['num_key_value_heads']}) · vocab {a['vocab_size']:,}  \n"
            f"LoRA-able linear layers: {len(a['modules'])} ("
            + ", ".join(f"{g} {n}" for g, n in groups.items()) + ")")


def run_inspect(model_choice: str, model_text: str, trust_remote_code: bool, preset: str, *, backend):
    """Inspect button → [anatomy text, module checklist, anatomy state]."""
    model = (model_text or "").strip() or (model_choice or "").strip()
    try:
        a = backend.inspect(model, bool(trust_remote_code))
    except ValueError as e:
        raise gr.Error(f"Cannot inspect {model!r}: {e}") from None
    chosen = preset_kinds(a, preset) if preset else []
    return anatomy_markdown(a), gr.update(choices=kind_choices(a), value=chosen), a


def restore_inspection(model_choice: str, model_text: str, trust_remote_code: bool, preset: str, *, backend):
    """Page load: show the model's anatomy at once if it was inspected before (no child process)."""
    model = (model_text or "").strip() or (model_choice or "").strip()
    a = backend.cached_inspect(model, bool(trust_remote_code)) if model else None
    if a is None:
        return gr.skip(), gr.skip(), gr.skip()
    chosen = preset_kinds(a, preset) if preset else []
    return anatomy_markdown(a), gr.update(choices=kind_choices(a), value=chosen), a


def apply_preset(preset: str, anatomy: Mapping[str, Any] | None):
    """A preset button → [checklist ticks, preset state]."""
    return gr.update(value=preset_kinds(anatomy, preset)), preset


def clear_preset(selected: list[str]) -> str:
    """The user ticked modules by hand: the checklist, not a preset, now decides."""
    return ""


def targets_markdown(preset: str, selected: Sequence[str] | None) -> str:
    if preset:
        return f"Targets: preset **{preset}**"
    return "Targets: " + (", ".join(f"`{s}`" for s in selected) if selected else "**none ticked**")


# ---- quantization (what this machine can run) ---------------------------------------------------------


def quant_update(doctor: Mapping[str, Any] | None):
    """Radio choices labelled with what this machine can do, and the reasons in the help text."""
    help_text = field_help()["quant"]["help"]
    if not doctor:
        return gr.update(choices=list(QUANT_MODES), info=help_text + " (checking this machine…)")
    labels, notes = [], []
    for mode in QUANT_MODES:
        q = doctor["quant"].get(mode, {"ok": False, "reason": "unknown to this engine"})
        if not q["ok"]:
            labels.append((f"{mode} (unavailable)", mode))
            notes.append(f"{mode}: {q['reason']}")
        elif mode != "none" and doctor.get("device") == "cpu":
            labels.append((f"{mode} (slow on CPU)", mode))
            notes.append(f"{mode}: {q['reason']}")
        else:
            labels.append((mode, mode))
    return gr.update(choices=labels, info=help_text + ("  \nOn this machine: " + "; ".join(notes) if notes else ""))


def quant_problems(quant: str, doctor: Mapping[str, Any] | None) -> list[str]:
    q = (doctor or {}).get("quant", {}).get(quant)
    return [f"quant = {quant!r} is not available on this machine: {q['reason']}"] if q and not q["ok"] else []


def check_quant(quant: str, doctor: Mapping[str, Any] | None) -> str:
    for p in quant_problems(quant, doctor):
        gr.Warning(p)
        return "none"
    return quant


def load_machine(*, backend):
    """Page load: ask the engine (once per process) what this machine can do → [quant radio, doctor state]."""
    try:
        doctor = backend.doctor()
    except ValueError as e:  # the engine could not start: say so, keep every mode selectable
        help_text = field_help()["quant"]["help"]
        return gr.update(choices=list(QUANT_MODES), info=f"{help_text} (could not check this machine: {e})"), None
    return quant_update(doctor), doctor


# ---- dataset ----------------------------------------------------------------------------------------


def dataset_choices(home: Path) -> list[tuple[str, str]]:
    files = sorted(p for p in datasets_dir(Path(home)).iterdir() if p.suffix.lower() in DATASET_SUFFIXES)
    return [(f"{k} — {v.split('(')[0].strip()}", k) for k, v in BUILTIN_DATASETS.items()] + \
        [(f"uploaded: {p.name}", str(p)) for p in files]


def upload_dataset(path: str | None, *, home: Path):
    """Upload button → the dataset dropdown, now holding and showing the stored copy."""
    if not path:
        return gr.skip()
    try:
        dest = save_upload(path, home)
    except ValueError as e:
        raise gr.Error(str(e)) from None
    gr.Info(f"Stored as {dest.name} in the data home")
    return gr.update(choices=dataset_choices(home), value=str(dest))


def preview_dataset(model_choice: str, model_text: str, dataset: str, dataset_format: str, train_on: str,
                    max_seq_len: float, *, backend):
    """Preview button → [summary markdown, the first example as the model sees it]."""
    model = (model_text or "").strip() or (model_choice or "").strip()
    try:
        p = backend.preview(model=model, dataset=dataset or "", dataset_format=dataset_format or "auto",
                            train_on=train_on or "responses", max_seq_len=int(max_seq_len or 512))
    except ValueError as e:
        raise gr.Error(f"Cannot preview: {e}") from None
    md = (f"Format **{p['format']}** · {p['rows']:,} rows → **{p['train']:,} train / {p['val']:,} val**"
          + (f" ({p['dropped']} dropped)" if p.get("dropped") else "")
          + f" · tokens per example: min {p['len_min']}, median {p['len_p50']}, p95 {p['len_p95']}, "
          f"max {p['len_max']} ({p['tokens_total']:,} in all)")
    return md, gr.update(value=p["rendered_example"], visible=True)


# ---- estimate and launch ------------------------------------------------------------------------------


def estimate_markdown(anatomy: Mapping[str, Any] | None, preset: str, doctor: Mapping[str, Any] | None,
                      *values: Any) -> str:
    """Exact trainable parameter count and memory estimate shown next to Launch."""
    form = dict(zip(FORM_FIELDS, values))
    try:
        cfg = config_from_form(form, preset)
    except ConfigError as e:
        return f"Estimate waits for a valid form: {e.problems[0]}" + (f" (+{len(e.problems) - 1} more)"
                                                                       if len(e.problems) > 1 else "")
    target = targets_markdown(preset, form["targets"])
    if not anatomy or anatomy.get("model") != cfg.model:
        return f"{target}  \nPress **Inspect** to see the exact trainable parameter count and the memory estimate."
    device = (doctor or {}).get("device", "cuda")
    try:
        est = estimate(anatomy, cfg, device, bf16_capable=bool((doctor or {}).get("bf16", True)))
    except ConfigError as e:
        return "⚠ " + "; ".join(e.problems)
    return (f"{target} · {est.n_modules} modules  \n**Trainable: {est.trainable_params:,}** "
            f"({est.trainable_pct:.3f} % of {est.total_params:,})  \n"
            f"**Memory ≈ {est.total_gb:.2f} GB** on {device} ({est.compute_dtype}): weights {gb(est.weights_bytes):.2f}"
            f", LoRA + grads + AdamW {gb(est.lora_bytes + est.grad_bytes + est.optimizer_bytes):.3f}"
            f", activations {gb(est.activation_bytes):.2f}, logits {gb(est.logits_bytes):.2f}")


def launch_problems(cfg: RunConfig, anatomy: Mapping[str, Any] | None, doctor: Mapping[str, Any] | None):
    """(problems beyond the config's own validation, the estimate or None): quantization this machine cannot
    run, and target modules or layers the inspected model does not have."""
    problems = quant_problems(cfg.quant, doctor)
    est = None
    if anatomy and anatomy.get("model") == cfg.model:
        try:
            est = estimate(anatomy, cfg, (doctor or {}).get("device", "cuda"),
                           bf16_capable=bool((doctor or {}).get("bf16", True)))
        except ConfigError as e:
            problems += e.problems
    return problems, est


def not_launched(problems: Sequence[str]):
    """Every problem, as a warning toast and as a list that stays next to the Launch button."""
    gr.Warning(problems_text(problems))
    return "**Not launched.** " + problems_text(problems).replace("\n• ", "\n- "), gr.skip(), gr.skip()


def launch_run(anatomy, preset, doctor, *values, runner, store):
    """Launch button → [message, run selector, timer]: validate everything, then queue the run."""
    try:
        cfg = config_from_form(dict(zip(FORM_FIELDS, values)), preset)
    except ConfigError as e:
        return not_launched(e.problems)
    problems, est = launch_problems(cfg, anatomy, doctor)
    if problems:
        return not_launched(problems)
    try:
        run_id = runner.submit(cfg, name=cfg.name or None, est_mem_gb=est.total_gb if est else None,
                               trainable_params=est.trainable_params if est else None)
    except ValueError as e:  # ConfigError (every problem listed), DiskSpaceError
        return not_launched(getattr(e, "problems", None) or [str(e)])
    pos = store.queue_position(run_id)
    where = f"queue position {pos}" if pos else str(store.get_run(run_id).status)
    return (f"Run **#{run_id}** launched ({where}).", gr.update(choices=run_choices(store), value=run_id),
            gr.Timer(active=True))


def prefill_form(run_id: int | None, anatomy: Mapping[str, Any] | None, *, store):
    """History's Relaunch → [every form widget..., preset, anatomy, tabs]: the run's config in the form."""
    if run_id is None:
        raise gr.Error("Choose a run first")
    form, preset = form_from_config(store.get_run(int(run_id)).config)
    model = form["model_text"] or form["model_choice"]
    if anatomy and anatomy.get("model") == model:
        ticks = preset_kinds(anatomy, preset) if preset else form["targets"]
        targets = gr.update(choices=kind_choices(anatomy), value=ticks)
    else:
        anatomy = None
        targets = gr.update(choices=[(t, t) for t in form["targets"]], value=form["targets"])
    gr.Info(f"Form filled from run #{run_id}; change what you like and press Launch")
    return [*(targets if k == "targets" else form[k] for k in FORM_FIELDS), preset, anatomy,
            gr.Tabs(selected="train")]


# ---- live view ------------------------------------------------------------------------------------


def run_choices(store, limit: int = 50) -> list[tuple[str, int]]:
    return [(f"#{r.id} {r.name}".strip(), r.id) for r in store.list_runs(limit=limit)]  # no status: it goes stale


def default_run(store) -> int | None:
    """The newest running run, else the newest queued one, else the newest run."""
    for status in (RunStatus.RUNNING, RunStatus.QUEUED, None):
        runs = store.list_runs(status=status, limit=1)
        if runs:
            return runs[0].id
    return None


def attach(*, store):
    """Page load: [run selector on the newest running/queued run, timer on]."""
    return gr.update(choices=run_choices(store), value=default_run(store)), gr.Timer(active=True)


def select_run(run_id: int | None):
    """A new run in the selector: [cursor, series, timer] start over."""
    return 0, {}, gr.Timer(active=True)


def active_runs(store) -> tuple[list[Any], list[Any]]:
    """(running, queued oldest first)."""
    running = store.list_runs(status=RunStatus.RUNNING)
    return running, sorted(store.list_runs(status=RunStatus.QUEUED), key=lambda r: r.id)


def queue_markdown(running: Sequence[Any], queued: Sequence[Any]) -> str:
    if not running and not queued:
        return "Queue: empty."
    lines = [f"- ▶ **#{r.id}** {r.name} — running" for r in running]
    lines += [f"- {i}. #{r.id} {r.name} — queued" for i, r in enumerate(queued, start=1)]
    return "Queue:\n" + "\n".join(lines)


def merge_points(series: Mapping[str, Any], points: Sequence[Any]) -> dict[str, Any]:
    """Fold new metric points into {name: {step: value}} for plotted names and 'last' for every name."""
    out = {name: dict(series.get(name, {})) for name in PLOTTED}
    last, step = dict(series.get("last", {})), series.get("step", 0)
    for p in points:
        if p.name in PLOTTED:
            out[p.name][p.step] = p.value  # a resumed run logs a step twice: the later value wins
        last[p.name] = p.value
        step = max(step, p.step)
    return {**series, **out, "last": last, "step": step}


def status_markdown(run, last: Mapping[str, float], step: int, queue_pos: int | None) -> str:
    head = f"**#{run.id} {run.name} · {run.status.value}**"
    if run.status == RunStatus.QUEUED:
        return head + (f" · position {queue_pos} in the queue" if queue_pos else "")
    total = int(last.get("total_steps") or run.total_steps or 0)
    parts = [head, f"step {step} / {total or '?'}"]
    if "epoch" in last:
        parts.append(f"epoch {last['epoch']:.2f}")
    if run.status == RunStatus.RUNNING and "eta_s" in last:
        parts.append(f"ETA {format_duration(last['eta_s'])}")
    if "tokens_per_s" in last:
        parts.append(f"{last['tokens_per_s']:,.0f} tok/s")
    if "pad_frac" in last:  # share of the computed positions that were padding (0 with packing)
        parts.append(f"padding {last['pad_frac']:.0%}")
    peak = last.get("mem/peak_gb") or run.peak_mem_gb
    if peak:
        parts.append(f"peak {peak:.2f} GB")
    if "train/loss" in last:
        parts.append(f"loss {last['train/loss']:.4f}")
    if "val/loss" in last:
        parts.append(f"val {last['val/loss']:.4f}")
    text = " · ".join(parts)
    if run.error:
        text += f"  \n**Error:** {run.error}"
    if run.status == RunStatus.SUCCEEDED and run.adapter_dir:
        text += f"  \nAdapter: `{run.adapter_dir}`"
    return text


def poll_run(run_id: int | None, cursor: int, series: Mapping[str, Any], *, store, runner):
    """Timer tick → [cursor, series, status, loss plot, lr plot, log tail, queue, timer]; skips what is unchanged."""
    running, queued = active_runs(store)
    queue, busy = queue_markdown(running, queued), bool(running or queued)
    if run_id is None:
        return cursor, series, "No run yet: fill the form and press Launch.", gr.skip(), gr.skip(), gr.skip(), \
            queue, gr.Timer(active=busy)
    try:
        run = store.get_run(int(run_id))  # status first: metrics written before the end are then visible
    except KeyError:
        return 0, {}, f"Run #{run_id} was deleted.", gr.skip(), gr.skip(), "", queue, gr.Timer(active=busy)
    if series.get("run") != run.id:  # another run was selected since the last tick: start over
        cursor, series = 0, {"run": run.id}
    points = store.metrics_since(run.id, cursor)
    new = merge_points(series, points)
    redraw = bool(points) or not series.get("drawn")
    status = status_markdown(run, new["last"], new["step"], store.queue_position(run.id)
                             if run.status == RunStatus.QUEUED else None)
    log = runner.log_tail(run.id)
    loss = lr = gr.skip()
    if redraw:
        loss = loss_figure(sorted(new["train/loss"].items()), sorted(new["val/loss"].items()),
                           title=f"run #{run.id} loss")
        lr = lr_figure(sorted(new["lr"].items()))
    out_status = status if status != series.get("status_text") else gr.skip()
    out_log = log if log != series.get("log") else gr.skip()
    out_queue = queue if queue != series.get("queue") else gr.skip()
    new.update(drawn=True, status_text=status, log=log, queue=queue)
    keep_polling = run.status not in TERMINAL or busy
    return (points[-1].id if points else cursor), new, out_status, loss, lr, out_log, out_queue, \
        gr.Timer(active=keep_polling)


def cancel_run(run_id: int | None, *, runner) -> str:
    if run_id is None:
        raise gr.Error("No run selected")
    return runner.cancel(int(run_id))


def resume_run(run_id: int | None, *, runner, store):
    """Resume → [message, run selector on the resumed run, timer]."""
    if run_id is None:
        raise gr.Error("No run selected")
    try:
        new_id = runner.resume(int(run_id))
    except (ValueError, KeyError) as e:
        raise gr.Error(str(e)) from None
    return f"Run #{run_id} resumes as #{new_id}.", gr.update(choices=run_choices(store), value=new_id), \
        gr.Timer(active=True)


# ---- layout ---------------------------------------------------------------------------------------


def field_widget(name: str, meta: Mapping[str, Any]):
    """A widget for a config field that has no hand-placed one, chosen by its default's type."""
    default, info = meta["default"], meta["help"]
    if "choices" in meta:
        return gr.Dropdown(list(meta["choices"]), value=default, label=name, info=info)
    if isinstance(default, bool):
        return gr.Checkbox(default, label=name, info=info)
    if isinstance(default, (int, float)):
        return gr.Number(default, precision=0 if isinstance(default, int) else None, label=name, info=info)
    return gr.Textbox(",".join(map(str, default)) if isinstance(default, tuple) else str(default), label=name, info=info)


@dataclass
class TrainTab:
    form: dict[str, Any]
    preset: Any
    anatomy: Any
    doctor: Any
    run_select: Any
    timer: Any
    quant: Any

    anatomy_md: Any

    def wire_load(self, demo, store, backend, doctor_known: bool) -> None:
        demo.load(partial(restore_inspection, backend=backend),
                  [self.form[k] for k in ("model_choice", "model_text", "trust_remote_code")] + [self.preset],
                  [self.anatomy_md, self.form["targets"], self.anatomy], show_progress="hidden", api_name=False)
        demo.load(partial(attach, store=store), None, [self.run_select, self.timer], show_progress="hidden",
                  api_name=False)
        if not doctor_known:
            demo.load(partial(load_machine, backend=backend), None, [self.quant, self.doctor], show_progress="hidden",
                      api_name=False)


def build_train_tab(store, runner, home: Path, backend, *, doctor: Mapping[str, Any] | None = None) -> TrainTab:
    H, HL, HT = field_help(), field_help("lora"), field_help("train")
    f: dict[str, Any] = {}
    preset, anatomy, doctor_state = gr.State("all-linear"), gr.State(None), gr.State(doctor)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            gr.Markdown("### 1 · Base model")
            with gr.Row():
                f["model_choice"] = gr.Dropdown(model_choices(), value=EMBEDDED_MODEL, label="Base model",
                                                info="The embedded default, then models in your Hugging Face cache",
                                                scale=3)
                f["model_text"] = gr.Textbox(label="…or a hub id / local folder", scale=3, elem_id="model-text",
                                             placeholder="HuggingFaceTB/SmolLM2-360M-Instruct or /path/to/model")
                inspect_btn = gr.Button("Inspect", scale=1, elem_id="inspect-btn")
            f["trust_remote_code"] = gr.Checkbox(False, label="trust_remote_code", info=H["trust_remote_code"]["help"])
            anatomy_md = gr.Markdown("Press **Inspect** to list the model's LoRA-able modules.")
            gr.Markdown("### 2 · LoRA")
            with gr.Row():
                preset_btns = {p: gr.Button(label, size="sm") for p, label in
                               (("qv", "q,v"), ("attention", "attention"), ("mlp", "MLP"), ("all-linear", "all-linear"))}
            f["targets"] = gr.CheckboxGroup([], label="Target modules", info=HL["targets"]["help"])
            targets_md = gr.Markdown(targets_markdown("all-linear", []))
            with gr.Row():
                f["layers"] = gr.Textbox("", label="Layers", placeholder="all (or 0-11, 0,2,4-6)", info=HL["layers"]["help"])
                f["r"] = gr.Slider(1, 256, HL["r"]["default"], step=1, label="Rank r", info=HL["r"]["help"])
            with gr.Row():
                f["alpha"] = gr.Slider(1, 512, HL["alpha"]["default"], step=1, label="Alpha α", info=HL["alpha"]["help"])
                f["dropout"] = gr.Slider(0, 0.5, HL["dropout"]["default"], step=0.01, label="Dropout",
                                         info=HL["dropout"]["help"])
            with gr.Accordion("LoRA variants: rsLoRA, DoRA, PiSSA/OLoRA, LoRA+, LoRA-FA", open=False):
                with gr.Row():
                    f["use_rslora"] = gr.Checkbox(False, label="rsLoRA", info=HL["use_rslora"]["help"])
                    f["use_dora"] = gr.Checkbox(False, label="DoRA", info=HL["use_dora"]["help"])
                    f["freeze_A"] = gr.Checkbox(False, label="LoRA-FA (freeze A)", info=HL["freeze_A"]["help"])
                with gr.Row():
                    f["init"] = gr.Radio(list(INITS), value="gaussian", label="Init", info=HL["init"]["help"])
                    f["loraplus_lr_ratio"] = gr.Number(0.0, label="LoRA+ ratio (lr_B / lr_A)",
                                                       info=HL["loraplus_lr_ratio"]["help"])
            with gr.Row():
                q0 = quant_update(doctor)
                f["quant"] = gr.Radio(q0["choices"], value="none", label="Quantization of the base", info=q0["info"])
                f["dtype"] = gr.Radio(list(DTYPES), value="auto", label="Compute dtype", info=H["dtype"]["help"])
            gr.Markdown("### 3 · Dataset")
            with gr.Row():
                f["dataset"] = gr.Dropdown(dataset_choices(home), value="builtin:persona", label="Dataset",
                                           allow_custom_value=True, info=H["dataset"]["help"], scale=3)
                upload = gr.UploadButton("Upload .jsonl/.json/.csv/.txt", file_types=list(DATASET_SUFFIXES),
                                         scale=1, elem_id="dataset-upload")
                preview_btn = gr.Button("Preview", scale=1, elem_id="preview-btn")
            with gr.Row():
                f["dataset_format"] = gr.Dropdown(list(DATASET_FORMATS), value="auto", label="Format",
                                                  info=H["dataset_format"]["help"])
                f["train_on"] = gr.Radio(list(TRAIN_ON), value="responses", label="Loss on", info=H["train_on"]["help"])
                f["max_examples"] = gr.Number(0, precision=0, label="Max examples", info=H["max_examples"]["help"])
            preview_md = gr.Markdown()
            rendered = gr.Code(label="First example as the model sees it", lines=3, max_lines=12, interactive=False,
                               visible=False, wrap_lines=True)
            gr.Markdown("### 4 · Training")
            numbers = [("lr", "Learning rate", None), ("warmup_steps", "Warmup steps", 0),
                       ("max_steps", "Max steps", 0), ("epochs", "Epochs", None), ("batch_size", "Batch size", 0),
                       ("grad_accum", "Grad accumulation", 0), ("max_seq_len", "Max seq len", 0),
                       ("val_split", "Validation split", None), ("eval_every", "Eval every", 0),
                       ("save_every", "Save every", 0), ("seed", "Seed", 0)]
            with gr.Row():
                f["scheduler"] = gr.Dropdown(list(SCHEDULERS), value=HT["scheduler"]["default"], label="LR schedule",
                                             info=HT["scheduler"]["help"])
                for key, label, precision in numbers[:3]:
                    f[key] = gr.Number(HT[key]["default"], precision=precision, label=label, info=HT[key]["help"],
                                       elem_id=f"train-{key}")
            for chunk in (numbers[3:7], numbers[7:]):
                with gr.Row():
                    for key, label, precision in chunk:
                        f[key] = gr.Number(HT[key]["default"], precision=precision, label=label, info=HT[key]["help"],
                                           elem_id=f"train-{key}")
            with gr.Accordion("More: gradient checkpointing, weight decay, clipping, logging, threads", open=False):
                f["gradient_checkpointing"] = gr.Checkbox(False, label="Gradient checkpointing",
                                                          info=HT["gradient_checkpointing"]["help"])
                helps = {**H, **HL, **HT}
                rest = [k for k in (*TRAIN_KEYS, *LORA_KEYS, *TOP_KEYS) if k not in f and k != "name"]
                for i in range(0, len(rest), 3):  # weight decay, clipping, logging, threads, and any new field
                    with gr.Row():
                        for key in rest[i:i + 3]:
                            f[key] = field_widget(key, helps[key])
        with gr.Column(scale=2):
            gr.Markdown("### Launch")
            f["name"] = gr.Textbox("", label="Run name (optional)", elem_id="run-name")
            estimate_md = gr.Markdown("Press **Inspect** to see the exact trainable parameter count.",
                                      elem_id="estimate")
            launch_btn = gr.Button("Launch", variant="primary", elem_id="launch-btn")
            launch_md = gr.Markdown(elem_id="launch-msg")
            gr.Markdown("### Live view")
            queue_md = gr.Markdown("Queue: empty.", elem_id="queue")
            with gr.Row():
                run_select = gr.Dropdown(run_choices(store), value=None, label="Run", scale=3, elem_id="run-select")
                cancel_btn = gr.Button("Cancel", variant="stop", size="sm", scale=1)
                resume_btn = gr.Button("Resume", size="sm", scale=1)
            status_md = gr.Markdown("No run yet: fill the form and press Launch.", elem_id="run-status")
            action_md = gr.Markdown()
            loss_plot = gr.Plot(loss_figure([]), label="Loss", elem_id="loss-plot")
            lr_plot = gr.Plot(lr_figure([]), label="Learning rate", elem_id="lr-plot")
            log_box = gr.Textbox(label="Log tail", lines=8, max_lines=12, interactive=False, elem_id="log-tail")
    cursor, series, timer = gr.State(0), gr.State({}), gr.Timer(1.5, active=False)
    form_inputs = [f[k] for k in FORM_FIELDS]

    # model and modules
    inspect_btn.click(partial(run_inspect, backend=backend),
                      [f["model_choice"], f["model_text"], f["trust_remote_code"], preset],
                      [anatomy_md, f["targets"], anatomy], api_name="inspect")
    for p, btn in preset_btns.items():
        btn.click(partial(apply_preset, p), [anatomy], [f["targets"], preset], api_name=f"preset_{p.replace('-', '_')}")
    f["targets"].input(clear_preset, [f["targets"]], [preset], api_name=False)
    gr.on([preset.change, f["targets"].change], targets_markdown, [preset, f["targets"]], [targets_md],
          api_name=False, show_progress="hidden")
    f["quant"].input(check_quant, [f["quant"], doctor_state], [f["quant"]], api_name=False)
    # dataset
    upload.upload(partial(upload_dataset, home=home), [upload], [f["dataset"]], api_name="upload_dataset")
    preview_btn.click(partial(preview_dataset, backend=backend),
                      [f["model_choice"], f["model_text"], f["dataset"], f["dataset_format"], f["train_on"],
                       f["max_seq_len"]], [preview_md, rendered], api_name="preview")
    # estimate next to Launch: recomputed whenever the form or the anatomy changes
    gr.on([anatomy.change, preset.change, *(c.change for c in form_inputs)], estimate_markdown,
          [anatomy, preset, doctor_state, *form_inputs], [estimate_md], api_name="estimate", show_progress="hidden",
          trigger_mode="always_last")
    launch_btn.click(partial(launch_run, runner=runner, store=store), [anatomy, preset, doctor_state, *form_inputs],
                     [launch_md, run_select, timer], api_name="launch")
    # live view
    run_select.change(select_run, [run_select], [cursor, series, timer], api_name=False)
    timer.tick(partial(poll_run, store=store, runner=runner), [run_select, cursor, series],
               [cursor, series, status_md, loss_plot, lr_plot, log_box, queue_md, timer],
               api_name="poll", show_progress="hidden")
    cancel_btn.click(partial(cancel_run, runner=runner), [run_select], [action_md], api_name="cancel")
    resume_btn.click(partial(resume_run, runner=runner, store=store), [run_select], [action_md, run_select, timer],
                     api_name="resume")
    return TrainTab(form=f, preset=preset, anatomy=anatomy, doctor=doctor_state, run_select=run_select, timer=timer,
                    quant=f["quant"], anatomy_md=anatomy_md)
