"""A sweep after (or while) it runs: its members with what varied and their outcomes, the series the LoRA
paper plots (val loss against rank, one line per target set), and cancel/resume/delete of the whole sweep.

    rep = sweep_report(store, sweep_id)                  # what `engine sweep-report ID --json` prints
    lines = series_by_field(rep["members"], "lora.r", "best_val_loss")   # {"targets=qv": [(1, 2.3), (4, 2.1)]}
    cancel_sweep(runner, sweep_id); resume_sweep(runner, sweep_id); delete_sweep(store, home, sweep_id)

Stdlib + storage only: the web server's Sweeps tab and the CLI both build on these functions.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.core import runs as R
from engine.core.disk import check_disk
from engine.core.sweeps import get_dotted, member_label, show_value
from storage import RunStatus

OUTCOMES = ("final_loss", "best_val_loss", "final_val_loss")
ACTIVE = (RunStatus.QUEUED, RunStatus.RUNNING)


def members_of(store, sweep_id: int):
    """The sweep's runs, in the order they were queued."""
    return sorted(store.list_runs(sweep_id=sweep_id, limit=100_000), key=lambda r: r.id)


def varied_of(sweep) -> list[str]:
    return list(sweep.spec.get("varied") or [])


def member_row(r, varied: Sequence[str]) -> dict[str, Any]:
    """One member: id, name, status, the varied values (read from its config), outcomes and costs."""
    best = R.best_info(r)
    summary = r.summary or {}
    return {
        "id": r.id,
        "name": r.name,
        "status": r.status.value,
        "values": {f: get_dotted(r.config, f) for f in varied},
        "label": member_label({f: get_dotted(r.config, f) for f in varied}, varied),
        **{k: getattr(r, k) for k in OUTCOMES},
        "best_step": best["step"] if best else None,
        "best_adapter": best["adapter_dir"] if best else None,
        "stopped": summary.get("stopped"),
        "steps_done": r.steps_done,
        "total_steps": r.total_steps,
        "duration_s": r.duration_s,
        "peak_mem_gb": r.peak_mem_gb,
        "est_mem_gb": r.est_mem_gb,
        "trainable_params": r.trainable_params,
        "tokens_seen": r.tokens_seen,
        "eval": summary.get("eval"),
        "error": (r.error or "").split("\n")[0] or None,
    }


def sweep_report(store, sweep_id: int, *, curves: bool = False) -> dict[str, Any]:
    """The sweep, its members and (with curves) each member's train and val loss series."""
    sweep = store.get_sweep(sweep_id)
    varied = varied_of(sweep)
    runs = members_of(store, sweep_id)
    members = [member_row(r, varied) for r in runs]
    counts = {s.value: sum(r.status is s for r in runs) for s in RunStatus}
    done = [m for m in members if m["best_val_loss"] is not None]
    out: dict[str, Any] = {
        "id": sweep.id,
        "name": sweep.name,
        "created_at": sweep.created_at.isoformat(),
        "varied": varied,
        "counts": counts,
        "members": members,
        "best": min(done, key=lambda m: m["best_val_loss"])["id"] if done else None,
        "spec": sweep.spec.get("source", sweep.spec),
    }
    if curves:
        out["curves"] = {
            m["id"]: {k: store.metric_series(m["id"], k) for k in ("train/loss", "val/loss")} for m in members
        }
    return out


def series_by_field(
    members: Sequence[Mapping[str, Any]], x_field: str, y: str, *, only_numeric_x: bool = False
) -> dict[str, list[tuple[Any, float]]]:
    """{line: [(x, y), ...]}: `y` (an outcome key) against the value of `x_field`, one line per combination
    of the other varied fields (the paper's Table 6 as a plot), members without the outcome left out."""
    lines: dict[str, list[tuple[Any, float]]] = {}
    for m in members:
        if m.get(y) is None or x_field not in m["values"]:
            continue
        x = m["values"][x_field]
        if only_numeric_x and not isinstance(x, (int, float)):
            continue
        others = {f: v for f, v in m["values"].items() if f != x_field}
        label = member_label(others, list(others)) or "all"
        lines.setdefault(label, []).append((x if isinstance(x, (int, float)) else show_value(x), float(m[y])))
    for pts in lines.values():
        if all(isinstance(x, (int, float)) for x, _ in pts):
            pts.sort(key=lambda p: p[0])
    return lines


# ---- the whole sweep at once --------------------------------------------------------------------------


def cancel_sweep(runner, sweep_id: int, grace_s: float = 30.0) -> list[str]:
    """Cancel every queued member (first, so none starts meanwhile), then every running one."""
    runner.store.get_sweep(sweep_id)
    runs = members_of(runner.store, sweep_id)
    said = [runner.cancel(r.id, grace_s) for r in runs if r.status is RunStatus.QUEUED]
    said += [runner.cancel(r.id, grace_s) for r in runs if r.status is RunStatus.RUNNING]
    return said or [f"sweep {sweep_id}: no member is queued or running; nothing to cancel"]


def resume_sweep(runner, sweep_id: int) -> list[str]:
    """Queue every failed or cancelled member again: from its latest checkpoint when it has one (the same
    run, its curve continues), else from the start (it was cancelled before it began)."""
    runner.store.get_sweep(sweep_id)
    said = []
    for r in members_of(runner.store, sweep_id):
        if r.status not in (RunStatus.FAILED, RunStatus.CANCELLED):
            continue
        if R.latest_checkpoint(R.run_folder(r, runner.home)) is not None:
            runner.resume(r.id)
            said.append(f"run {r.id}: queued to resume from its latest checkpoint")
        else:
            from engine.core.config import RunConfig

            check_disk(RunConfig.from_dict(r.config), runner.home, r.trainable_params)
            runner.store.requeue(r.id, resume_from=None)
            said.append(f"run {r.id}: queued again from the start (it had no checkpoint)")
    return said or [f"sweep {sweep_id}: no failed or cancelled member; nothing to resume"]


def delete_sweep(store, home: str | Path, sweep_id: int) -> list[str]:
    """Delete every member (its row and runs/<id> folder) and the sweep row; refused while one is active."""
    store.get_sweep(sweep_id)
    runs = members_of(store, sweep_id)
    active = [f"#{r.id} ({r.status.value})" for r in runs if r.status in ACTIVE]
    if active:
        raise ValueError(
            f"sweep {sweep_id} still has members queued or running: {', '.join(active)}; cancel the sweep first"
        )
    folders = [R.deletable_folder(home, r) for r in runs]  # every folder checked before anything is deleted
    said = []
    for r, folder in zip(runs, folders):
        store.delete_run(r.id)
        if folder.exists():
            shutil.rmtree(folder)
        said.append(f"deleted run {r.id} and {folder}")
    store.delete_sweep(sweep_id)
    return [*said, f"deleted sweep {sweep_id}"]
