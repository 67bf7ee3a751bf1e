"""`train`: one run in the foreground (or the job queue's child process), recorded in the database."""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from engine.cli.common import fail, home_of, is_user_error, log_traceback, open_store, say
from engine.core.config import ConfigError, RunConfig
from engine.core.home import run_dir
from engine.core.procs import this_host
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
    try:
        cfg = RunConfig.from_file(args.config)
    except ConfigError as e:
        return fail(str(e))
    store = open_store(args)
    home = home_of(args)
    from storage import RunStatus, StoreSink

    run_id = args.run_id
    if run_id is None:  # foreground run: it records itself, born running so no queue worker claims it
        run_id = store.create_run(
            cfg.name or Path(args.config).stem, cfg.to_dict(), "", model=cfg.model, status=RunStatus.RUNNING
        )
        out = run_dir(home, run_id)
        store.set_out_dir(run_id, str(out))
        (out / CONFIG_NAME).write_text(cfg.to_json())
    else:
        out = Path(store.get_run(run_id).out_dir or run_dir(home, run_id))
    resume = args.resume or store.get_run(run_id).resume_from
    if not store.mark_running(run_id, os.getpid()):  # cancelled (or ended) while this process was starting
        say(f"run {run_id} is already {store.get_run(run_id).status.value}; not training")
        return 1
    store.update_run(run_id, summary={"host": this_host()})  # a scheduler on this host may reconcile it

    stop = {"flag": False}

    def on_term(signum, frame):  # cancel: finish the step, save a checkpoint and the adapter, exit cleanly
        stop["flag"] = True
        say(f"received {signal.Signals(signum).name}: saving a checkpoint and stopping")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    from engine.core.events import TeeSink

    sink = TeeSink(StoreSink(store, run_id), ProgressSink())
    say(f"run {run_id}: {cfg.model} on {cfg.dataset} → {out}")
    try:
        from engine.ml.train import train

        result = train(cfg, out, sink, lambda: stop["flag"], resume_from=resume, home=home)
    except BaseException as e:  # record every ending, then let the exit code speak
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


def register(sub) -> None:
    t = sub.add_parser("train", help="train in the foreground; prints the run id")
    t.add_argument("config", help="YAML or JSON run config")
    t.add_argument("--run-id", type=int, help="an existing queued run to execute (used by the job queue)")
    t.add_argument("--resume", help="a checkpoint folder to continue from")
    t.set_defaults(fn=cmd_train)
