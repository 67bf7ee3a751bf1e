"""The Chat tab's Export accordion: a run's adapter as a zip (with its model card), base + adapter merged into
a folder (`python -m engine export ID --merged DIR` in a child process), or a push to the Hugging Face Hub.

A merged export never replaces a folder unless "replace an earlier merged export" is ticked, and then only a
folder LoRA Lab merged into before. The token typed here is used for that upload only, never stored or logged.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import gradio as gr

from engine.core.export import ExportError, check_merge_target, export_adapter_zip, push_adapter, redact, stored_summary
from engine.core.runs import merged_path, saved_adapter
from storage import RunStatus
from ui.errors import refuse
from ui.gguf_panel import gguf_row, wire_gguf


def finished_runs(store) -> list:
    """Runs with a saved adapter (succeeded, or cancelled after saving), newest first."""
    return [
        r
        for r in store.list_runs(status=[RunStatus.SUCCEEDED.value, RunStatus.CANCELLED.value])
        if saved_adapter(r) is not None
    ]


def run_label(r) -> str:
    loss = f"loss {r.final_loss:.2f}" if r.final_loss is not None else "no loss"
    return f"run {r.id} · {r.name or Path(str(r.config.get('model', ''))).name} · {loss}"


def export_choices(store) -> list[tuple[str, int]]:
    return [(run_label(r), r.id) for r in finished_runs(store)]


def _run_for_export(run_id, store):
    if run_id in (None, ""):
        raise refuse("Choose a run to export")
    r = store.get_run(int(run_id))
    if saved_adapter(r) is None:
        raise refuse(f"run #{r.id} has no saved adapter")
    return r


def export_zip(run_id, *, store, home: Path):
    r = _run_for_export(run_id, store)
    out = export_adapter_zip(r, store, home)
    return gr.update(value=str(out), visible=True), f"Adapter of run #{r.id} zipped with its model card: `{out}`"


def export_merged(run_id, folder, overwrite=False, *, store, home: Path, backend) -> str:
    """`python -m engine export ID --merged DIR [--force]` through the backend (merging needs torch).

    --force only when the user ticked "replace an earlier merged export"; even then the engine replaces
    nothing but a merged folder it wrote itself (engine.core.export.check_merge_target).
    """
    r = _run_for_export(run_id, store)
    out = (folder or "").strip() or str(merged_path(home, r.id))
    try:
        check_merge_target(out, home, bool(overwrite))  # the same rule the engine applies: refused at once
        backend.run_text(["export", str(r.id), "--merged", out] + (["--force"] if overwrite else []))
    except (ValueError, ExportError) as e:
        raise refuse(str(e)) from None
    return f"Merged model of run #{r.id} (base + adapter, merge_and_unload) saved to `{out}`"


def push_to_hub(run_id, repo, token, private, merged, *, store, home: Path, backend) -> str:
    """Adapter pushes run here (huggingface_hub only); a merged push needs torch: a child process, token in its env."""
    r = _run_for_export(run_id, store)
    repo = (repo or "").strip()
    token = (token or "").strip() or None
    if merged:
        try:
            return redact(
                backend.run_text(
                    ["push", str(r.id), "--repo", repo, "--merged"] + ([] if private else ["--public"]),
                    env={"HF_TOKEN": token} if token else None,
                ),
                token,
            )
        except ValueError as e:
            raise refuse(redact(str(e), token)) from None
    try:
        url = push_adapter(r, repo, token=token, private=bool(private), spectra=stored_summary(store, r.id), home=home)
    except ExportError as e:
        raise refuse(redact(str(e), token)) from None
    return f"Pushed the adapter of run #{r.id} to {url} ({'private' if private else 'public'})"


def export_panel(store, home: Path, backend):
    """The Export accordion (adapter zip, merged model, Hub push, GGUF), wired; returns its run picker."""
    with gr.Accordion("Export a run: adapter zip, merged model, Hugging Face Hub, GGUF", open=False):
        runs = finished_runs(store)
        export_run = gr.Dropdown(
            [(run_label(r), r.id) for r in runs],
            value=runs[0].id if runs else None,
            label="Run",
            elem_id="chat-export-run",
        )
        with gr.Row():
            zip_btn = gr.Button("Download adapter zip", size="sm")
            merged_dir = gr.Textbox(
                label="Merged model folder", placeholder=str(home / "exports" / "run-N-merged"), scale=3
            )
            overwrite = gr.Checkbox(
                False,
                label="replace an earlier merged export",
                info="only a folder LoRA Lab merged into before; never other files",
                elem_id="chat-export-overwrite",
            )
            merge_btn = gr.Button("Save merged model to folder", size="sm")
        zip_file = gr.File(label="Adapter zip", visible=False, interactive=False)
        with gr.Row():
            repo = gr.Textbox(label="Hub repo", placeholder="your-name/pirate-lora", scale=2)
            token = gr.Textbox(
                label="HF token (write)",
                type="password",
                scale=2,
                info="empty = HF_TOKEN or `hf auth login`; used for this upload only, never stored",
            )
            private = gr.Checkbox(True, label="private")
            push_merged = gr.Checkbox(False, label="push the merged model")
            push_btn = gr.Button("Push to Hub", size="sm")
        gguf = gguf_row(home)
        export_md = gr.Markdown()
    wire_gguf(gguf, export_run, export_md, store=store, home=home, backend=backend)
    zip_btn.click(
        partial(export_zip, store=store, home=home), [export_run], [zip_file, export_md], api_name="chat_export_zip"
    )
    merge_btn.click(
        partial(export_merged, store=store, home=home, backend=backend),
        [export_run, merged_dir, overwrite],
        [export_md],
        api_name="chat_export_merged",
    )
    push_btn.click(
        partial(push_to_hub, store=store, home=home, backend=backend),
        [export_run, repo, token, private, push_merged],
        [export_md],
        api_name="chat_push",
    )
    return export_run
