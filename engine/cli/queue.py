"""The queue and the run history: `submit`, `worker`, `cancel`, `resume`, `runs`, `show`."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

from engine.cli.common import fail, home_of, key_error, open_store, run_to_dict, say
from engine.core.config import ConfigError, RunConfig
from engine.core.jobs import DiskSpaceError, JobRunner


def runner_of(args, **kw) -> JobRunner:
    return JobRunner(open_store(args), home_of(args), db_url=args.db_url, **kw)


def cmd_submit(args) -> int:
    """Check the run (engine check: model, targets, dataset; every problem at once), then queue it."""
    runner = runner_of(args)
    try:
        cfg = RunConfig.from_file(args.config)
        est = {}
        if not args.no_check:
            from engine.cli.check import run_check

            report = run_check(cfg, args)
            if not report["ok"]:
                raise ConfigError(report["problems"])
            est = report.get("estimate") or {}
        run_id = runner.submit(
            cfg,
            name=args.name,
            est_mem_gb=est.get("per_device_gb", est.get("total_gb")),  # what one device needs: placement checks it
            trainable_params=est.get("trainable_params"),
        )
    except ConfigError as e:  # one problem: one line; several: a count, then one line each
        n = len(e.problems)
        return fail(
            "not queued: "
            + (e.problems[0] if n == 1 else f"{n} problems:\n" + "\n".join(f"  - {p}" for p in e.problems))
        )
    except DiskSpaceError as e:
        return fail(str(e))
    pos = runner.store.queue_position(run_id)
    say(
        f"run {run_id} queued (position {pos}); the app or `python -m engine worker` runs it; "
        f"log: {runner.log_path(run_id)}"
    )
    print(run_id)
    return 0


def cmd_worker(args) -> int:
    runner = runner_of(args, max_concurrent=args.max_concurrent, log=say)
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():  # a second Ctrl-C: leave at once; the children go on, a later recover() adopts them
            raise KeyboardInterrupt
        say(
            f"worker: {signal.Signals(signum).name}: cancelling running runs (they save a checkpoint); "
            "press Ctrl-C again to leave them running"
        )
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    failed = runner.recover()
    if failed:
        say(f"worker: marked failed after a restart: {', '.join(map(str, failed))}")
    runner.start()
    gpus = runner.placer.gpus()
    say(
        f"worker {os.getpid()} on {runner.host}: processing the queue of {runner.store!r} ({runner.limit()} at a "
        f"time; {len(gpus) or 'no'} GPU{'s' * (len(gpus) != 1)}){'; exits when idle' if args.once else ''}"
    )
    try:
        while not stop.wait(1.0):
            if args.once and runner.wait_idle(0):
                break
        runner.stop(cancel_running=stop.is_set(), timeout=args.grace)
    except KeyboardInterrupt:
        runner.stop()
    return 0


def cmd_cancel(args) -> int:
    runner = runner_of(args)
    from storage import RunStatus

    try:
        was = runner.store.get_run(args.id).status
        print(runner.cancel(args.id, grace_s=args.grace))
    except KeyError as e:
        return fail(key_error(e))
    if was is RunStatus.RUNNING:  # wait here: this process is what sends SIGKILL after the grace period
        runner.wait_cancelled(args.id)
        deadline = time.monotonic() + 10
        while not runner.store.get_run(args.id).is_terminal and time.monotonic() < deadline:
            time.sleep(0.2)
        print(f"run {args.id}: {runner.store.get_run(args.id).status.value}")
    return 0


def cmd_resume(args) -> int:
    runner = runner_of(args)
    try:
        run_id = runner.resume(args.id, as_new=args.as_new)
    except KeyError as e:
        return fail(key_error(e))
    except ValueError as e:  # DiskSpaceError and ConfigError are ValueErrors
        return fail(str(e))
    say(f"run {run_id} queued to resume; the app or `python -m engine worker` runs it")
    print(run_id)
    return 0


def cmd_runs(args) -> int:
    runs = open_store(args).list_runs(status=args.status)
    if args.json:
        print(json.dumps([run_to_dict(r) for r in runs], indent=2))
        return 0
    print(f"{'id':>4}  {'status':<10} {'model':<34} {'r':>3} {'alpha':>5} {'loss':>8} {'val':>8}  name")
    for r in runs:
        lo = r.config.get("lora", {})
        fmt = lambda x: f"{x:8.4f}" if x is not None else f"{'-':>8}"
        print(
            f"{r.id:>4}  {r.status.value:<10} {r.model[-34:]:<34} {lo.get('r', ''):>3} {lo.get('alpha', ''):>5} "
            f"{fmt(r.final_loss)} {fmt(r.final_val_loss)}  {r.name}"
        )
    return 0


SHOWN = (
    "id",
    "name",
    "status",
    "model",
    "created_at",
    "started_at",
    "finished_at",
    "steps_done",
    "total_steps",
    "final_loss",
    "best_val_loss",
    "final_val_loss",
    "duration_s",
    "peak_mem_gb",
    "trainable_params",
    "total_params",
    "device",
    "host",
    "devices",
    "world_size",
    "out_dir",
    "adapter_dir",
    "error",
)


def cmd_show(args) -> int:
    try:
        r = open_store(args).get_run(args.id)
    except KeyError as e:
        return fail(key_error(e))
    d = run_to_dict(r)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    for k in SHOWN:
        if d.get(k) is not None:
            print(f"{k:>16}: {d[k]}")
    print("          config:")
    print("\n".join("    " + line for line in json.dumps(r.config, indent=2).splitlines()))
    return 0


def register(sub) -> None:
    s = sub.add_parser("submit", help="add a run to the queue; prints its id (the app or a worker runs it)")
    s.add_argument("config", help="YAML or JSON run config")
    s.add_argument("--name", help="a label for the run")
    s.add_argument("--no-check", action="store_true", help="queue without checking model and dataset first")
    s.set_defaults(fn=cmd_submit)

    w = sub.add_parser("worker", help="process the queue headless until Ctrl-C or SIGTERM")
    w.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="runs at the same time (default: one per GPU on a GPU machine, the placement keeping their GPUs "
        "apart; 1 on a CPU)",
    )
    w.add_argument("--once", action="store_true", help="exit when nothing is queued or running")
    w.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="on Ctrl-C/SIGTERM, seconds a running run gets to save before it is killed",
    )
    w.set_defaults(fn=cmd_worker)

    c = sub.add_parser("cancel", help="cancel a queued or running run (a running one saves a checkpoint)")
    c.add_argument("id", type=int)
    c.add_argument("--grace", type=float, default=30.0, help="seconds before SIGKILL (default 30)")
    c.set_defaults(fn=cmd_cancel)

    r = sub.add_parser("resume", help="queue a failed or cancelled run again from its latest checkpoint")
    r.add_argument("id", type=int)
    r.add_argument("--as-new", action="store_true", help="as a new run linked to this one")
    r.set_defaults(fn=cmd_resume)

    ls = sub.add_parser("runs", help="list runs")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--status", help="only runs with this status")
    ls.set_defaults(fn=cmd_runs)

    sh = sub.add_parser("show", help="one run in detail")
    sh.add_argument("id", type=int)
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(fn=cmd_show)
