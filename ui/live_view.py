"""The Train tab's live view: the queue, the followed run's status, progress, loss and lr curves, its log.

A gr.Timer calls poll_run with a cursor (the last metric id seen, in gr.State); when nothing new arrived the
plots get gr.skip(), and when the selected run is over and nothing else is queued or running the timer
turns itself off. The run selector defaults to the newest running or queued run, so closing the page and
coming back re-attaches.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

import gradio as gr

from engine.core.events import format_duration
from storage import TERMINAL, RunStatus
from ui.errors import warn
from ui.plots import loss_figure, lr_figure

PLOTTED = ("train/loss", "val/loss", "lr")


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


def placed_on(run) -> str:
    """Where a running run trains: ' on cuda:0,1 (2 processes)', ' on cpu', or '' before it is placed."""
    if not getattr(run, "devices", None):
        return ""
    world = run.world_size or 1
    return f" on {run.devices}" + (f" ({world} processes)" if world > 1 else "")


def queue_markdown(running: Sequence[Any], queued: Sequence[Any], waiting: Mapping[int, str] | None = None) -> str:
    """The queue panel: what runs where, then the queued runs in order (with why one waits, e.g. for its GPUs)."""
    if not running and not queued:
        return "Queue: empty."
    why = waiting or {}
    lines = [f"- ▶ **#{r.id}** {r.name} — running{placed_on(r)}" for r in running]
    lines += [
        f"- {i}. #{r.id} {r.name} — queued" + (f" ({why[r.id]})" if r.id in why else "")
        for i, r in enumerate(queued, start=1)
    ]
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


def rank_index(name: str) -> int:
    head = name.split("/")[0].removeprefix("rank")
    return int(head) if head.isdigit() else -1


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
    ranks = [last[k] for k in sorted(last, key=rank_index) if k.startswith("rank") and k.endswith("/tokens_per_s")]
    world = getattr(run, "world_size", None) or 1
    if world > 1:  # data-parallel: the processes and each one's throughput
        parts.append(f"{world} processes on {getattr(run, 'devices', None) or '?'}")
        if ranks:
            parts.append("per rank " + " / ".join(f"{v:,.0f}" for v in ranks) + " tok/s")
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


LOG_LINES = 12  # the log box shows the end of train.log, this many lines, and follows it


def progress_html(run, last: Mapping[str, float], step: int) -> str:
    """A progress bar: steps done of the total, the share done and, while running, the ETA."""
    total = int(last.get("total_steps") or run.total_steps or 0)
    done = step if run.status != RunStatus.QUEUED else 0
    frac = min(1.0, done / total) if total else 0.0
    label = f"step {done} / {total or '?'} · {frac:.0%}"
    if run.status == RunStatus.RUNNING and "eta_s" in last:
        label += f" · ETA {format_duration(last['eta_s'])}"
    elif run.status != RunStatus.RUNNING:
        label += f" · {run.status.value}"
    return (
        f'<div class="ll-progress" role="progressbar" aria-valuemin="0" aria-valuemax="{total}" '
        f'aria-valuenow="{done}"><div class="ll-bar ll-{run.status.value}" style="width: {100 * frac:.1f}%">'
        f"</div><span>{html.escape(label)}</span></div>"
    )


def next_to_follow(run, series: Mapping[str, Any], running: Sequence[Any], queued: Sequence[Any], store):
    """The selector's update when the followed run has just ended and another is running (else the next
    queued one), or skip."""
    following = [*running, *queued]
    if run.status in TERMINAL and series.get("active") and following:
        return gr.update(choices=run_choices(store), value=following[0].id)
    return gr.skip()


def poll_run(run_id: int | None, cursor: int, series: Mapping[str, Any], *, store, runner):
    """Timer tick → [cursor, series, status, loss plot, lr plot, log tail, queue, timer, progress, run selector];
    skips what is unchanged. When the followed run ends and another is running, the selector moves to it."""
    running, queued = active_runs(store)
    waiting = getattr(getattr(runner, "placer", None), "waiting", None)  # the scheduler's last placement pass
    queue, busy = queue_markdown(running, queued, waiting), bool(running or queued)
    skip = gr.skip()
    if run_id is None:
        idle = "No run yet: fill the form and press Launch."
        return cursor, series, idle, skip, skip, skip, queue, gr.Timer(active=busy), "", skip
    try:
        run = store.get_run(int(run_id))  # status first: metrics written before the end are then visible
    except KeyError:
        return 0, {}, f"Run #{run_id} was deleted.", skip, skip, "", queue, gr.Timer(active=busy), "", skip
    if series.get("run") != run.id:  # another run was selected since the last tick: start over
        cursor, series = 0, {"run": run.id}
    points = store.metrics_since(run.id, cursor)
    new = merge_points(series, points)
    redraw = bool(points) or not series.get("drawn")
    status = status_markdown(
        run, new["last"], new["step"], store.queue_position(run.id) if run.status == RunStatus.QUEUED else None
    )
    log = "\n".join(runner.log_tail(run.id).splitlines()[-LOG_LINES:])
    progress = progress_html(run, new["last"], new["step"])
    loss = lr = skip
    if redraw:
        loss = loss_figure(
            sorted(new["train/loss"].items()), sorted(new["val/loss"].items()), title=f"run #{run.id} loss"
        )
        lr = lr_figure(sorted(new["lr"].items()))
    changed = {k: v if v != series.get(k) else skip for k, v in (("status_text", status), ("log", log))}
    changed.update({k: v if v != series.get(k) else skip for k, v in (("queue", queue), ("progress", progress))})
    follow = next_to_follow(run, series, running, queued, store)
    new.update(drawn=True, status_text=status, log=log, queue=queue, progress=progress)
    new["active"] = run.status not in TERMINAL
    return (
        (points[-1].id if points else cursor),
        new,
        changed["status_text"],
        loss,
        lr,
        changed["log"],
        changed["queue"],
        gr.Timer(active=run.status not in TERMINAL or busy),
        changed["progress"],
        follow,
    )


def followed_after_launch(store, new_id: int) -> int:
    """Whom the live view follows once `new_id` is queued: a run already running keeps it, else the new run."""
    running = [r.id for r in store.list_runs(status=RunStatus.RUNNING) if r.id != new_id]
    return running[0] if running else new_id


def cancel_run(run_id: int | None, *, runner) -> str:
    if run_id is None:
        return warn("No run selected")
    try:
        return runner.cancel(int(run_id))
    except KeyError as e:  # deleted meanwhile
        return warn(str(e.args[0]) if e.args else str(e))


def resume_run(run_id: int | None, *, runner, store):
    """Resume → [message, run selector on the resumed run, timer]."""
    if run_id is None:
        return warn("No run selected"), gr.skip(), gr.skip()
    try:
        new_id = runner.resume(int(run_id))
    except (ValueError, KeyError) as e:
        return warn(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)), gr.skip(), gr.skip()
    said = (
        f"Run #{run_id} is queued again; it continues from its latest checkpoint."
        if new_id == int(run_id)
        else f"Run #{run_id} continues as the new run #{new_id}."
    )
    return (
        said,
        gr.update(choices=run_choices(store), value=followed_after_launch(store, new_id)),
        gr.Timer(active=True),
    )
