"""The GGUF row of the Chat tab's Export panel: a run as a merged GGUF model or as a llama.cpp LoRA adapter
GGUF, each with an Ollama Modelfile beside it. The work is `python -m engine export ID --gguf ...` in a child
process (ui.backend: this server never imports torch or the GGUF writers); the row shows its final line.

    row = gguf_row(home)                                   # inside the Export accordion
    wire_gguf(row, export_run, export_md, store=store, home=home, backend=backend)

An existing file is replaced only when "overwrite" is ticked (the CLI's --force).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from engine.core.runs import gguf_path
from ui.errors import refuse

DEFAULT = "default"
TYPES = [DEFAULT, "f16", "bf16", "q8_0", "f32"]


def export_gguf(run_id, path, kind, overwrite, *, adapter: bool, store, home: Path, backend) -> str:
    """`python -m engine export ID --gguf[-adapter] OUT [--gguf-type T] [--force]`; its final line, shown as is."""
    from ui.export_panel import _run_for_export  # the panel's one rule for which runs can be exported

    r = _run_for_export(run_id, store)
    out = (path or "").strip() or str(gguf_path(home, r.id, adapter=adapter))
    args = ["export", str(r.id), "--gguf-adapter" if adapter else "--gguf", out]
    args += [] if kind in (None, "", DEFAULT) else ["--gguf-type", str(kind)]
    args += ["--force"] if overwrite else []
    try:
        return backend.run_text(args)
    except ValueError as e:
        raise refuse(str(e)) from None


def gguf_row(home: Path) -> SimpleNamespace:
    """The row's components (built where it is called)."""
    w = SimpleNamespace()
    with gr.Row():
        w.kind = gr.Dropdown(
            TYPES,
            value=DEFAULT,
            label="GGUF type",
            scale=1,
            info="default: f16 for the model, f32 for the adapter",
            elem_id="chat-gguf-type",
        )
        w.path = gr.Textbox(
            label="GGUF file (an Ollama .Modelfile is written beside it)",
            placeholder=str(Path(home) / "exports" / "run-N.gguf"),
            scale=3,
            elem_id="chat-gguf-path",
        )
        w.overwrite = gr.Checkbox(False, label="overwrite", elem_id="chat-gguf-overwrite")
        w.merged_btn = gr.Button("Save merged GGUF", size="sm", elem_id="chat-gguf-merged")
        w.adapter_btn = gr.Button("Save adapter GGUF", size="sm", elem_id="chat-gguf-adapter")
    return w


def wire_gguf(w: SimpleNamespace, export_run, export_md, *, store, home: Path, backend) -> None:
    inputs = [export_run, w.path, w.kind, w.overwrite]
    for btn, adapter, name in (
        (w.merged_btn, False, "chat_export_gguf"),
        (w.adapter_btn, True, "chat_export_gguf_adapter"),
    ):
        btn.click(
            partial(export_gguf, adapter=adapter, store=store, home=home, backend=backend),
            inputs,
            [export_md],
            api_name=name,
        )
