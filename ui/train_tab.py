"""Train tab: the form (model, LoRA, dataset, training) → RunConfig → JobRunner.submit, and the live view.

The layout is built here in four form sections and the launch column; what the widgets do lives in
ui.train_form (form ↔ config, inspect, preview, estimate, launch) and ui.live_view (queue, status, plots).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr

from engine.core.config import (
    DATASET_FORMATS,
    DTYPES,
    EMBEDDED_MODEL,
    INITS,
    SCHEDULERS,
    TEXT_SPLITS,
    TRAIN_ON,
    field_help,
)
from engine.core.devices import STRATEGIES
from ui.backend import DATASET_SUFFIXES
from ui.live_view import attach, cancel_run, poll_run, resume_run, run_choices, select_run
from ui.plots import loss_figure, lr_figure
from ui.train_form import (
    FORM_FIELDS,
    LORA_KEYS,
    TOP_KEYS,
    TRAIN_KEYS,
    apply_preset,
    check_quant,
    clear_preset,
    dataset_choices,
    devices_update,
    field_widget,
    launch_run,
    load_machine,
    model_choices,
    preview_dataset,
    quant_update,
    restore_inspection,
    run_inspect,
    targets_markdown,
    train_estimate,
    upload_dataset,
)

PRESET_BUTTONS = (("qv", "q,v"), ("attention", "attention"), ("mlp", "MLP"), ("all-linear", "all-linear"))


def preset_variant(preset: str, active: str) -> str:
    return "primary" if preset == active else "secondary"


def preset_buttons(active: str) -> list:
    """The preset buttons, the active one highlighted (none when modules were ticked by hand)."""
    return [gr.update(variant=preset_variant(p, active)) for p, _ in PRESET_BUTTONS]


NUMBERS = [
    ("lr", "Learning rate", None),
    ("warmup_steps", "Warmup steps", 0),
    ("max_steps", "Max steps", 0),
    ("epochs", "Epochs", None),
    ("batch_size", "Batch size", 0),
    ("grad_accum", "Grad accumulation", 0),
    ("max_seq_len", "Max seq len", 0),
    ("val_split", "Validation split", None),
    ("eval_every", "Eval every", 0),
    ("save_every", "Save every", 0),
    ("seed", "Seed", 0),
]


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
        demo.load(
            partial(restore_inspection, backend=backend),
            [self.form[k] for k in ("model_choice", "model_text", "trust_remote_code")] + [self.preset],
            [self.anatomy_md, self.form["targets"], self.anatomy],
            show_progress="hidden",
            api_name=False,
        )
        demo.load(
            partial(attach, store=store), None, [self.run_select, self.timer], show_progress="hidden", api_name=False
        )
        if not doctor_known:
            demo.load(
                partial(load_machine, backend=backend),
                None,
                [self.quant, self.doctor],
                show_progress="hidden",
                api_name=False,
            )


def build_train_tab(store, runner, home: Path, backend, *, doctor: Mapping[str, Any] | None = None) -> TrainTab:
    f: dict[str, Any] = {}
    w = SimpleNamespace(
        preset=gr.State("all-linear"), anatomy=gr.State(None), doctor=gr.State(doctor), facts=gr.State(None)
    )
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            model_section(f, w)
            lora_section(f, w, doctor)
            dataset_section(f, w, home, getattr(backend, "data_dirs", []))
            training_section(f, doctor)
        with gr.Column(scale=2):
            launch_column(f, w, store)
    w.cursor, w.series, w.timer = gr.State(0), gr.State({}), gr.Timer(1.5, active=False)
    wire_form(f, w, home, backend)
    w.doctor.change(devices_update, [w.doctor], [f["devices"]], api_name=False, show_progress="hidden")
    wire_launch(f, w, store, runner, backend)
    return TrainTab(
        form=f,
        preset=w.preset,
        anatomy=w.anatomy,
        doctor=w.doctor,
        run_select=w.run_select,
        timer=w.timer,
        quant=f["quant"],
        anatomy_md=w.anatomy_md,
    )


def model_section(f: dict[str, Any], w) -> None:
    H = field_help()
    gr.Markdown("### 1 · Base model")
    with gr.Row():
        f["model_choice"] = gr.Dropdown(
            model_choices(),
            value=EMBEDDED_MODEL,
            label="Base model",
            info="The embedded default, then models in your Hugging Face cache",
            scale=3,
        )
        f["model_text"] = gr.Textbox(
            label="…or a hub id / local folder",
            scale=3,
            elem_id="model-text",
            placeholder="HuggingFaceTB/SmolLM2-360M-Instruct or /path/to/model",
        )
        w.inspect_btn = gr.Button("Inspect", scale=1, elem_id="inspect-btn")
    f["trust_remote_code"] = gr.Checkbox(False, label="trust_remote_code", info=H["trust_remote_code"]["help"])
    w.anatomy_md = gr.Markdown("Press **Inspect** to list the model's LoRA-able modules.")


def lora_section(f: dict[str, Any], w, doctor: Mapping[str, Any] | None) -> None:
    H, HL = field_help(), field_help("lora")
    gr.Markdown("### 2 · LoRA")
    with gr.Row():
        w.preset_btns = {
            p: gr.Button(label, size="sm", variant=preset_variant(p, "all-linear"), elem_id=f"preset-{p}")
            for p, label in PRESET_BUTTONS
        }
    f["targets"] = gr.CheckboxGroup([], label="Target modules", info=HL["targets"]["help"])
    w.targets_md = gr.Markdown(targets_markdown("all-linear", []))
    with gr.Row():
        f["layers"] = gr.Textbox("", label="Layers", placeholder="all (or 0-11, 0,2,4-6)", info=HL["layers"]["help"])
        # Numbers, not sliders: a slider snaps an out-of-range value (r = 0 → 1) instead of letting the
        # form's validation refuse it with the other problems.
        f["r"] = gr.Number(HL["r"]["default"], precision=0, label="Rank r", info=HL["r"]["help"], elem_id="lora-r")
    with gr.Row():
        f["alpha"] = gr.Number(HL["alpha"]["default"], label="Alpha α", info=HL["alpha"]["help"], elem_id="lora-alpha")
        f["dropout"] = gr.Number(
            HL["dropout"]["default"], step=0.01, label="Dropout", info=HL["dropout"]["help"], elem_id="lora-dropout"
        )
    with gr.Accordion("LoRA variants: rsLoRA, DoRA, PiSSA/OLoRA, LoRA+, LoRA-FA", open=False):
        with gr.Row():
            f["use_rslora"] = gr.Checkbox(False, label="rsLoRA", info=HL["use_rslora"]["help"])
            f["use_dora"] = gr.Checkbox(False, label="DoRA", info=HL["use_dora"]["help"])
            f["freeze_A"] = gr.Checkbox(False, label="LoRA-FA (freeze A)", info=HL["freeze_A"]["help"])
        with gr.Row():
            f["init"] = gr.Radio(list(INITS), value="gaussian", label="Init", info=HL["init"]["help"])
            f["loraplus_lr_ratio"] = gr.Number(
                0.0, label="LoRA+ ratio (lr_B / lr_A)", info=HL["loraplus_lr_ratio"]["help"]
            )
    with gr.Row():
        q0 = quant_update(doctor)
        f["quant"] = gr.Radio(q0["choices"], value="none", label="Quantization of the base", info=q0["info"])
        f["dtype"] = gr.Radio(list(DTYPES), value="auto", label="Compute dtype", info=H["dtype"]["help"])


def dataset_section(f: dict[str, Any], w, home: Path, data_dirs=()) -> None:
    H = field_help()
    gr.Markdown("### 3 · Dataset")
    with gr.Row():
        f["dataset"] = gr.Dropdown(
            dataset_choices(home, data_dirs),
            value="builtin:persona",
            label="Dataset",
            allow_custom_value=True,
            info=H["dataset"]["help"],
            scale=3,
            elem_id="dataset",
        )
        w.upload = gr.UploadButton(
            "Upload a data file", file_types=list(DATASET_SUFFIXES), scale=1, elem_id="dataset-upload"
        )
        w.preview_btn = gr.Button("Preview", scale=1, elem_id="preview-btn")
    with gr.Row():
        f["dataset_format"] = gr.Dropdown(
            list(DATASET_FORMATS), value="auto", label="Format", info=H["dataset_format"]["help"]
        )
        f["train_on"] = gr.Radio(list(TRAIN_ON), value="responses", label="Loss on", info=H["train_on"]["help"])
        f["max_examples"] = gr.Number(0, precision=0, label="Max examples", info=H["max_examples"]["help"])
    with gr.Row():
        f["columns"] = gr.Textbox(
            "", label="Column mapping", placeholder="prompt=question, response=answer", info=H["columns"]["help"]
        )
        f["dataset_split"] = gr.Textbox("", label="Split", placeholder="train", info=H["dataset_split"]["help"])
        f["dataset_subset"] = gr.Textbox("", label="Subset", info=H["dataset_subset"]["help"])
        f["text_split"] = gr.Dropdown(
            list(TEXT_SPLITS), value="auto", label="Plain text split", info=H["text_split"]["help"]
        )
    w.preview_md = gr.Markdown(elem_id="preview-md")
    w.rendered = gr.Code(
        label="First example as the model sees it",
        lines=3,
        max_lines=12,
        interactive=False,
        visible=False,
        wrap_lines=True,
    )


def training_section(f: dict[str, Any], doctor: Mapping[str, Any] | None = None) -> None:
    H, HL, HT = field_help(), field_help("lora"), field_help("train")
    gr.Markdown("### 4 · Training")
    with gr.Row():
        f["scheduler"] = gr.Dropdown(
            list(SCHEDULERS), value=HT["scheduler"]["default"], label="LR schedule", info=HT["scheduler"]["help"]
        )
        for key, label, precision in NUMBERS[:3]:
            f[key] = gr.Number(
                HT[key]["default"], precision=precision, label=label, info=HT[key]["help"], elem_id=f"train-{key}"
            )
    for chunk in (NUMBERS[3:7], NUMBERS[7:]):
        with gr.Row():
            for key, label, precision in chunk:
                f[key] = gr.Number(
                    HT[key]["default"], precision=precision, label=label, info=HT[key]["help"], elem_id=f"train-{key}"
                )
    with gr.Row():  # scale-out: data-parallel processes (torchrun), choices from this machine's GPUs
        f["devices"] = gr.Dropdown(
            devices_update(doctor)["choices"],
            value="auto",
            allow_custom_value=True,
            label="Devices",
            info=HT["devices"]["help"],
        )
        f["strategy"] = gr.Radio(list(STRATEGIES), value="ddp", label="Strategy", info=HT["strategy"]["help"])
    with gr.Accordion("More: gradient checkpointing, weight decay, clipping, logging, threads", open=False):
        f["gradient_checkpointing"] = gr.Checkbox(
            False, label="Gradient checkpointing", info=HT["gradient_checkpointing"]["help"]
        )
        helps = {**H, **HL, **HT}
        rest = [k for k in (*TRAIN_KEYS, *LORA_KEYS, *TOP_KEYS) if k not in f and k != "name"]
        for i in range(0, len(rest), 3):  # weight decay, clipping, logging, threads, and any new field
            with gr.Row():
                for key in rest[i : i + 3]:
                    f[key] = field_widget(key, helps[key])


def launch_column(f: dict[str, Any], w, store) -> None:
    gr.Markdown("### Launch")
    f["name"] = gr.Textbox("", label="Run name (optional)", elem_id="run-name")
    w.estimate_md = gr.Markdown("Press **Inspect** to see the exact trainable parameter count.", elem_id="estimate")
    w.launch_btn = gr.Button("Launch", variant="primary", elem_id="launch-btn")
    w.launch_md = gr.Markdown(elem_id="launch-msg")
    gr.Markdown("### Live view")
    w.queue_md = gr.Markdown("Queue: empty.", elem_id="queue")
    with gr.Row():
        w.run_select = gr.Dropdown(run_choices(store), value=None, label="Run", scale=3, elem_id="run-select")
        w.cancel_btn = gr.Button("Cancel", variant="stop", size="sm", scale=1, elem_id="cancel-btn")
        w.resume_btn = gr.Button("Resume", size="sm", scale=1)
    w.status_md = gr.Markdown("No run yet: fill the form and press Launch.", elem_id="run-status")
    w.progress = gr.HTML("", elem_id="run-progress")
    w.action_md = gr.Markdown(elem_id="run-action")
    w.loss_plot = gr.Plot(loss_figure([]), label="Loss", elem_id="loss-plot")
    w.lr_plot = gr.Plot(lr_figure([]), label="Learning rate", elem_id="lr-plot")
    w.log_box = gr.Textbox(
        label="Log tail (the end of train.log)",
        lines=12,
        max_lines=12,
        interactive=False,
        autoscroll=True,
        elem_id="log-tail",
    )


def wire_form(f: dict[str, Any], w, home: Path, backend) -> None:
    """Inspect, presets, checklist, quantization check, upload and preview."""
    w.inspect_btn.click(
        partial(run_inspect, backend=backend),
        [f["model_choice"], f["model_text"], f["trust_remote_code"], w.preset],
        [w.anatomy_md, f["targets"], w.anatomy],
        api_name="inspect",
    )
    for p, btn in w.preset_btns.items():
        btn.click(
            partial(apply_preset, p), [w.anatomy], [f["targets"], w.preset], api_name=f"preset_{p.replace('-', '_')}"
        )
    f["targets"].input(clear_preset, [f["targets"]], [w.preset], api_name=False)
    w.preset.change(preset_buttons, [w.preset], list(w.preset_btns.values()), api_name=False, show_progress="hidden")
    gr.on(
        [w.preset.change, f["targets"].change],
        targets_markdown,
        [w.preset, f["targets"]],
        [w.targets_md],
        api_name=False,
        show_progress="hidden",
    )
    f["quant"].input(check_quant, [f["quant"], w.doctor], [f["quant"]], api_name=False)
    w.upload.upload(partial(upload_dataset, home=home), [w.upload], [f["dataset"]], api_name="upload_dataset")
    preview_inputs = ["dataset", "dataset_format", "train_on", "max_seq_len", "columns", "dataset_split"]
    preview_inputs += ["dataset_subset", "text_split", "max_examples", "val_split", "seed"]
    w.preview_btn.click(
        partial(preview_dataset, backend=backend),
        [f["model_choice"], f["model_text"], *(f[k] for k in preview_inputs)],
        [w.preview_md, w.rendered, w.facts],
        api_name="preview",
    )


def wire_launch(f: dict[str, Any], w, store, runner, backend=None) -> None:
    """The estimate next to Launch (recomputed whenever the form, the anatomy or the previewed data change),
    Launch (checked by the engine first), the live view."""
    form_inputs = [f[k] for k in FORM_FIELDS]
    gr.on(
        [w.anatomy.change, w.preset.change, w.facts.change, *(c.change for c in form_inputs)],
        train_estimate,
        [w.anatomy, w.preset, w.doctor, w.facts, *form_inputs],
        [w.estimate_md],
        api_name="estimate",
        show_progress="hidden",
        trigger_mode="always_last",
    )
    w.launch_btn.click(
        partial(launch_run, runner=runner, store=store, backend=backend),
        [w.anatomy, w.preset, w.doctor, *form_inputs],
        [w.launch_md, w.run_select, w.timer],
        api_name="launch",
    )
    w.run_select.change(select_run, [w.run_select], [w.cursor, w.series, w.timer], api_name=False)
    w.timer.tick(
        partial(poll_run, store=store, runner=runner),
        [w.run_select, w.cursor, w.series],
        [
            w.cursor,
            w.series,
            w.status_md,
            w.loss_plot,
            w.lr_plot,
            w.log_box,
            w.queue_md,
            w.timer,
            w.progress,
            w.run_select,
        ],
        api_name="poll",
        show_progress="hidden",
    )
    w.cancel_btn.click(partial(cancel_run, runner=runner), [w.run_select], [w.action_md], api_name="cancel")
    w.resume_btn.click(
        partial(resume_run, runner=runner, store=store),
        [w.run_select],
        [w.action_md, w.run_select, w.timer],
        api_name="resume",
    )
