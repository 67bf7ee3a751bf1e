"""The Sweeps tab: write a sweep (a base run config and a grid of values), check it (every member, all problems
at once, the estimated total time and per-run memory), queue it, then follow its members: a table of what
varied and their outcomes, val loss against a varied field (one line per value of the others, as the LoRA
paper's Table 6), overlaid loss curves, and cancel / resume / delete of the whole sweep.

Checking and queueing go through `python -m engine sweep - --json [--dry-run]` (ui.backend); the app's job
runner trains the queued members like any run. The report is engine.core.sweep_report, read from the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import yaml

from engine.core import sweep_report as SR
from engine.core.config import EMBEDDED_MODEL
from engine.core.events import format_duration
from ui.errors import warn
from ui.plots import compare_figure
from ui.sweep_analyses import build_sweep_analyses
from ui.sweep_plots import outcome_figure

EXAMPLE = f"""name: rank-vs-targets
base:
  model: {EMBEDDED_MODEL}
  dataset: builtin:persona
  train: {{max_steps: 30, batch_size: 4, max_seq_len: 256, val_split: 0.1, eval_every: 10, save_every: 0}}
grid:
  lora.r: [1, 4]
  lora.targets: [qv, all-linear]
# combinations: [{{lora.r: 8, train.lr: 0.001}}, {{lora.r: 64, train.lr: 0.0005}}]   # instead of grid
# budget: {{like: {{lora.r: 8, lora.targets: qv}}}}   # with grid over lora.targets only: the rank that fits
"""
HELP = """A sweep queues one run per combination of the **grid** (dotted run config fields → lists of values),
or per entry of **combinations**. With a **budget** (a number of trainable parameters, or `like:` a
reference config) each target set gets the largest rank within it: the LoRA paper's Table 5 setting.
**Check** validates and checks every member and queues nothing; **Queue sweep** does the same, then queues
all members (nothing is queued if any member has a problem). The CLI does the same: `python -m engine sweep
FILE.yaml [--dry-run]`, `python -m engine sweep-report ID`."""
OUTCOME_CHOICES = [
    ("best val loss", "best_val_loss"),
    ("final val loss", "final_val_loss"),
    ("final loss", "final_loss"),
    ("time (s)", "duration_s"),
    ("peak memory (GB)", "peak_mem_gb"),
]
PLAN_COLUMNS = ["#", "run", "trainable", "est. GB", "steps", "tokens", "est. time"]
MEMBER_COLUMNS = ["id", "run", "status", "best val", "final val", "step", "time", "peak GB", "trainable"]


def app_spec(text: str, backend) -> dict[str, Any]:
    """The sweep as the engine gets it: parsed YAML, base written inline, datasets only from the app's places."""
    try:
        spec = yaml.safe_load(text or "")
    except yaml.YAMLError as e:
        raise ValueError(f"the sweep is not valid YAML: {' '.join(str(e).split())[:300]}") from None
    if not isinstance(spec, dict):
        raise ValueError("write a sweep: name:, base: {model: ..., dataset: ...}, grid: {lora.r: [1, 4]}")
    base = spec.get("base") or {}
    if not isinstance(base, dict):
        raise ValueError(f"base = {str(base)[:80]!r}: in the web app, write the base run config inline (a mapping)")
    if base.get("dataset"):
        base["dataset"] = backend.readable_dataset(str(base["dataset"]))
    for key in ("grid",):
        values = (spec.get(key) or {}).get("dataset") if isinstance(spec.get(key), dict) else None
        if isinstance(values, list):
            spec[key]["dataset"] = [backend.readable_dataset(str(v)) for v in values]
    for combo in spec.get("combinations") or []:
        if isinstance(combo, dict) and combo.get("dataset"):
            combo["dataset"] = backend.readable_dataset(str(combo["dataset"]))
    spec["base"] = base
    return spec


