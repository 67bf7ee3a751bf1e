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
from engine.core.batching import DataFacts, facts_key
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
from engine.core.data_fields import columns_text, truncation_warning
from engine.core.devices import device_choices, gpus_from_doctor, scale_note
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


STR_KEYS = {f.name for cls in (RunConfig, LoraSpec, TrainSpec) for f in fields(cls) if f.type == "str"} | {
    "layers",
    "columns",
}


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
    form["columns"] = columns_text(c.columns)
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


def dataset_choices(home: Path, data_dirs: Sequence[Path] = ()) -> list[tuple[str, str]]:
    """The built-in sets, the uploads, and the data files of the folders the app may read (--data-dir)."""
    files = sorted(p for p in datasets_dir(Path(home)).iterdir() if p.suffix.lower() in DATASET_SUFFIXES)
    extra = [
        (f"{d.name}/{p.name}", str(p))
        for d in data_dirs
        for p in sorted(d.iterdir())
        if p.is_file() and p.suffix.lower() in DATASET_SUFFIXES
    ]
    return (
        [(f"{k} — {v.split('(')[0].strip()}", k) for k, v in BUILTIN_DATASETS.items()]
        + [(f"uploaded: {p.name}", str(p)) for p in files]
        + extra
    )


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
    model_choice: str,
    model_text: str,
    dataset: str,
    dataset_format: str,
    train_on: str,
    max_seq_len: float,
    columns: str = "",
    dataset_split: str = "",
    dataset_subset: str = "",
    text_split: str = "auto",
    max_examples: float = 0,
    val_split: float = 0.1,
    seed: float = 42,
    *,
    backend,
):
    """Preview button → [summary markdown, the first example as the model sees it, the data's token counts]."""
    model = (model_text or "").strip() or (model_choice or "").strip()
    try:
        p = backend.preview(
            model=model,
            dataset=dataset or "",
            dataset_format=dataset_format or "auto",
            train_on=train_on or "responses",
            max_seq_len=int(max_seq_len or 512),
            columns=columns or "",
            dataset_split=dataset_split or "",
            dataset_subset=dataset_subset or "",
            text_split=text_split or "auto",
            max_examples=int(max_examples or 0),
            val_split=float(val_split if val_split is not None else 0.1),
            seed=int(seed if seed is not None else 42),
        )
    except ValueError as e:  # the previous preview goes: it described another dataset or model
        return warn(f"Cannot preview: {e}"), gr.update(value="", visible=False), None
    return preview_markdown(p), gr.update(value=p["rendered_example"], visible=True), p.get("facts")


def preview_markdown(p: Mapping[str, Any]) -> str:
    """Format, rows → examples, what was dropped (per reason) or cut, token lengths, and the >1 % warning."""
    dropped = p.get("dropped") or {}
    kept = f"{p['tokens_kept']:,} of {p['tokens_total']:,} tokens kept"
    if p.get("tokens_truncated"):
        kept += f", {p['tokens_truncated']:,} cut by truncation ({p.get('rows_truncated', 0):,} rows)"
    lines = [
        f"Format **{p['format']}** · {p['rows']:,} rows → **{p['train']:,} train / {p['val']:,} val** · {kept}",
        f"Tokens per example: min {p['len_min']}, median {p['len_p50']}, p95 {p['len_p95']}, max {p['len_max']} "
        f"(longest row before truncation: {p.get('longest', p['len_max']):,})",
    ]
    if dropped:
        lines.append("Dropped: " + "; ".join(f"{n:,} {why}" for why, n in dropped.items()))
    if p.get("tools"):
        lines.append(f"Tool calls rendered with the {p['tools']} (see README, Tool calling)")
    lines += [f"Note: {n}" for n in p.get("notes") or []]
    warning = truncation_warning(p, int(p.get("max_seq_len") or 0))
    if warning:
        lines.append(f"⚠ **{warning}**")
    return "  \n".join(lines)


def train_estimate(anatomy, preset: str, doctor, facts, *values: Any) -> str:
    """The estimate handler as Gradio calls it (the previewed data's token counts before the form values)."""
    return estimate_markdown(anatomy, preset, doctor, *values, facts=facts)


