"""Sweeps from the command line: plan, check and queue a grid of runs; report, cancel, resume, delete it.

    python -m engine sweep sweep.yaml --dry-run      # N runs, each checked; time and memory; nothing queued
    python -m engine sweep sweep.yaml                # the same, then every member queued (the app or a worker runs them)
    python -m engine sweeps                          # the sweeps, newest first
    python -m engine sweep-report 3 [--json] [--curves] [--csv members.csv]
    python -m engine sweep-cancel 3 | sweep-resume 3 | sweep-delete 3

Every member is validated (its config) and checked (`engine check`: model, targets, quantization, data) before
anything is queued; all problems of all members are reported at once and then nothing is queued. Members that
read the same data the same way share one check (the tokenization is done once).
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from engine.cli.common import fail, home_of, key_error, open_store, print_json, say
from engine.core import sweep_report as SR
from engine.core import sweeps as S
from engine.core.batching import DataFacts, facts_key
from engine.core.config import ConfigError
from engine.core.events import format_duration


def read_spec(source: str) -> S.SweepSpec:
    """A sweep file, or with '-' a sweep as YAML or JSON on stdin (its base paths relative to the working folder)."""
    if source != "-":
        return S.read_sweep(source)
    from engine.core.config_file import read_config_file

    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "sweep.yaml"  # YAML reads JSON too
        p.write_text(sys.stdin.read(), encoding="utf-8")
        return S.parse_sweep(read_config_file(p), Path.cwd())


# ---- planning -------------------------------------------------------------------------------------------


def plan_sweep(spec: S.SweepSpec, home: Path, store) -> dict[str, Any]:
    """Expand, validate, apply the budget, check every member (grouped by data) and estimate time and memory."""
    from engine.ml import model as M

    members = S.expand(spec)
    problems = S.validate_members(members)
    anatomies: dict[str, dict] = {}

    def anatomy_of(model: str) -> dict:
        if model not in anatomies:
            try:
                anatomies[model] = M.inspect_model(model, home)
            except (M.ModelError, OSError) as e:
                raise ValueError("model: " + " ".join(str(e).split())) from None
        return anatomies[model]

    valid = [m for m in members if not any(p.startswith(f"{m.name}: ") for p in problems)]
    problems += S.apply_budget(valid, spec.budget, spec.base, anatomy_of)
    varied = S.varied_fields(spec, members)
    S.name_members(spec, members, varied)
    checked = [m for m in valid if "budget" in m.facts or spec.budget is None]
    problems += check_members(checked, home, anatomy_of)
    device = M.pick_device().type
    speeds = {}
    for m in checked:
        model = m.config.get("model") or m.run_config().model
        speeds.setdefault(model, S.measured_speed(store, model, device))
        speed = speeds[model]
        if speed and m.facts.get("tokens"):
            m.facts["est_time_s"] = m.facts["tokens"] / speed[0]
    times = [m.facts.get("est_time_s") for m in members]
    known = [s for s in speeds.values() if s]
    basis = (
        "; ".join(f"{v[0]:,.0f} tokens/s measured by run #{v[1]}" for v in known)
        if known
        else f"unknown: no finished run of this model on {device} to measure its speed from (tokens per run shown)"
    )
    mems = [m.facts["est_mem_gb"] for m in members if m.facts.get("est_mem_gb") is not None]
    return {
        "ok": not problems,
        "problems": problems,
        "name": spec.name,
        "n": len(members),
        "varied": varied,
        "members": [{"name": m.name, "values": m.values, **m.facts} for m in members],
        "total_time_s": sum(times) if times and all(t is not None for t in times) else None,
        "time_basis": basis,
        "max_mem_gb": max(mems) if mems else None,
        "device": device,
        "_members": members,
    }


def check_members(members: list[S.Member], home: Path, anatomy_of) -> list[str]:
    """engine check once per group of members that read the same data the same way; every member's memory
    estimate and exact parameter count on that data; steps and tokens from the trainer's batching."""
    from engine.core import estimate as E
    from engine.ml import model as M
    from engine.ml.check import check_run

    problems: list[str] = []
    groups: dict[tuple, dict] = {}
    device = M.pick_device()
    for m in members:
        cfg = m.run_config()
        key = (facts_key(cfg), cfg.quant, cfg.trust_remote_code)
        first = key not in groups
        if first:
            groups[key] = check_run(cfg, home)
            problems += [f"{m.name}: {p}" for p in groups[key]["problems"]]
        report = groups[key]
        facts = DataFacts.from_dict(report["facts"]) if report.get("facts") else None
        if facts is None:
            continue
        try:
            est = E.estimate(anatomy_of(cfg.model), cfg, device.type, bf16_capable=M.bf16_capable(device), data=facts)
        except ConfigError as e:  # the first member's are in its check already
            problems += [] if first else [f"{m.name}: {p}" for p in e.problems]
            continue
        except ValueError:
            continue
        steps, tokens = S.run_tokens(facts.lengths, cfg.train)
        m.facts.update(
            trainable_params=est.trainable_params, est_mem_gb=round(est.total_gb, 4), steps=steps, tokens=tokens
        )
    return problems