def plan_table(plan: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for i, m in enumerate(plan.get("members") or [], 1):
        t = m.get("est_time_s")
        rows.append(
            [i, m["name"], m.get("trainable_params"), m.get("est_mem_gb"), m.get("steps"), m.get("tokens")]
            + [format_duration(t) if t is not None else "?"]
        )
    return pd.DataFrame(rows, columns=PLAN_COLUMNS)


def plan_markdown(plan: dict[str, Any]) -> str:
    n, varied = plan.get("n", 0), ", ".join(plan.get("varied") or [])
    if not plan["ok"]:
        lines = "\n".join(f"- {p}" for p in plan["problems"])
        return f"**Not queued: {len(plan['problems'])} problem(s)** in {n} runs:\n\n{lines}"
    total = plan.get("total_time_s")
    when = f"≈ {format_duration(total)} ({plan['time_basis']})" if total is not None else plan["time_basis"]
    mem = f"{plan['max_mem_gb']:.3f} GB" if plan.get("max_mem_gb") is not None else "?"
    head = f"**Sweep {plan['sweep_id']} queued**: {n} runs" if plan.get("queued") else f"**{n} runs, all checked**"
    return f"{head} varying {varied}. Total time {when}; memory per run ≤ {mem} on {plan.get('device')}."


def check_sweep(text: str, queue: bool, *, backend, store):
    """Check / Queue → [message, plan table, sweep picker]."""
    try:
        plan = backend.sweep(app_spec(text, backend), dry_run=not queue)
    except ValueError as e:
        return warn(str(e)), gr.skip(), gr.skip()
    if not plan["ok"]:
        gr.Warning(f"not queued: {len(plan['problems'])} problem(s); see the list under the buttons")
    pick = gr.update(choices=sweep_choices(store), value=plan["sweep_id"]) if plan.get("queued") else gr.skip()
    return plan_markdown(plan), plan_table(plan), pick


def sweep_choices(store) -> list[tuple[str, int]]:
    return [(f"#{s.id} {s.name}", s.id) for s in store.list_sweeps()]


def members_table(rep: dict[str, Any]) -> pd.DataFrame:
    rnd = lambda x, n: None if x is None else round(float(x), n)
    rows = [
        [m["id"], m["label"] or m["name"], m["status"], rnd(m["best_val_loss"], 4), rnd(m["final_val_loss"], 4)]
        + [f"{m['steps_done'] or 0}/{m['total_steps'] or '?'}", rnd(m["duration_s"], 1), rnd(m["peak_mem_gb"], 3)]
        + [m["trainable_params"]]
        for m in rep["members"]
    ]
    return pd.DataFrame(rows, columns=MEMBER_COLUMNS)


def show_sweep(sweep_id: int | None, x_field: str | None, outcome: str, *, store):
    """A sweep → [summary, members table, x-field choices, outcome plot, loss curves]."""
    if sweep_id is None:
        empty = pd.DataFrame(columns=MEMBER_COLUMNS)
        fig = outcome_figure({}, x_label="lora.r", y_label="val loss")
        return "Pick a sweep (or queue one above).", empty, gr.update(choices=[]), fig, compare_figure({})
    try:
        rep = SR.sweep_report(store, int(sweep_id), curves=True)
    except KeyError:
        return warn(f"sweep {sweep_id} no longer exists"), gr.skip(), gr.skip(), gr.skip(), gr.skip()
    varied = rep["varied"]
    x = x_field if x_field in varied else ("lora.r" if "lora.r" in varied else (varied[0] if varied else None))
    label = dict((v, k) for k, v in OUTCOME_CHOICES).get(outcome, outcome)
    lines = SR.series_by_field(rep["members"], x, outcome) if x else {}
    fig = outcome_figure(lines, x_label=x or "", y_label=label)
    curves = {f"#{m['id']} {m['label']}": rep["curves"][m["id"]]["train/loss"] for m in rep["members"]}
    vals = {f"#{m['id']} {m['label']}": rep["curves"][m["id"]]["val/loss"] for m in rep["members"]}
    counts = ", ".join(f"{n} {k}" for k, n in rep["counts"].items() if n)
    best = f"; lowest val loss: run #{rep['best']}" if rep["best"] is not None else ""
    md = (
        f"**Sweep #{rep['id']} {rep['name']}**: {len(rep['members'])} runs varying {', '.join(varied)} ({counts}){best}"
    )
    return md, members_table(rep), gr.update(choices=varied, value=x), fig, compare_figure(curves, val_curves=vals)


def sweep_action(action: str, sweep_id: int | None, confirm: bool, *, store, runner, home: Path) -> str:
    """Cancel / Resume / Delete the whole sweep (engine.core.sweep_report, on the app's own runner)."""
    if sweep_id is None:
        return warn("pick a sweep first")
    try:
        if action == "cancel":
            said = SR.cancel_sweep(runner, int(sweep_id), grace_s=30.0)
        elif action == "resume":
            said = SR.resume_sweep(runner, int(sweep_id))
        else:
            if not confirm:
                return warn("tick “Yes, delete its runs” to delete the sweep, its runs and their folders")
            said = SR.delete_sweep(store, home, int(sweep_id))
    except (KeyError, ValueError) as e:
        return warn(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e))
    return "\n".join(f"- {s}" for s in said)


