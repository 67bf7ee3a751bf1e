"""History tab: every run in a sortable, filterable table; one run's config, figures and curves; several
runs overlaid (x = step, epoch or tokens seen; EMA smoothing) with a diff of their configs; relaunch,
delete (row and files, after a confirmation) and the adapter as a zip.

Handlers are plain module-level functions; store, runner and home are bound with functools.partial.
"Relaunch" is wired in ui.build_app, because it fills the Train tab's form.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from engine.core.events import format_duration
from engine.core.export import ExportError, export_adapter_zip
from engine.core.runs import best_info, deletable_folder
from storage import RunStatus
from ui.compare_panel import build_compare_panel
from ui.errors import refuse, warn
from ui.plots import compare_figure, loss_figure, lr_figure, reindex

COLUMNS = [
    "id",
    "name",
    "status",
    "model",
    "targets",
    "r",
    "α",
    "quant",
    "final loss",
    "best val loss",
    "duration s",
    "peak GB",
    "est. GB",
    "created",
]
COLUMN_WIDTHS = [
    "55px", "160px", "95px", "190px", "110px", "50px", "50px", "65px", "90px", "105px", "90px", "80px", "80px",
    "140px",
]  # fmt: skip
STATUSES = [s.value for s in RunStatus]
X_AXES = {"step": None, "epoch": "epoch", "tokens seen": "tokens_seen"}


def _round(x: float | None, n: int) -> float | None:
    return None if x is None else round(float(x), n)


def short_model(model: str) -> str:
    """'embedded:SmolLM2-135M-Instruct' → 'SmolLM2-135M-Instruct'; '/a/b/tiny' → 'tiny'; hub ids unchanged."""
    if model.startswith("embedded:"):
        return model.split(":", 1)[1]
    if model.startswith(("/", ".", "~")):
        return Path(model).name
    return model


def run_row(r) -> list[Any]:
    lo = r.config.get("lora", {})
    duration = r.duration_s if r.duration_s is not None else (r.duration.total_seconds() if r.duration else None)
    return [
        r.id,
        r.name,
        r.status.value,
        short_model(r.model or r.config.get("model", "")),
        ",".join(lo.get("targets", [])),
        lo.get("r"),
        lo.get("alpha"),
        r.config.get("quant", ""),
        _round(r.final_loss, 4),
        _round(r.best_val_loss, 4),
        _round(duration, 1),
        _round(r.peak_mem_gb, 3),
        _round(r.est_mem_gb, 3),
        r.created_at.strftime("%Y-%m-%d %H:%M"),
    ]


def runs_table(runs: Sequence[Any], statuses: Sequence[str] | None = None, text: str = "") -> pd.DataFrame:
    """The runs table, newest first, filtered by status and by a text found in any cell."""
    rows = [run_row(r) for r in runs if not statuses or r.status.value in statuses]
    needle = (text or "").strip().lower()
    if needle:
        rows = [row for row in rows if any(needle in str(c).lower() for c in row)]
    return pd.DataFrame(rows, columns=COLUMNS)


def id_choices(runs: Sequence[Any]) -> list[tuple[str, int]]:
    return [(f"#{r.id} {r.name} ({r.status.value})", r.id) for r in runs]


def refresh_history(statuses: Sequence[str] | None, text: str, *, store):
    """→ [table, run picker, compare picker] with the current runs."""
    runs = store.list_runs()
    choices = id_choices(runs)
    return runs_table(runs, statuses, text), gr.update(choices=choices), gr.update(choices=choices)


def row_selected(evt: gr.SelectData) -> int:
    """A click in the table → that row's run id (the first column), whatever the sort order."""
    row = evt.row_value
    if not row:
        return gr.skip()
    return int(row[0])


def run_summary(r) -> str:
    parts = [f"**#{r.id} {r.name} · {r.status.value}** · model `{r.model}`"]
    figures = [
        ("steps", f"{r.steps_done}/{r.total_steps}" if r.total_steps else None),
        ("final loss", f"{r.final_loss:.4f}" if r.final_loss is not None else None),
        ("best val loss", f"{r.best_val_loss:.4f}" if r.best_val_loss is not None else None),
        ("final val loss", f"{r.final_val_loss:.4f}" if r.final_val_loss is not None else None),
        ("duration", format_duration(r.duration_s) if r.duration_s is not None else None),
        ("peak memory", f"{r.peak_mem_gb:.2f} GB" if r.peak_mem_gb is not None else None),
        ("estimated", f"{r.est_mem_gb:.2f} GB" if r.est_mem_gb is not None else None),
        (
            "trainable",
            f"{r.trainable_params:,} of {r.total_params:,}" if r.trainable_params and r.total_params else None,
        ),
        ("device", r.device),
    ]
    parts.append(" · ".join(f"{k} {v}" for k, v in figures if v))
    if data_line(r.summary):
        parts.append(data_line(r.summary))
    if r.adapter_dir:
        parts.append(f"adapter `{r.adapter_dir}`")
    if r.error:
        parts.append(f"**Error:** {r.error}")
    return "  \n".join(parts)


