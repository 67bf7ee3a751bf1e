"""`train`: one run in the foreground (or the job queue's child process), recorded in the database; with
train.devices above one, torchrun around this command (every rank runs it; rank 0 records)."""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from engine.cli.common import fail, home_of, is_user_error, log_traceback, open_store, say
from engine.core.config import ConfigError, RunConfig
from engine.core.devices import Unplaceable
from engine.core.home import run_dir
from engine.core.placement import PLACED_ENV, Placer, wait_for_gpus
from engine.core.procs import PEER_LOST_EXIT, die_with_parent, explain_end, this_host
from engine.core.runs import CONFIG_NAME


class ProgressSink:
    """A tqdm bar on a terminal, plain lines in a log file (the background job's train.log)."""

    def __init__(self) -> None:
        from engine.core.events import PrintSink

        self.bar = None
        self.lines = PrintSink(sys.stderr) if not sys.stderr.isatty() else None

    def log(self, step: int, metrics) -> None:
        if self.lines is not None:
            if "train/loss" in metrics or "val/loss" in metrics:
                self.lines.log(step, metrics)
            return
        from tqdm import tqdm

        if self.bar is None and "total_steps" in metrics:
            self.bar = tqdm(total=int(metrics["total_steps"]), initial=step, unit="step", dynamic_ncols=True)
        if self.bar is not None and "train/loss" in metrics:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", tok_s=f"{metrics.get('tokens_per_s', 0):.0f}")
        if self.bar is not None and "val/loss" in metrics:
            self.bar.write(f"step {step}: val loss {metrics['val/loss']:.4f}")

    def log_spectra(self, step, spectra, extra=None) -> None:
        pass

    def set_summary(self, **fields: Any) -> None:
        if self.bar is not None and "steps_done" in fields:
            self.bar.n = fields["steps_done"]
            self.bar.close()


def explain_failure(e: BaseException) -> str:
    """Known failures → the cause and the fix (torchtune/h2o style); anything else → type and message."""
    name = type(e).__name__
    if is_user_error(e):
        return str(e)
    if name == "OutOfMemoryError" or isinstance(e, MemoryError) or "out of memory" in str(e).lower():
        return (
            f"out of memory ({name}): lower train.batch_size or train.max_seq_len, raise train.grad_accum to "
            "keep the effective batch, turn on train.gradient_checkpointing, or use quant: 4bit"
        )
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return f"{name}: {e}"


def record_failure(args, store, run_id: int, e: BaseException) -> int:
    """The run ends `failed` with one line; a real bug's traceback goes to the log (train.log when queued)."""
    from storage import RunStatus

    msg = explain_failure(e)
    if not (is_user_error(e) or isinstance(e, KeyboardInterrupt) or msg.startswith("out of memory")):
        if sys.stderr.isatty():  # a foreground run: keep the terminal to one line, the traceback in the log
            where = log_traceback(args, e)
            msg += f" (traceback in {where})" if where else ""
        else:  # the queue's child: stderr is runs/<id>/train.log
            traceback.print_exc()
    print(f"error: {msg}", file=sys.stderr, flush=True)
    try:
        store.finish(run_id, RunStatus.FAILED, error=msg, exit_code=1)
    except Exception as db:  # the disk or database is gone: the parent (or reconcile) records the exit
        print(f"error: could not record the failure in the database: {type(db).__name__}: {db}", file=sys.stderr)
    return 1


def cmd_train(args) -> int:
    """One run in this process; or, with several devices, torchrun around this very command (engine.core.launch),
    this process watching it; or, under torchrun, one of its ranks."""
    try:
        cfg = RunConfig.from_file(args.config)
    except ConfigError as e:
        return fail(str(e))
    if "LOCAL_RANK" in os.environ:  # one of the processes torchrun started
        return train_rank(args, cfg, int(os.environ.get("RANK", "0")))
    store, home = open_store(args), home_of(args)
    placed = None
    if not os.environ.get(PLACED_ENV):  # the queue chose the devices already; a foreground run chooses here
        try:
            placed = wait_for_gpus(Placer(home, this_host()), cfg.to_dict(), store)
        except Unplaceable as e:
            return fail(str(e))
        os.environ.update(placed.env())  # before torch starts: the GPUs this process and its ranks may see
    run_id, out = own_run(args, store, home, cfg)
    if placed is not None:  # its GPUs are taken from now on: the queue's placement sees them busy
        store.update_run(run_id, devices=placed.label, world_size=placed.world)
    if placed is not None and placed.world > 1:
        return run_torchrun(args, store, home, run_id, placed.world)
    return train_here(args, cfg, store, home, run_id, out, os.getpid())


def own_run(args, store, home: Path, cfg: RunConfig) -> tuple[int, Path]:
    """(run id, its folder): the queued run given by --run-id, or a foreground run recorded now, born running
    so that no queue worker claims it."""
    from storage import RunStatus

    if args.run_id is not None:
        return args.run_id, Path(store.get_run(args.run_id).out_dir or run_dir(home, args.run_id))
    run_id = store.create_run(
        cfg.name or Path(args.config).stem, cfg.to_dict(), "", model=cfg.model, status=RunStatus.RUNNING
    )
    out = run_dir(home, run_id)
    store.set_out_dir(run_id, str(out))
    (out / CONFIG_NAME).write_text(cfg.to_json())
    return run_id, out


