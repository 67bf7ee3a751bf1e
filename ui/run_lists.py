"""Run pickers that follow the runs: every list of runs (Chat panes and Export, Spectra, History) is filled
when the page loads and again whenever a run is queued, starts, ends or is deleted, without pressing ↻.

    wire_run_lists(demo, store, [(fn, inputs, outputs), ...])     # in ui.build_app

A gr.Timer asks the store for its status counts and newest id every POLL_S seconds (one small query);
only when they changed does a gr.State take the new value, and its change event refreshes each list.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from typing import Any

import gradio as gr

POLL_S = 3.0


def runs_signature(store) -> str:
    """What changes whenever a run is added, changes status or is deleted."""
    newest = store.list_runs(limit=1)
    return json.dumps([store.counts_by_status(), newest[0].id if newest else 0], sort_keys=True)


def tick(last: str, *, store):
    """Timer tick → the new signature, or gr.skip() when nothing changed (no refresh)."""
    sig = runs_signature(store)
    return gr.skip() if sig == last else sig


def wire_run_lists(demo, store, on_load: Sequence[Any], on_change: Sequence[Any] = ()) -> gr.Timer:
    """Each (fn, inputs, outputs) of on_load runs at page load and on every change of the runs; those of
    on_change (already loaded elsewhere) only on a change."""
    hidden = {"api_name": False, "show_progress": "hidden"}
    sig = gr.State("")
    timer = gr.Timer(POLL_S)
    timer.tick(partial(tick, store=store), [sig], [sig], **hidden)
    for fn, inputs, outputs in on_load:
        demo.load(fn, inputs, outputs, **hidden)
    for fn, inputs, outputs in (*on_load, *on_change):
        sig.change(fn, inputs, outputs, **hidden)
    return timer