def data_line(summary: dict | None) -> str:
    """What the run read of its dataset: rows → examples, tokens kept and cut, rows dropped per reason."""
    d = summary or {}
    if "tokens_total" not in d:
        return ""
    line = (
        f"data: {d.get('format')}, {d.get('rows', 0):,} rows → {d.get('train_examples', 0):,} train / "
        f"{d.get('val_examples', 0):,} val · {d['tokens_kept']:,} of {d['tokens_total']:,} tokens kept"
        f" ({d.get('tokens_truncated', 0):,} cut by truncation)"
    )
    dropped = d.get("dropped") or {}
    if dropped:
        line += " · dropped: " + "; ".join(f"{n:,} {why}" for why, n in dropped.items())
    return line


def show_run(run_id: int | None, *, store):
    """A chosen run → [config JSON, summary, loss plot, lr plot]."""
    if run_id is None:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    try:
        r = store.get_run(int(run_id))
    except KeyError:
        return {}, f"Run #{run_id} does not exist (deleted?).", loss_figure([]), lr_figure([])
    loss = loss_figure(
        store.metric_series(r.id, "train/loss"), store.metric_series(r.id, "val/loss"), title=f"run #{r.id} loss"
    )
    return r.config, run_summary(r), loss, lr_figure(store.metric_series(r.id, "lr"))


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'lora': {'r': 8}} → {'lora.r': 8}; lists become comma-joined strings so they compare and display."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
    return out


