"""The LoRA Lab web UI: one gr.Blocks with a tab per module, built by build_app() (nothing at import time).

    demo = build_app(store, runner, home)          # Store, JobRunner, data home
    demo.launch(server_name="127.0.0.1", **launch_kwargs(home))

Tabs, in order: Train, Chat, History, Calculator, Spectra, Sweeps. Chat, Calculator and Spectra come from their
own modules (ui/chat_tab.py, ...) when those exist; each is `build_X_tab(store, runner, home, backend)`.
This package imports no torch: model work goes through ui.backend (the engine's CLI in a child process).
"""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no analytics, no version check
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import importlib
import importlib.util
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr

from ui.backend import Backend
from ui.history_tab import build_history_tab
from ui.importance_panel import prefill_kept
from ui.run_lists import wire_run_lists
from ui.train_form import FORM_FIELDS, prefill_form
from ui.train_tab import build_train_tab

OPTIONAL_TABS = {"chat": "Chat", "calculator": "Calculator", "spectra": "Spectra", "sweeps": "Sweeps"}
CSS = """
#run-status { font-size: 1.05em; }
#estimate { background: var(--block-background-fill); padding: 6px 10px; border-radius: 6px; }
.ll-progress { position: relative; height: 22px; border-radius: 6px; background: var(--block-background-fill);
  border: 1px solid var(--border-color-primary); overflow: hidden; }
.ll-bar { height: 100%; background: #4f8ff7; transition: width 0.8s; }
.ll-bar.ll-succeeded { background: #2ca02c; } .ll-bar.ll-failed { background: #d62728; }
.ll-bar.ll-cancelled { background: #999; }
.ll-progress span { position: absolute; inset: 0; text-align: center; line-height: 22px; font-size: 0.9em; }
.ll-preset-active { outline: 2px solid var(--color-accent); font-weight: 600; }
"""


def launch_kwargs(home: str | Path) -> dict[str, Any]:
    """What launch() needs beside host and port: theme and css (Gradio 6 takes them here), the exports
    folder as the only extra place files may be served from (the adapter zips), and no FastAPI schema.

    FastAPI serves its own /openapi.json without Gradio's login check; it is turned off (Gradio's
    /gradio_api/openapi.json and /gradio_api/info do check the login). POST /gradio_api/reset also answers
    without a login: in Gradio 6 it is a no-op that returns {"success": true} and touches nothing."""
    exports = Path(home) / "exports"
    exports.mkdir(parents=True, exist_ok=True)
    return {
        "theme": gr.themes.Soft(),
        "css": CSS,
        "allowed_paths": [str(exports)],
        "app_kwargs": {"openapi_url": None},
    }


def _optional_tab(name: str, store, runner, home: Path, backend) -> Any:
    module = f"ui.{name}_tab"
    if importlib.util.find_spec(module) is None:
        return None
    with gr.Tab(OPTIONAL_TABS[name], id=name):
        return getattr(importlib.import_module(module), f"build_{name}_tab")(store, runner, home, backend)


def build_app(
    store, runner, home: str | Path, *, doctor: Mapping[str, Any] | None = None, backend: Backend | None = None
) -> gr.Blocks:
    """The whole app. `doctor` (the `python -m engine doctor --json` dict) skips asking the engine at page load."""
    home = Path(home)
    backend = backend or Backend(home)
    if doctor is not None:
        backend.remember_doctor(doctor)
    with gr.Blocks(title="LoRA Lab") as demo:
        gr.Markdown("## LoRA Lab · fine-tune a causal LM with LoRA, watch it learn, compare runs")
        with gr.Tabs(selected="train") as tabs:
            with gr.Tab("Train", id="train"):
                train = build_train_tab(store, runner, home, backend, doctor=doctor)
            built: dict[str, Any] = {"train": train, "chat": _optional_tab("chat", store, runner, home, backend)}
            with gr.Tab("History", id="history") as history_tab:
                built["history"] = history = build_history_tab(store, runner, home, backend)
            built["calculator"] = _optional_tab("calculator", store, runner, home, backend)
            built["spectra"] = _optional_tab("spectra", store, runner, home, backend)
            built["sweeps"] = _optional_tab("sweeps", store, runner, home, backend)

        train.wire_load(demo, store, backend, doctor_known=doctor is not None)
        history_tab.select(*history.refresh, api_name=False, show_progress="hidden")
        demo.load(*history.refresh, api_name=False, show_progress="hidden")
        lists = [getattr(built.get(k), "refresh", None) for k in ("chat", "spectra", "calculator", "sweeps")]
        lists.append(history.compare_refresh)
        wire_run_lists(demo, store, [r for r in lists if r], on_change=[history.refresh])
        for tab in built.values():
            if getattr(tab, "on_load", None):
                demo.load(*tab.on_load, api_name=False, show_progress="hidden")
        history.relaunch_btn.click(
            partial(prefill_form, store=store),
            [history.run_pick, train.anatomy],
            [*(train.form[k] for k in FORM_FIELDS), train.preset, train.anatomy, tabs],
            api_name="relaunch",
        )
        if getattr(built.get("spectra"), "new_run", None):  # LoRA-drop: a run on the layers that matter
            button, inputs = built["spectra"].new_run
            button.click(
                partial(prefill_kept, store=store),
                [*inputs, train.anatomy],
                [*(train.form[k] for k in FORM_FIELDS), train.preset, train.anatomy, tabs],
                api_name="importance_new_run",
            )
    demo.loralab_tabs = {k: v for k, v in built.items() if v is not None}  # what each build_X_tab returned
    return demo


def close_tabs(demo: gr.Blocks) -> None:
    """End what tabs started (e.g. the chat worker process): tab.close() or tab.worker.close() where present."""
    for tab in getattr(demo, "loralab_tabs", {}).values():
        close = getattr(tab, "close", None) or getattr(getattr(tab, "worker", None), "close", None)
        if callable(close):
            close()