@dataclass
class SweepsTab:
    pick: Any
    refresh: Any  # (fn, inputs, outputs): the picker and the shown sweep, on page load and when runs change


def refresh_sweeps(sweep_id, x_field, outcome, *, store):
    ids = [i for _, i in sweep_choices(store)]
    keep = sweep_id if sweep_id in ids else (ids[0] if ids else None)
    return (gr.update(choices=sweep_choices(store), value=keep), *show_sweep(keep, x_field, outcome, store=store))


def build_sweeps_tab(store, runner, home: Path, backend) -> SweepsTab:
    gr.Markdown("### Plan and queue a sweep")
    with gr.Accordion("How sweeps work", open=False):
        gr.Markdown(HELP)
    text = gr.Code(EXAMPLE, language="yaml", label="Sweep (YAML)", elem_id="sweep-yaml", interactive=True)
    with gr.Row():
        check_btn = gr.Button("Check (dry run)", elem_id="sweep-check")
        queue_btn = gr.Button("Queue sweep", variant="primary", elem_id="sweep-queue")
    plan_md = gr.Markdown(elem_id="sweep-plan-msg")
    plan_df = gr.Dataframe(pd.DataFrame(columns=PLAN_COLUMNS), interactive=False, label="Members (planned)")
    gr.Markdown("### Sweeps")
    with gr.Row():
        pick = gr.Dropdown(sweep_choices(store), label="Sweep", elem_id="sweep-pick", scale=3)
        x_field = gr.Dropdown([], label="x: varied field", scale=2, elem_id="sweep-x")
        outcome = gr.Radio(OUTCOME_CHOICES, value="best_val_loss", label="y", scale=2)
    summary = gr.Markdown(elem_id="sweep-summary")
    members = gr.Dataframe(pd.DataFrame(columns=MEMBER_COLUMNS), interactive=False, elem_id="sweep-members")
    with gr.Row():
        plot = gr.Plot(outcome_figure({}, x_label="lora.r", y_label="val loss"), elem_id="sweep-plot")
        curves = gr.Plot(compare_figure({}), elem_id="sweep-curves")
    with gr.Row():
        cancel_btn = gr.Button("Cancel sweep", size="sm")
        resume_btn = gr.Button("Resume sweep", size="sm")
        confirm = gr.Checkbox(False, label="Yes, delete its runs")
        delete_btn = gr.Button("Delete sweep", size="sm", variant="stop")
    action_md = gr.Markdown()
    build_sweep_analyses(pick, store, backend)

    hidden = {"api_name": False}
    shown = [summary, members, x_field, plot, curves]
    check_btn.click(
        partial(check_sweep, queue=False, backend=backend, store=store), [text], [plan_md, plan_df, pick], **hidden
    )
    queue_btn.click(
        partial(check_sweep, queue=True, backend=backend, store=store), [text], [plan_md, plan_df, pick], **hidden
    )
    for comp in (pick, x_field, outcome):
        comp.change(partial(show_sweep, store=store), [pick, x_field, outcome], shown, **hidden)
    for btn, action in ((cancel_btn, "cancel"), (resume_btn, "resume"), (delete_btn, "delete")):
        btn.click(
            partial(sweep_action, action, store=store, runner=runner, home=home), [pick, confirm], [action_md], **hidden
        )
    refresh = (partial(refresh_sweeps, store=store), [pick, x_field, outcome], [pick, *shown])
    return SweepsTab(pick=pick, refresh=refresh)