def estimate_markdown(
    anatomy: Mapping[str, Any] | None,
    preset: str,
    doctor: Mapping[str, Any] | None,
    *values: Any,
    facts: Mapping[str, Any] | None = None,
) -> str:
    """Exact trainable parameter count and memory estimate shown next to Launch: sized on the previewed
    dataset's lengths when the preview matches the form, else the worst case (batch_size × max_seq_len)."""
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
    bf16 = (doctor or {}).get("bf16")  # bf16 fast here (engine doctor); None before it answered
    data = DataFacts.from_dict(facts) if facts and facts.get("key") == facts_key(cfg) else None
    try:
        est = estimate(anatomy, cfg, device, bf16_capable=bf16, data=data)
        worst = estimate(anatomy, cfg, device, bf16_capable=bf16) if data else est
    except ConfigError as e:
        return "⚠ " + "; ".join(e.problems)
    basis = (
        f"sized on the dataset: {est.batch_note}; worst case ({worst.batch_note}) {worst.total_gb:.2f} GB"
        if data
        else f"worst case: {est.batch_note}; press **Preview** to size it on the dataset's lengths"
    )
    scale = scale_note(est, cfg.train, gpus_from_doctor(doctor), anatomy.get("num_layers")) if doctor else ""
    return (
        f"{target} · {est.n_modules} modules  \n**Trainable: {est.trainable_params:,}** "
        f"({est.trainable_pct:.3f} % of {est.total_params:,})  \n"
        f"**Memory ≈ {est.total_gb:.2f} GB** on {device} ({est.compute_dtype}): weights {gb(est.weights_bytes):.2f}"
        f", LoRA + grads + AdamW {gb(est.lora_bytes + est.grad_bytes + est.optimizer_bytes):.3f}"
        f", activations {gb(est.activation_bytes):.2f}, logits {gb(est.logits_bytes):.2f}  \n{basis}"
        + (f"  \n{scale}" if scale else "")
        + auto_dtype_note(cfg, doctor)
    )


def devices_update(doctor: Mapping[str, Any] | None):
    """The devices dropdown: only what this machine has (its GPUs from `engine doctor`), auto first."""
    if not doctor:
        return gr.update(choices=device_choices([], 2))
    return gr.update(choices=device_choices(gpus_from_doctor(doctor), int(doctor.get("cpu_count") or 1)))


def auto_dtype_note(cfg: RunConfig, doctor: Mapping[str, Any] | None) -> str:
    """What `dtype: auto` chose on this machine and why (engine doctor's answer), for the estimate."""
    why = (doctor or {}).get("auto_dtype_why")
    return f"  \ndtype auto → {why}" if cfg.dtype == "auto" and why else ""


def launch_problems(cfg: RunConfig, anatomy: Mapping[str, Any] | None, doctor: Mapping[str, Any] | None):
    """(problems beyond the config's own validation, the estimate or None): quantization this machine cannot
    run, and target modules or layers the inspected model does not have."""
    problems = quant_problems(cfg.quant, doctor)
    est = None
    if anatomy and anatomy.get("model") == cfg.model:
        try:
            est = estimate(anatomy, cfg, (doctor or {}).get("device", "cuda"), bf16_capable=(doctor or {}).get("bf16"))
        except ConfigError as e:
            problems += e.problems
    return problems, est


def not_launched(problems: Sequence[str]):
    """Every problem, as a warning toast and as a list that stays next to the Launch button."""
    gr.Warning(problems_text(problems))
    return "**Not launched.** " + problems_text(problems).replace("\n• ", "\n- "), gr.skip(), gr.skip()


def launch_run(anatomy, preset, doctor, *values, runner, store, backend=None):
    """Launch button → [message, run selector, timer]: validate everything, ask the engine whether the run can
    start (`engine check`: the model resolves, the dataset parses and yields examples), then queue it.
    Without a backend (unit tests of the form alone) the engine is not asked."""
    try:
        cfg = config_from_form(dict(zip(FORM_FIELDS, values)), preset)
    except ConfigError as e:
        return not_launched(e.problems)
    problems, est = launch_problems(cfg, anatomy, doctor)
    gb_est, trainable = (est.total_gb, est.trainable_params) if est else (None, None)
    report: dict[str, Any] = {}
    if backend is not None:
        try:
            cfg = cfg.replace(dataset=backend.readable_dataset(cfg.dataset))
        except ValueError as e:
            return not_launched([*problems, str(e)])
        report = engine_check(cfg, backend)
        problems += [p for p in report["problems"] if p not in problems]
        gb_est = (report.get("estimate") or {}).get("total_gb", gb_est)
        trainable = (report.get("estimate") or {}).get("trainable_params", trainable)
    if problems:
        return not_launched(problems)
    try:
        run_id = runner.submit(cfg, name=cfg.name or None, est_mem_gb=gb_est, trainable_params=trainable)
    except ValueError as e:  # ConfigError (every problem listed), DiskSpaceError
        return not_launched(getattr(e, "problems", None) or [str(e)])
    pos = store.queue_position(run_id)
    where = f"queue position {pos}" if pos else str(store.get_run(run_id).status)
    data = report.get("data") if backend is not None else None
    warning = truncation_warning(data, cfg.train.max_seq_len) if data else None
    followed = followed_after_launch(store, run_id)  # a running run stays in view (and Cancel targets it)
    also = f"; the live view stays on the running run #{followed}" if followed != run_id else ""
    return (
        f"Run **#{run_id}** launched ({where}){also}." + (f"  \n⚠ {warning}" if warning else ""),
        gr.update(choices=run_choices(store), value=followed),
        gr.Timer(active=True),
    )


def engine_check(cfg: RunConfig, backend) -> dict[str, Any]:
    """`engine check` of the run: {ok, problems, data, estimate}; an engine that cannot answer is a problem too."""
    try:
        return backend.check(cfg)
    except ValueError as e:
        return {"ok": False, "problems": [f"the engine could not check the run: {e}"]}


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