def on_stop_signals() -> dict[str, bool]:
    """SIGTERM/SIGINT set the flag: the run finishes its step, saves a checkpoint and the adapter, and ends."""
    stop = {"flag": False}

    def on_term(signum, frame):
        stop["flag"] = True
        say(f"received {signal.Signals(signum).name}: saving a checkpoint and stopping")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    return stop


def train_here(args, cfg: RunConfig, store, home: Path, run_id: int, out: Path, pid: int) -> int:
    """Train in this process (the only one, or rank 0), recording the run; pid: the process the queue watches
    and signals (under torchrun its agent)."""
    from storage import RunStatus, StoreSink

    resume = args.resume or store.get_run(run_id).resume_from
    if not store.mark_running(run_id, pid):  # cancelled (or ended) while this process was starting
        say(f"run {run_id} is already {store.get_run(run_id).status.value}; not training")
        return 1
    stop = on_stop_signals()
    from engine.core.events import TeeSink

    sink = TeeSink(StoreSink(store, run_id), ProgressSink())
    say(f"run {run_id}: {cfg.model} on {cfg.dataset} → {out}")
    try:
        from engine.ml.train import train

        result = train(cfg, out, sink, lambda: stop["flag"], resume_from=resume, home=home)
    except BaseException as e:  # record every ending, then let the exit code speak
        if peer_lost(e):  # another rank died: its exit status is the run's (the queue or run_torchrun records it)
            return fail(f"rank 0: another rank is gone, stopping ({type(e).__name__})", PEER_LOST_EXIT)
        return record_failure(args, store, run_id, e)
    status = RunStatus.CANCELLED if result.status == "cancelled" else RunStatus.SUCCEEDED
    store.finish(run_id, status, exit_code=0)
    val = f", val loss {result.final_val_loss:.4f}" if result.final_val_loss is not None else ""
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    say(
        f"run {run_id} {status.value}: {result.steps_done}/{result.total_steps} steps, loss {loss}{val}, "
        f"{result.duration_s:.0f} s; adapter: {result.adapter_dir}"
    )
    print(run_id)
    return 0


def peer_lost(e: BaseException) -> bool:
    mod = sys.modules.get("engine.ml.distributed")
    return bool(mod and int(os.environ.get("WORLD_SIZE", "1")) > 1 and mod.is_peer_lost(e))


def train_rank(args, cfg: RunConfig, rank: int) -> int:
    """One of torchrun's processes. Rank 0 records the run (a foreground `torchrun ... train CONFIG` gets its row
    here); the others only train. Every rank dies with its torchrun (no orphan trains on)."""
    die_with_parent()
    home = home_of(args)
    if rank == 0:
        store = open_store(args)
        run_id, out = own_run(args, store, home, cfg)
        return train_here(args, cfg, store, home, run_id, out, os.getppid())  # the queue watches torchrun
    resume = args.resume or (open_store(args).get_run(args.run_id).resume_from if args.run_id is not None else None)
    stop = on_stop_signals()
    try:
        from engine.ml.train import train

        train(cfg, None, should_stop=lambda: stop["flag"], resume_from=resume, home=home)
    except BaseException as e:
        if peer_lost(e):
            return fail(f"rank {rank}: another rank is gone, stopping ({type(e).__name__})", PEER_LOST_EXIT)
        return fail(f"rank {rank}: {explain_failure(e)}", 1)
    return 0


def run_torchrun(args, store, home: Path, run_id: int, nproc: int) -> int:
    """A foreground run of several processes: torchrun around this command with --run-id; this process relays
    SIGTERM to it, shows its output, and records the end if no rank could (a rank was killed)."""
    import subprocess

    from engine.core.launch import REPO_ROOT, engine_env, torchrun_argv
    from storage import RunStatus

    config = str(Path(args.config).resolve())  # torchrun starts in the project root
    cmd = torchrun_argv(["train", config, "--run-id", str(run_id)], nproc, home=Path(home).resolve())
    say(f"run {run_id}: {nproc} processes under torchrun")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=engine_env(db_url=store.url), stderr=subprocess.PIPE, text=True)
    signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    signal.signal(signal.SIGINT, lambda *_: None)  # Ctrl-C reaches torchrun too: it stops its ranks
    tail: list[str] = []
    for line in proc.stderr:  # shown as it comes; the end kept for torchrun's failure report
        sys.stderr.write(line)
        tail = (tail + [line])[-200:]
    rc = proc.wait()
    if rc and not store.get_run(run_id).is_terminal:
        error, code = explain_end(rc, "".join(tail))
        store.finish(run_id, RunStatus.FAILED, error=error, exit_code=code, only_if_not_terminal=True)
        return fail(f"run {run_id} failed: {error}", 1)
    return rc


def register(sub) -> None:
    t = sub.add_parser("train", help="train in the foreground; prints the run id")
    t.add_argument("config", help="YAML or JSON run config")
    t.add_argument("--run-id", type=int, help="an existing queued run to execute (used by the job queue)")
    t.add_argument("--resume", help="a checkpoint folder to continue from")
    t.set_defaults(fn=cmd_train)
