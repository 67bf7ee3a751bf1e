"""The Train tab's form: widgets ↔ RunConfig, the model inspection and module checklist, quantization this
machine can run, the dataset picker and preview, the estimate next to Launch, and Launch itself.

Every handler is a plain module-level function of explicit inputs; dependencies (store, runner, home,
backend) are bound with functools.partial in ui.train_tab. The form is one dict of widgets keyed by
FORM_FIELDS, so `config_from_form(dict(zip(FORM_FIELDS, values)))` is the whole mapping.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import gradio as gr

from engine.core.anatomy import preset_kinds
from engine.core.config import (
    BUILTIN_DATASETS,
    EMBEDDED_MODEL,
    QUANT_MODES,
    TARGET_PRESETS,
    ConfigError,
    LoraSpec,
    RunConfig,
    TrainSpec,
    field_help,
)
from engine.core.estimate import estimate, gb
from engine.core.home import datasets_dir
from ui.backend import DATASET_SUFFIXES, cached_hub_models, save_upload
from ui.errors import refuse, warn
from ui.live_view import followed_after_launch, run_choices

# Form fields follow the config's dataclasses, so a field added there gets a widget (under "More") and a
# place in config_from_form without touching this file.
TOP_KEYS = tuple(f.name for f in fields(RunConfig) if f.name not in ("model", "lora", "train"))


LORA_KEYS = tuple(f.name for f in fields(LoraSpec) if f.name != "targets")


TRAIN_KEYS = tuple(f.name for f in fields(TrainSpec))


FORM_FIELDS = ("model_choice", "model_text", "targets", *TOP_KEYS, *LORA_KEYS, *TRAIN_KEYS)


STR_KEYS = {f.name for cls in (RunConfig, LoraSpec, TrainSpec) for f in fields(cls) if f.type == "str"} | {"layers"}


def targets_for(selected: Sequence[str] | None, preset: str) -> tuple[str, ...]:
    """The preset chosen with a preset button, else the module kinds ticked in the checklist."""
    return (preset,) if preset else tuple(selected or ())


def config_from_form(form: Mapping[str, Any], preset: str = "") -> RunConfig:
    """Every form field → a validated RunConfig; ConfigError lists every problem at once."""

    def val(k: str) -> Any:
        v = form[k]
        return ("" if v is None else str(v)) if k in STR_KEYS else v

    model = (form["model_text"] or "").strip() or (form["model_choice"] or "").strip()
    d = {
        "model": model,
        **{k: val(k) for k in TOP_KEYS},
        "lora": {**{k: val(k) for k in LORA_KEYS}, "targets": list(targets_for(form["targets"], preset))},
        "train": {k: val(k) for k in TRAIN_KEYS},
    }
    return RunConfig.from_dict(d)


def form_from_config(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The inverse of config_from_form: (form values by FORM_FIELDS, preset) for a config dict."""
    c = RunConfig.from_dict(cfg)
    d = c.to_dict()
    targets = list(c.lora.targets)
    preset = targets[0] if targets and targets[0] in TARGET_PRESETS else ""
    form = {
        "model_choice": EMBEDDED_MODEL,
        "model_text": "" if c.model == EMBEDDED_MODEL else c.model,
        "targets": [] if preset else targets,
        **{k: d[k] for k in TOP_KEYS},
        **{k: d["lora"][k] for k in LORA_KEYS},
        **{k: d["train"][k] for k in TRAIN_KEYS},
    }
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


def model_choices() -> list[str]:
    return [EMBEDDED_MODEL, *cached_hub_models()]