# ---- commands -------------------------------------------------------------------------------------------


def cmd_sweep(args) -> int:
    try:
        spec = read_spec(args.spec)
    except ConfigError as e:
        if args.json:
            print_json({"ok": False, "problems": e.problems, "n": 0, "members": []})
            return 0
        return fail(f"not queued: {len(e.problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in e.problems))
    from engine.cli.queue import runner_of

    runner = runner_of(args)
    plan = plan_sweep(spec, home_of(args), runner.store)
    members = plan.pop("_members")
    if plan["ok"] and not args.dry_run:
        try:
            plan["sweep_id"], plan["run_ids"] = S.queue_sweep(runner, spec, members, plan["varied"])
        except ValueError as e:  # DiskSpaceError: nothing was queued
            plan.update(ok=False, problems=[str(e)])
    plan["queued"] = "sweep_id" in plan
    if args.json:
        print_json(plan)
        return 0
    print_plan(plan)
    if not plan["ok"]:
        for p in plan["problems"]:
            fail(p)
        return fail(f"not queued: {len(plan['problems'])} problem(s) above")
    if plan["queued"]:
        ids = ", ".join(map(str, plan["run_ids"]))
        say(f"sweep {plan['sweep_id']} queued: runs {ids}; the app or `python -m engine worker` runs them")
        print(plan["sweep_id"])
    else:
        say("dry run: nothing queued")
    return 0


def print_plan(plan: dict[str, Any]) -> None:
    fields = plan["varied"]
    print(f"sweep {plan['name']!r}: {plan['n']} runs varying {', '.join(fields)}")
    print(f"  {'#':>3}  {'run':<44} {'trainable':>10} {'est. GB':>8} {'steps':>6} {'tokens':>9} {'est. time':>9}")
    for i, m in enumerate(plan["members"], 1):
        t = m.get("est_time_s")
        print(
            f"  {i:>3}  {m['name'][-44:]:<44} {m.get('trainable_params') or 0:>10,} "
            f"{m.get('est_mem_gb') or 0:>8.3f} {m.get('steps') or 0:>6} {m.get('tokens') or 0:>9,} "
            f"{format_duration(t) if t is not None else '?':>9}"
        )
    total = plan["total_time_s"]
    basis = plan["time_basis"]
    when = (
        f"≈ {format_duration(total)} ({basis})"
        if total is not None
        else (basis if basis.startswith("unknown") else f"unknown: not every run could be checked ({basis})")
    )
    print(f"total time {when}; memory per run ≤ {plan['max_mem_gb'] or 0:.3f} GB on {plan['device']}")


def cmd_sweeps(args) -> int:
    store = open_store(args)
    rows = []
    for s in store.list_sweeps():
        counts = SR.sweep_report(store, s.id)["counts"]
        rows.append({"id": s.id, "name": s.name, "created_at": s.created_at.isoformat(), "counts": counts})
    if args.json:
        print_json(rows)
        return 0
    print(f"{'id':>4}  {'name':<32} {'runs':>4}  status")
    for r in rows:
        status = ", ".join(f"{n} {k}" for k, n in r["counts"].items() if n)
        print(f"{r['id']:>4}  {r['name'][:32]:<32} {sum(r['counts'].values()):>4}  {status}")
    return 0


MEMBER_COLUMNS = (
    "id", "name", "status", "best_val_loss", "final_val_loss", "final_loss", "best_step", "steps_done",
    "duration_s", "peak_mem_gb", "est_mem_gb", "trainable_params", "stopped",
)  # fmt: skip


def cmd_sweep_report(args) -> int:
    try:
        rep = SR.sweep_report(open_store(args), args.id, curves=args.curves)
    except KeyError as e:
        return fail(key_error(e))
    if args.csv:
        write_members_csv(rep, Path(args.csv))
        say(f"wrote {len(rep['members'])} members to {args.csv}")
    if args.json:
        print_json(rep)
        return 0
    print(f"sweep {rep['id']} {rep['name']!r}: {len(rep['members'])} runs varying {', '.join(rep['varied'])}")
    fmt = lambda x: f"{x:8.4f}" if isinstance(x, float) else f"{'-':>8}"
    print(f"  {'id':>4}  {'status':<10} {'best val':>8} {'last val':>8} {'time s':>7} {'peak GB':>7}  values")
    for m in rep["members"]:
        t, mem = m["duration_s"], m["peak_mem_gb"]
        print(
            f"  {m['id']:>4}  {m['status']:<10} {fmt(m['best_val_loss'])} {fmt(m['final_val_loss'])} "
            f"{t if t is None else round(t):>7} {'-' if mem is None else f'{mem:.3f}':>7}  {m['label']}"
        )
    if rep["best"] is not None:
        print(f"lowest val loss: run {rep['best']}")
    for f in rep["varied"]:
        for line, pts in SR.series_by_field(rep["members"], f, "best_val_loss").items():
            print(f"  best val loss vs {f} ({line}): " + ", ".join(f"{x}: {y:.4f}" for x, y in pts))
    return 0


def write_members_csv(rep: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([*rep["varied"], *MEMBER_COLUMNS])
        for m in rep["members"]:
            w.writerow([json.dumps(m["values"][v]) for v in rep["varied"]] + [m.get(c) for c in MEMBER_COLUMNS])


def _sweep_action(args, act) -> int:
    try:
        for line in act():
            print(line)
    except KeyError as e:
        return fail(key_error(e))
    except ValueError as e:
        return fail(str(e))
    return 0


def cmd_sweep_cancel(args) -> int:
    from engine.cli.queue import runner_of

    runner = runner_of(args)
    try:
        running = [r.id for r in SR.members_of(runner.store, args.id) if r.status.value == "running"]
    except KeyError as e:
        return fail(key_error(e))
    code = _sweep_action(args, lambda: SR.cancel_sweep(runner, args.id, args.grace))
    for run_id in running:  # this process sends SIGKILL after the grace period: wait here
        runner.wait_cancelled(run_id)
    return code


def cmd_sweep_resume(args) -> int:
    from engine.cli.queue import runner_of

    runner = runner_of(args)
    return _sweep_action(args, lambda: SR.resume_sweep(runner, args.id))


def cmd_sweep_delete(args) -> int:
    return _sweep_action(args, lambda: SR.delete_sweep(open_store(args), home_of(args), args.id))


def register(sub) -> None:
    s = sub.add_parser("sweep", help="queue a grid of runs from a sweep file (every member checked first)")
    s.add_argument("spec", help="sweep YAML/JSON (base:, grid: or combinations:, budget:), or - for stdin")
    s.add_argument("--dry-run", action="store_true", help="plan and check every member; queue nothing")
    s.add_argument("--json", action="store_true", help="the plan (and the queued ids) as JSON; exit 0 either way")
    s.set_defaults(fn=cmd_sweep)
    ls = sub.add_parser("sweeps", help="list sweeps")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_sweeps)
    r = sub.add_parser("sweep-report", help="a sweep's members, what varied, their outcomes")
    r.add_argument("id", type=int)
    r.add_argument("--json", action="store_true")
    r.add_argument("--curves", action="store_true", help="with --json: each member's train and val loss series")
    r.add_argument("--csv", help="also write the members table to this CSV file")
    r.set_defaults(fn=cmd_sweep_report)
    c = sub.add_parser("sweep-cancel", help="cancel every queued or running member of a sweep")
    c.add_argument("id", type=int)
    c.add_argument("--grace", type=float, default=30.0, help="seconds a running member gets before SIGKILL")
    c.set_defaults(fn=cmd_sweep_cancel)
    rs = sub.add_parser("sweep-resume", help="queue a sweep's failed and cancelled members again")
    rs.add_argument("id", type=int)
    rs.set_defaults(fn=cmd_sweep_resume)
    d = sub.add_parser("sweep-delete", help="delete a sweep, its runs and their folders (none may be active)")
    d.add_argument("id", type=int)
    d.set_defaults(fn=cmd_sweep_delete)