def config_diff(configs: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One row per config field whose value differs between the runs, one column per run."""
    flat = {label: flatten(c) for label, c in configs.items()}
    keys = list(dict.fromkeys(k for f in flat.values() for k in f))
    rows = [
        [k, *(f.get(k, "—") for f in flat.values())]
        for k in keys
        if len({json.dumps(f.get(k, "—"), default=str) for f in flat.values()}) > 1
    ]
    return pd.DataFrame(rows, columns=["field", *flat])


def compare_runs(run_ids: Sequence[int] | None, x_axis: str, smoothing: float, *, store):
    """Several runs → [overlaid loss curves, config diff table]."""
    ids = [int(i) for i in run_ids or []]
    curves, vals, configs = {}, {}, {}
    axis_metric = X_AXES.get(x_axis or "step")
    for i in ids:
        try:
            r = store.get_run(i)
        except KeyError:
            continue
        label = f"#{r.id} {r.name}".strip()
        train, val = store.metric_series(i, "train/loss"), store.metric_series(i, "val/loss")
        if axis_metric:
            axis = store.metric_series(i, axis_metric)
            train, val = reindex(train, axis), reindex(val, axis)
        curves[label], vals[label], configs[label] = train, val, r.config
    fig = compare_figure(curves, x_label=x_axis or "step", smoothing=float(smoothing or 0), val_curves=vals)
    diff = config_diff(configs) if len(configs) > 1 else pd.DataFrame(columns=["field"])
    return fig, diff


def delete_run(run_id: int | None, confirm: bool, statuses: Sequence[str] | None, text: str, *, store, home: Path):
    """Delete (with the confirmation ticked) → [message, table, run picker, compare picker, confirm box].

    A refusal is a message (and a toast), never an exception: the table and pickers stay as they are."""

    def refused(why: str):
        return f"**Not deleted.** {warn(why)}", gr.skip(), gr.skip(), gr.skip(), gr.skip()

    if run_id is None:
        return refused("Choose a run to delete")
    if not confirm:
        return refused(f"Tick “yes, delete the run and its files” first (run #{run_id})")
    try:
        r = store.get_run(int(run_id))
        if r.status in (RunStatus.QUEUED, RunStatus.RUNNING):
            return refused(f"Run #{r.id} is {r.status.value}: cancel it on the Train tab first")
        folder = deletable_folder(home, r)
    except (KeyError, ValueError) as e:
        return refused(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e))
    store.delete_run(r.id)
    if folder.exists():
        shutil.rmtree(folder)
    table, _, compares = refresh_history(statuses, text, store=store)
    picks = gr.update(choices=id_choices(store.list_runs()), value=None)
    return f"Deleted run #{r.id} and {folder}.", table, picks, compares, False


def export_adapter(run_id: int, which: str = "last", *, store, home: Path) -> Path:
    """The run's adapter zip (its last or its best adapter) with its model card (engine.core.export's exporter)."""
    r = store.get_run(int(run_id))
    try:
        return export_adapter_zip(r, store, home, which=which)
    except ExportError as e:
        raise ValueError(str(e)) from None


def download_adapter(run_id: int | None, which: str | None = "last", *, store, home: Path):
    if run_id is None:
        raise refuse("Choose a run first")
    try:
        path = export_adapter(int(run_id), which or "last", store=store, home=home)
        return gr.update(value=str(path), visible=True)
    except ValueError as e:
        raise refuse(str(e)) from None


def adapter_choices(run_id: int | None, *, store):
    """The run's adapters to download: its last one, and its best validation step's where it kept one."""
    choices = [("last adapter", "last")]
    try:
        best = best_info(store.get_run(int(run_id))) if run_id is not None else None
    except KeyError:
        best = None
    if best is not None:
        choices.append((f"best adapter (step {best['step']}, val {best['val_loss']:.3f})", "best"))
    return gr.update(choices=choices, value="last")


@dataclass
class HistoryTab:
    run_pick: Any
    relaunch_btn: Any
    refresh: Any  # (fn, inputs, outputs) to run when the tab is opened or the page loads
    compare_refresh: Any = None  # the Compare outcomes section's model choices, whenever the runs change


def build_history_tab(store, runner, home: Path, backend) -> HistoryTab:
    with gr.Row():
        statuses = gr.CheckboxGroup(STATUSES, value=[], label="Status filter (none ticked = all)", scale=2)
        text = gr.Textbox(label="Filter", placeholder="text in any column: name, model, targets, …", scale=2)
        refresh_btn = gr.Button("Refresh", scale=1, size="sm")
    table = gr.Dataframe(
        runs_table([]),
        interactive=False,
        label="Runs (click a header to sort, a row to open)",
        elem_id="runs-table",
        max_height=360,
        wrap=True,
        column_widths=COLUMN_WIDTHS,  # fixed: a filtered, narrow table must not squeeze headers into letters
    )
    with gr.Row():
        run_pick = gr.Dropdown([], value=None, label="Run", scale=3, elem_id="history-run")
        relaunch_btn = gr.Button("Relaunch in the Train tab", scale=1)
        which = gr.Radio([("last adapter", "last")], value="last", label="Adapter", scale=2, elem_id="history-which")
        download_btn = gr.Button("Download adapter (.zip)", scale=1)
    adapter_file = gr.File(label="Adapter zip", visible=False, interactive=False)
    summary = gr.Markdown(elem_id="history-summary")
    with gr.Row():
        loss_plot = gr.Plot(label="Loss")
        lr_plot = gr.Plot(label="Learning rate")
    with gr.Accordion("Config (JSON)", open=False):
        config_json = gr.JSON()
    with gr.Accordion("Delete this run", open=False):
        with gr.Row():
            confirm = gr.Checkbox(
                False, label="yes, delete the run and its files (runs/<id>)", elem_id="delete-confirm"
            )
            delete_btn = gr.Button("Delete", variant="stop", size="sm", elem_id="delete-btn")
        delete_md = gr.Markdown(elem_id="delete-msg")
    gr.Markdown("### Compare runs")
    with gr.Row():
        compare_ids = gr.Dropdown(
            [], value=[], multiselect=True, label="Runs to overlay", scale=3, elem_id="compare-ids"
        )
        x_axis = gr.Radio(list(X_AXES), value="step", label="x axis", scale=2)
        smoothing = gr.Slider(0, 0.99, 0.0, step=0.01, label="Smoothing (EMA)", scale=2)
    compare_plot = gr.Plot(label="Loss curves", elem_id="compare-plot")
    diff_table = gr.Dataframe(pd.DataFrame(columns=["field"]), interactive=False, label="Config fields that differ")
    compare_refresh = build_compare_panel(store, backend, home)

    refresh = (partial(refresh_history, store=store), [statuses, text], [table, run_pick, compare_ids])
    gr.on([refresh_btn.click, statuses.change, text.submit], *refresh, api_name="history")
    table.select(row_selected, None, [run_pick], api_name=False)
    run_pick.change(
        partial(show_run, store=store), [run_pick], [config_json, summary, loss_plot, lr_plot], api_name="show_run"
    )
    gr.on(
        [compare_ids.change, x_axis.change, smoothing.change],  # change: on release, and on Enter when typed
        partial(compare_runs, store=store),
        [compare_ids, x_axis, smoothing],
        [compare_plot, diff_table],
        api_name="compare",
        trigger_mode="always_last",
    )
    delete_btn.click(
        partial(delete_run, store=store, home=home),
        [run_pick, confirm, statuses, text],
        [delete_md, table, run_pick, compare_ids, confirm],
        api_name="delete_run",
    )
    download_btn.click(
        partial(download_adapter, store=store, home=home),
        [run_pick, which],
        [adapter_file],
        api_name="download_adapter",
    )
    run_pick.change(partial(adapter_choices, store=store), [run_pick], [which], api_name=False)
    return HistoryTab(run_pick=run_pick, relaunch_btn=relaunch_btn, refresh=refresh, compare_refresh=compare_refresh)