def kind_choices(anatomy: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """(label, kind) per LoRA-able module kind, grouped: 'attention · q_proj ×30 · 576→576'."""
    if not anatomy:
        return []
    kinds = sorted(anatomy["kinds"], key=lambda k: (k["group"] != "attention", k["group"] != "mlp", k["group"]))
    return [
        (
            f"{k['group']} · {k.get('target', k['kind'])} ×{k['count']} · {k['in_features']}→{k['out_features']}",
            k.get("target", k["kind"]),
        )
        for k in kinds
    ]


def anatomy_markdown(a: Mapping[str, Any]) -> str:
    groups: dict[str, int] = {}
    for k in a["kinds"]:
        groups[k["group"]] = groups.get(k["group"], 0) + k["count"]
    return (
        f"**{a['architecture']}** ({a['model_type']}) · {a['total_params']:,} parameters · "
        f"{a['num_layers']} layers (0–{int(a['num_layers']) - 1}) · hidden {a['hidden_size']} · heads "
        f"{a['num_attention_heads']} (kv {a['num_key_value_heads']}) · vocab {a['vocab_size']:,}  \n"
        f"LoRA-able linear layers: {len(a['modules'])} (" + ", ".join(f"{g} {n}" for g, n in groups.items()) + ")"
    )


def run_inspect(model_choice: str, model_text: str, trust_remote_code: bool, preset: str, *, backend):
    """Inspect button → [anatomy text, module checklist, anatomy state]."""
    model = (model_text or "").strip() or (model_choice or "").strip()
    try:
        a = backend.inspect(model, bool(trust_remote_code))
    except ValueError as e:  # the whole message, and the previous model's anatomy and modules cleared
        return warn(f"Cannot inspect {model!r}: {e}"), gr.update(choices=[], value=[]), None
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
        warn(p)
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


def dataset_choices(home: Path) -> list[tuple[str, str]]:
    files = sorted(p for p in datasets_dir(Path(home)).iterdir() if p.suffix.lower() in DATASET_SUFFIXES)
    return [(f"{k} — {v.split('(')[0].strip()}", k) for k, v in BUILTIN_DATASETS.items()] + [
        (f"uploaded: {p.name}", str(p)) for p in files
    ]


def upload_dataset(path: str | None, *, home: Path):
    """Upload button → the dataset dropdown, now holding and showing the stored copy.

    Only a file Gradio received from the browser (inside its upload folder) is accepted, whatever path a
    client posts; it is moved into the data home, so no copy stays in Gradio's temp folder."""
    if not path:
        return gr.skip()
    from gradio.utils import get_upload_folder

    try:
        dest = save_upload(path, home, inside=Path(get_upload_folder()), move=True)
    except (ValueError, OSError) as e:
        raise refuse(str(e)) from None
    gr.Info(f"Stored as {dest.name} in the data home")
    return gr.update(choices=dataset_choices(home), value=str(dest))


def preview_dataset(
    model_choice: str, model_text: str, dataset: str, dataset_format: str, train_on: str, max_seq_len: float, *, backend
):
    """Preview button → [summary markdown, the first example as the model sees it]."""
    model = (model_text or "").strip() or (model_choice or "").strip()
    try:
        p = backend.preview(
            model=model,
            dataset=dataset or "",
            dataset_format=dataset_format or "auto",
            train_on=train_on or "responses",
            max_seq_len=int(max_seq_len or 512),
        )
    except ValueError as e:  # the previous preview goes: it described another dataset or model
        return warn(f"Cannot preview: {e}"), gr.update(value="", visible=False)
    md = (
        f"Format **{p['format']}** · {p['rows']:,} rows → **{p['train']:,} train / {p['val']:,} val**"
        + (f" ({p['dropped']} dropped)" if p.get("dropped") else "")
        + f" · tokens per example: min {p['len_min']}, median {p['len_p50']}, p95 {p['len_p95']}, "
        f"max {p['len_max']} ({p['tokens_total']:,} in all)"
    )
    return md, gr.update(value=p["rendered_example"], visible=True)


def estimate_markdown(
    anatomy: Mapping[str, Any] | None, preset: str, doctor: Mapping[str, Any] | None, *values: Any
) -> str:
    """Exact trainable parameter count and memory estimate shown next to Launch."""
    form = dict(zip(FORM_FIELDS, values))
    try:
        cfg = config_from_form(form, preset)
    except ConfigError as e:
        return f"Estimate waits for a valid form: {e.problems[0]}" + (
            f" (+{len(e.problems) - 1} more)" if len(e.problems) > 1 else ""
        )
    target = targets_markdown(preset, form["targets"])
    if not anatomy or anatomy.get("model") != cfg.model:
        return f"{target}  \nPress **Inspect** to see the exact trainable parameter count and the memory estimate."
    device = (doctor or {}).get("device", "cuda")
    try:
        est = estimate(anatomy, cfg, device, bf16_capable=bool((doctor or {}).get("bf16", True)))
    except ConfigError as e:
        return "⚠ " + "; ".join(e.problems)
    return (
        f"{target} · {est.n_modules} modules  \n**Trainable: {est.trainable_params:,}** "
        f"({est.trainable_pct:.3f} % of {est.total_params:,})  \n"
        f"**Memory ≈ {est.total_gb:.2f} GB** on {device} ({est.compute_dtype}): weights {gb(est.weights_bytes):.2f}"
        f", LoRA + grads + AdamW {gb(est.lora_bytes + est.grad_bytes + est.optimizer_bytes):.3f}"
        f", activations {gb(est.activation_bytes):.2f}, logits {gb(est.logits_bytes):.2f}"
    )


def launch_problems(cfg: RunConfig, anatomy: Mapping[str, Any] | None, doctor: Mapping[str, Any] | None):
    """(problems beyond the config's own validation, the estimate or None): quantization this machine cannot
    run, and target modules or layers the inspected model does not have."""
    problems = quant_problems(cfg.quant, doctor)
    est = None
    if anatomy and anatomy.get("model") == cfg.model:
        try:
            est = estimate(
                anatomy, cfg, (doctor or {}).get("device", "cuda"), bf16_capable=bool((doctor or {}).get("bf16", True))
            )
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
        run_id = runner.submit(
            cfg,
            name=cfg.name or None,
            est_mem_gb=est.total_gb if est else None,
            trainable_params=est.trainable_params if est else None,
        )
    except ValueError as e:  # ConfigError (every problem listed), DiskSpaceError
        return not_launched(getattr(e, "problems", None) or [str(e)])
    pos = store.queue_position(run_id)
    where = f"queue position {pos}" if pos else str(store.get_run(run_id).status)
    followed = followed_after_launch(store, run_id)  # a running run stays in view (and Cancel targets it)
    also = f"; the live view stays on the running run #{followed}" if followed != run_id else ""
    return (
        f"Run **#{run_id}** launched ({where}){also}.",
        gr.update(choices=run_choices(store), value=followed),
        gr.Timer(active=True),
    )


def prefill_form(run_id: int | None, anatomy: Mapping[str, Any] | None, *, store):
    """History's Relaunch → [every form widget..., preset, anatomy, tabs]: the run's config in the form."""
    if run_id is None:
        raise refuse("Choose a run first")
    form, preset = form_from_config(store.get_run(int(run_id)).config)
    model = form["model_text"] or form["model_choice"]
    if anatomy and anatomy.get("model") == model:
        ticks = preset_kinds(anatomy, preset) if preset else form["targets"]
        targets = gr.update(choices=kind_choices(anatomy), value=ticks)
    else:
        anatomy = None
        targets = gr.update(choices=[(t, t) for t in form["targets"]], value=form["targets"])
    gr.Info(f"Form filled from run #{run_id}; change what you like and press Launch")
    return [*(targets if k == "targets" else form[k] for k in FORM_FIELDS), preset, anatomy, gr.Tabs(selected="train")]


def field_widget(name: str, meta: Mapping[str, Any]):
    """A widget for a config field that has no hand-placed one, chosen by its default's type."""
    default, info = meta["default"], meta["help"]
    if "choices" in meta:
        return gr.Dropdown(list(meta["choices"]), value=default, label=name, info=info)
    if isinstance(default, bool):
        return gr.Checkbox(default, label=name, info=info)
    if isinstance(default, (int, float)):
        return gr.Number(default, precision=0 if isinstance(default, int) else None, label=name, info=info)
    return gr.Textbox(
        ",".join(map(str, default)) if isinstance(default, tuple) else str(default), label=name, info=info
    )
