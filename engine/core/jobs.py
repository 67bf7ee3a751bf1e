"""The background job queue: a persistent FIFO of runs, each trained by its own OS process.

    runner = JobRunner(store, home)          # the app and `python -m engine worker` both do this
    runner.recover()                         # after a crash: adopt live children, fail the dead ones
    runner.start()                           # scheduler thread: starts queued runs, oldest first, and
                                             # every reconcile_s fails runs whose process is gone
    run_id = runner.submit(cfg)              # validated, disk-checked, written as `queued`
    runner.cancel(run_id)                    # SIGTERM → checkpoint + adapter, `cancelled`; SIGKILL after grace
    runner.resume(run_id)                    # continue a failed/cancelled run from its last checkpoint

Each run is exactly the command a user could type (runs/<id>/train.log receives its output), under torchrun
when it has several processes, with the GPUs engine.core.placement gave it in CUDA_VISIBLE_DEVICES:

    python -m engine --home HOME train runs/<id>/config.json --run-id <id>
    python -m torch.distributed.run --standalone --nproc_per_node 2 -m engine --home HOME train ... --run-id <id>

The database is the only source of truth and the queue itself: a run is `queued` until a scheduler
claims it with one conditional UPDATE (`Store.claim_next_queued`), so the app and any number of
headless workers can share one database without starting a run twice. The child writes progress and
its own ending; this module writes what the child cannot: that it died (signal or exit code, with the
end of its log). Stdlib + engine.core.config/home + storage only: the web server imports it, never torch.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path

from engine.core.config import RunConfig
from engine.core.devices import Gpu, Placement
from engine.core.disk import DiskSpaceError, check_disk, disk_need_bytes, free_bytes  # noqa: F401 (the API)
from engine.core.launch import DB_URL_ENV, engine_argv, spawn_engine, torchrun_argv
from engine.core.placement import PLACED_ENV, Placer
from engine.core.procs import (
    explain_end,
    explain_exit,
    is_training_child,
    pid_alive,
    signal_group,
    tail_text,
    this_host,
)
from engine.core.reconcile import LAUNCH_ERROR, on_this_host, one_line, why_gone
from engine.core.runs import CONFIG_NAME, LOG_NAME, latest_checkpoint, run_folder
from storage import HOST_ENV, RunRecord, RunStatus, Store, default_db_url

START_MARK = "=== "  # each launch writes one line starting with this to train.log

RESTART_ERROR = "server restarted while the run was active (the training process is gone)"
ADOPTED_ERROR = "the training process ended while the server was down; see train.log"
TAIL_HEADER = "\n--- last lines of train.log ---\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---- the runner -----------------------------------------------------------------------------------------


class JobRunner:
    """Runs each queued training run as `python -m engine train` in its own OS process.

    The database is the only source of truth. The child reports progress and its own end; this class
    reports what the child cannot: that it died (exit code, signal, log tail).
    """

    def __init__(
        self,
        store: Store,
        home: Path,
        *,
        python: str = sys.executable,
        max_concurrent: int | None = None,
        poll_s: float = 0.5,
        reconcile_s: float = 5.0,
        db_url: str | None = None,
        env: Mapping[str, str] | None = None,
        log: Callable[[str], None] | None = None,
        host: str | None = None,
        gpus: list[Gpu] | None = None,
    ) -> None:
        """max_concurrent: runs at the same time (None: one per GPU on a GPU machine, else 1). host: the name
        this runner and its children record (default this machine's). gpus: a stand-in for the machine's."""
        if max_concurrent is not None and max_concurrent < 1:
            raise ValueError(f"max_concurrent = {max_concurrent!r}: must be ≥ 1 (runs at the same time)")
        self.store, self.home = store, Path(home).expanduser().resolve()
        self.python, self.max_concurrent, self.poll_s, self.reconcile_s = python, max_concurrent, poll_s, reconcile_s
        self.host = host or this_host()
        self.placer = Placer(self.home, self.host, gpus=gpus, python=python)
        self.db_url, self.env = db_url, {**(env or {}), HOST_ENV: self.host}
        self._say = log or (lambda msg: None)
        self._lock = threading.RLock()  # claim+launch, the dicts below, cancel's queued check
        self._children: dict[int, subprocess.Popen] = {}  # run id → our child process
        self._adopted: dict[int, int] = {}  # run id → pid of a live child left by a previous server
        self._cancelling: set[int] = set()
        self._escalations: dict[int, threading.Thread] = {}
        self._unrecorded: dict[int, tuple[int, bool, int]] = {}  # run id → (exit code, cancelled, pid) not yet written
        self._launch_errors: dict[int, str] = {}  # run id → why its launch failed, when even that could not be written
        self._suspects: set[tuple[int, int | None]] = set()  # (run id, pid) found gone by the last reconcile
        self._last_error = ""
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

    # -- the command ----------------------------------------------------------------------------------

    def train_args(self, run_id: int, cfg_path: Path) -> list[str]:
        return ["train", str(cfg_path), "--run-id", str(run_id)]

    def command(self, run_id: int, cfg_path: Path, nproc: int = 1) -> list[str]:
        """The child's argv: exactly what a user could type (engine.core.launch builds it), torchrun around it
        for a run of several processes."""
        args = self.train_args(run_id, cfg_path)
        if nproc > 1:
            return torchrun_argv(args, nproc, home=self.home, python=self.python)
        return engine_argv(args, home=self.home, python=self.python)

    def limit(self) -> int:
        """Runs at the same time: max_concurrent, else one per GPU (the placement keeps their GPUs apart)."""
        return self.max_concurrent or max(1, len(self.placer.gpus()))

    def child_db_url(self) -> str | None:
        """The database the child must open, passed in its environment (never argv, where `ps` shows a password):
        None when the child finds this very database by itself ($LORALAB_DB_URL or the home's SQLite)."""
        found = {**os.environ, **self.env}.get(DB_URL_ENV) or default_db_url(self.home)
        return self.store.url if (self.db_url or found != self.store.url) else None

    def run_folder(self, run_id: int, rec: RunRecord | None = None) -> Path:
        return run_folder(rec or self.store.get_run(run_id), self.home)

    def log_path(self, run_id: int) -> Path:
        return self.run_folder(run_id) / LOG_NAME

    def log_tail(self, run_id: int, max_bytes: int = 4000) -> str:
        return tail_text(self.log_path(run_id), max_bytes)

    def active(self) -> list[int]:
        """Runs this runner is executing (its children, and live children adopted by recover())."""
        with self._lock:
            return sorted([*self._children, *self._adopted])

    # -- submit / cancel / resume ----------------------------------------------------------------------

    def submit(
        self,
        cfg: RunConfig | Mapping,
        *,
        name: str | None = None,
        parent_id: int | None = None,
        resume_from: str | None = None,
        est_mem_gb: float | None = None,
        trainable_params: int | None = None,
        sweep_id: int | None = None,
    ) -> int:
        """Validate, check disk space, write the run row (`queued`; of sweep_id) and runs/<id>/config.json; the id.

        Raises ConfigError (every problem listed) or DiskSpaceError before anything is written.
        """
        if not isinstance(cfg, RunConfig):
            if not isinstance(cfg, Mapping):
                raise TypeError(f"submit() takes a RunConfig or a mapping of fields, got {type(cfg).__name__}")
            cfg = RunConfig.from_dict(cfg)
        check_disk(cfg, self.home, trainable_params)
        name = name or cfg.name or f"{Path(cfg.model).name}-r{cfg.lora.r}"
        run_id = self.store.create_run(
            name,
            cfg.to_dict(),
            "",
            model=cfg.model,
            parent_id=parent_id,
            resume_from=resume_from,
            est_mem_gb=est_mem_gb,
            trainable_params=trainable_params,
            sweep_id=sweep_id,
        )
        out = self.home / "runs" / str(run_id)
        out.mkdir(parents=True, exist_ok=True)
        self.store.set_out_dir(run_id, out)
        _write_atomic(out / CONFIG_NAME, cfg.to_json())
        self._say(f"run {run_id}: queued ({name})")
        self._wake.set()
        return run_id

    def cancel(self, run_id: int, grace_s: float = 30.0) -> str:
        """Cancel a run and say what happened. Queued: cancelled at once. Running: SIGTERM to its process
        group (the child saves a checkpoint and the adapter, then ends `cancelled`), SIGKILL after grace_s."""
        with self._lock:  # our scheduler cannot claim it meanwhile
            rec = self.store.get_run(run_id)
            if rec.status is RunStatus.QUEUED and self.store.finish(
                run_id, RunStatus.CANCELLED, error="cancelled before it started", only_if_not_terminal=True
            ):
                self._say(f"run {run_id}: cancelled (it was queued)")
                return f"run {run_id} was queued: cancelled"
            child = self._children.get(run_id)
        rec = self._wait_for_pid(run_id, child)
        if rec.is_terminal:
            return f"run {run_id} already ended ({rec.status.value}); nothing to cancel"
        pid = rec.pid or (child.pid if child else None)
        if pid is None:  # claimed by another runner that has not started it: its launch sees the ending
            self.store.finish(run_id, RunStatus.CANCELLED, error="cancelled while starting", only_if_not_terminal=True)
            return f"run {run_id} was starting: cancelled"
        if not (child or is_training_child(pid)):
            return self._cancel_gone(run_id)
        with self._lock:
            self._cancelling.add(run_id)
        self.store.update_run(run_id, summary={"cancel_requested": time.time()})  # for a watcher elsewhere
        if not signal_group(pid, signal.SIGTERM):
            return self._cancel_gone(run_id)
        t = threading.Thread(
            target=self._escalate, args=(run_id, pid, grace_s), daemon=True, name=f"cancel-run-{run_id}"
        )
        with self._lock:
            self._escalations[run_id] = t
        t.start()
        self._say(f"run {run_id}: SIGTERM sent (pid {pid})")
        return (
            f"run {run_id}: asked the training process (pid {pid}) to stop; it saves a checkpoint and the "
            f"adapter, then ends 'cancelled' (killed after {grace_s:g} s if it has not)"
        )

    def _wait_for_pid(self, run_id: int, child: subprocess.Popen | None, timeout: float = 5.0) -> RunRecord:
        """The run, once its pid is known: a run just claimed by a scheduler has none for a moment."""
        deadline = time.monotonic() + timeout
        while True:
            rec = self.store.get_run(run_id)
            if rec.is_terminal or rec.pid or child or time.monotonic() > deadline:
                return rec
            time.sleep(0.05)

    def _cancel_gone(self, run_id: int) -> str:
        time.sleep(min(1.0, self.poll_s * 2))  # let the child's or its watcher's ending land first
        if self.store.finish(
            run_id,
            RunStatus.CANCELLED,
            error="cancelled; its training process had already ended",
            only_if_not_terminal=True,
        ):
            return f"run {run_id}: its training process was already gone; marked cancelled"
        return f"run {run_id} already ended ({self.store.get_run(run_id).status.value}); nothing to cancel"

    def _escalate(self, run_id: int, pid: int, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not pid_alive(pid):
            return
        # Record the ending first, so that the watcher (ours or another runner's) does not call it a crash.
        self.store.finish(
            run_id,
            RunStatus.CANCELLED,
            only_if_not_terminal=True,
            error=f"cancelled: did not stop within {grace_s:g} s of SIGTERM, killed with SIGKILL"
            + TAIL_HEADER
            + self.log_tail(run_id),
        )
        signal_group(pid, signal.SIGKILL)
        self._say(f"run {run_id}: SIGKILL after {grace_s:g} s")

    def wait_cancelled(self, run_id: int, timeout: float | None = None) -> None:
        """Block until the cancel of `run_id` is over (the process ended, killed if need be)."""
        with self._lock:
            t = self._escalations.get(run_id)
        if t is not None:
            t.join(timeout)

    def resume(self, run_id: int, *, as_new: bool = False) -> int:
        """Queue a failed or cancelled run again from its latest checkpoint: the same run (its loss curve
        continues), or with as_new a new run whose parent is this one. Returns the id that will run."""
        rec = self.store.get_run(run_id)
        if rec.status not in (RunStatus.FAILED, RunStatus.CANCELLED):
            raise ValueError(f"run {run_id} is {rec.status.value}: only a failed or cancelled run can be resumed")
        out = self.run_folder(run_id, rec)
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            every = rec.config.get("train", {}).get("save_every")
            raise ValueError(
                f"run {run_id} has no checkpoint to resume from (nothing in {out / 'checkpoints'}; it "
                f"stopped before its first save, train.save_every = {every}); submit it again instead"
            )
        cfg = RunConfig.from_dict(rec.config)
        if not as_new:
            self._wait_attempt_over(rec)
        if as_new:
            return self.submit(
                cfg,
                name=f"{rec.name} (resumed)",
                parent_id=run_id,
                resume_from=str(ckpt),
                est_mem_gb=rec.est_mem_gb,
                trainable_params=rec.trainable_params,
            )
        check_disk(cfg, self.home, rec.trainable_params)
        self.store.update_run(run_id, summary={"cancel_requested": None})
        self.store.requeue(run_id, resume_from=str(ckpt))
        self._say(f"run {run_id}: queued again, to resume from {ckpt.name}")
        self._wake.set()
        return run_id

    def _wait_attempt_over(self, rec: RunRecord, timeout: float = 15.0) -> None:
        """Wait until the process of the run's last attempt has exited and been recorded (a cancelled child
        marks itself `cancelled` a moment before it exits): re-queueing earlier would race its watcher."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                ours = rec.id in self._children or rec.id in self._adopted
            if not ours and not is_training_child(rec.pid):
                return
            if time.monotonic() > deadline:
                raise ValueError(
                    f"run {rec.id}'s training process (pid {rec.pid}) is still shutting down; "
                    "try again in a few seconds"
                )
            time.sleep(0.05)

    # -- recovery after a crash or restart ---------------------------------------------------------------

    def recover(self) -> list[int]:
        """Deal with runs left `running` by a previous server; returns the ids marked failed.

        A live training child (checked by its command line, since pids get reused) is adopted: watched
        until it ends (it records its own ending; if it cannot, it is marked failed). A run whose process is
        gone is marked failed with the log tail. Runs owned by another live runner are left to it. Queued
        runs stay queued: the scheduler starts them.
        """
        failed = []
        me = os.getpid()
        for rec in self.store.list_runs(status=RunStatus.RUNNING, limit=100_000):
            with self._lock:
                if rec.id in self._children or rec.id in self._adopted or not on_this_host(rec, self.host):
                    continue
                owner = rec.worker_pid
                owned_elsewhere = owner is not None and owner not in (me, rec.pid) and pid_alive(owner)
                if owned_elsewhere:  # that runner watches it (or is about to launch it)
                    continue
                if is_training_child(rec.pid):
                    self._adopted[rec.id] = rec.pid
                    threading.Thread(
                        target=self._watch_adopted, args=(rec.id, rec.pid), daemon=True, name=f"adopt-run-{rec.id}"
                    ).start()
                    self._say(f"run {rec.id}: adopted its live training process (pid {rec.pid})")
                    continue
            if self.store.finish(
                rec.id,
                RunStatus.FAILED,
                error=RESTART_ERROR + TAIL_HEADER + self.log_tail(rec.id),
                only_if_not_terminal=True,
            ):
                failed.append(rec.id)
                self._say(f"run {rec.id}: failed ({RESTART_ERROR})")
        return failed

    def _watch_adopted(self, run_id: int, pid: int) -> None:
        while pid_alive(pid):
            if self._stop.wait(self.poll_s):
                with self._lock:  # a later recover() by a new runner takes over
                    self._adopted.pop(run_id, None)
                return
        with self._lock:
            self._adopted.pop(run_id, None)
        try:
            if self._finish_attempt(run_id, pid, RunStatus.FAILED, ADOPTED_ERROR + TAIL_HEADER + self.log_tail(run_id)):
                self._say(f"run {run_id}: failed ({ADOPTED_ERROR})")
        except KeyError:  # deleted meanwhile
            pass
        except Exception as e:  # the database is unreachable: reconcile() ends the run once it is back
            self._note_error(f"recording the end of adopted run {run_id}", e)
        self._wake.set()

    def _finish_attempt(
        self, run_id: int, pid: int, status: RunStatus, error: str, exit_code: int | None = None
    ) -> bool:
        """Record the ending of the attempt run by `pid`, unless the run already ended or was queued again
        (resumed) since: a watcher must never end the next attempt of the same run."""
        with self._lock:  # our scheduler claims and launches under this lock: no attempt of ours is half-started
            rec = self.store.get_run(run_id)
            ours = rec.pid == pid or (rec.pid is None and rec.worker_pid == os.getpid())
            if rec.status is not RunStatus.RUNNING or not ours:
                return False
            return self.store.finish(run_id, status, error=error, exit_code=exit_code, only_if_not_terminal=True)

    # -- the scheduler -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler thread (once; again after stop())."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, daemon=True, name="loralab-scheduler")
            self._thread.start()

    def stop(self, *, cancel_running: bool = False, timeout: float = 30) -> None:
        """Stop starting runs. Running children go on (a restarted server adopts them) unless cancel_running:
        then each is cancelled (checkpoint + adapter saved) and waited for, killed after `timeout` s."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if cancel_running:
            with self._lock:
                mine = dict(self._children)
            for run_id in mine:
                self.cancel(run_id, grace_s=timeout)
            for proc in mine.values():
                try:
                    proc.wait(timeout + 5)
                except subprocess.TimeoutExpired:
                    pass  # SIGKILLed and still not reaped: its watcher records it when it goes

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is queued or running (here or in any runner sharing the database)."""
        deadline = time.monotonic() + timeout
        while True:
            counts = self.store.counts_by_status()
            with self._lock:
                ours = bool(self._children or self._adopted)
            if not ours and counts[RunStatus.QUEUED.value] == 0 and counts[RunStatus.RUNNING.value] == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.1, self.poll_s))

    def _loop(self) -> None:
        last_reconcile = 0.0
        while not self._stop.is_set():
            try:
                self._fill()
            except Exception as e:  # a locked or unreachable database must not end the scheduler: say so, retry
                self._note_error("starting queued runs", e)
            if time.monotonic() - last_reconcile >= self.reconcile_s:
                last_reconcile = time.monotonic()
                try:
                    self.reconcile()
                    self._last_error = ""  # the database answers again: the next error is news
                except Exception as e:
                    self._note_error("checking running runs", e)
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _note_error(self, doing: str, e: BaseException) -> None:
        """One line on stderr per new error (a database that stays down is not repeated every poll)."""
        line = f"loralab scheduler: error while {doing} (retrying): {one_line(e)}"
        if line != self._last_error:
            self._last_error = line
            print(line, file=sys.stderr, flush=True)

    def reconcile(self) -> list[int]:
        """End `failed`, with the cause, every running run of this host whose process is gone (the scheduler
        calls this every reconcile_s s); returns their ids. Ends not written earlier are written first, with
        their exit status; any other run must be found gone twice in a row (its own watcher goes first)."""
        with self._lock:
            unrecorded = dict(self._unrecorded)
        for run_id, (rc, cancelled, pid) in unrecorded.items():
            self._record_or_defer(run_id, rc, cancelled, pid)
        failed, suspects, me = [], set(), os.getpid()
        for rec in self.store.list_runs(status=RunStatus.RUNNING, limit=100_000):
            with self._lock:
                if rec.id in self._children or rec.id in self._adopted or rec.id in self._unrecorded:
                    continue
                launch_error = self._launch_errors.pop(rec.id, None) if rec.worker_pid == me and not rec.pid else None
            cause = LAUNCH_ERROR.format(why=launch_error) if launch_error else why_gone(rec, me=me, host=self.host)
            if cause is None:
                continue
            if not launch_error and (rec.id, rec.pid) not in self._suspects:
                suspects.add((rec.id, rec.pid))  # gone now; failed at the next check if still so
                continue
            if self._finish_attempt(rec.id, rec.pid, RunStatus.FAILED, cause + TAIL_HEADER + self.log_tail(rec.id)):
                failed.append(rec.id)
                self._say(f"run {rec.id}: failed ({cause})")
        self._suspects = suspects
        return failed

    def _fill(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if len(self._children) + len(self._adopted) >= self.limit():
                    return
                got = self.placer.claim(self.store, os.getpid())  # the oldest queued run that fits now
                if got is None:
                    return
                self._launch(*got)

    def _launch(self, rec: RunRecord, placed: Placement) -> None:
        """Start the claimed run's child. Whatever fails before the child exists ends the run `failed` with
        that cause (a full disk, an unwritable log); nothing is left `running` without a process."""
        try:
            proc = self._spawn(rec, placed)
        except Exception as e:
            why = str(e) if isinstance(e, OSError) else one_line(e)
            self._say(f"run {rec.id}: failed ({LAUNCH_ERROR.format(why=why)})")
            try:
                self.store.finish(
                    rec.id, RunStatus.FAILED, error=LAUNCH_ERROR.format(why=why), only_if_not_terminal=True
                )
            except Exception as db:  # reconcile() writes it once the database answers again
                self._launch_errors[rec.id] = why
                self._note_error(f"recording that run {rec.id} could not start", db)
            return
        self._children[rec.id] = proc
        threading.Thread(target=self._watch, args=(rec.id, proc), daemon=True, name=f"watch-run-{rec.id}").start()
        try:
            if not self.store.mark_running(rec.id, proc.pid, self.host):  # cancelled between the claim and now
                signal_group(proc.pid, signal.SIGKILL)
        except Exception as e:  # the child reports in itself; its watcher records its end
            self._note_error(f"recording that run {rec.id} started", e)
        on = f" on {placed.label}" + (f" ({placed.world} processes)" if placed.world > 1 else "")
        self._say(f"run {rec.id}: started (pid {proc.pid}){on}; log: {self.run_folder(rec.id, rec) / LOG_NAME}")

    def _spawn(self, rec: RunRecord, placed: Placement) -> subprocess.Popen:
        out = self.run_folder(rec.id, rec)
        out.mkdir(parents=True, exist_ok=True)
        cfg_path = out / CONFIG_NAME
        if not cfg_path.is_file():  # claimed between submit's row and its file: the row holds the config
            _write_atomic(cfg_path, json.dumps(rec.config, indent=2))
        cmd = self.command(rec.id, cfg_path, placed.world)
        with open(out / LOG_NAME, "ab") as log:  # append: a resumed run keeps its earlier log
            stamp = datetime.now().astimezone().isoformat(timespec="seconds")
            log.write(f"{START_MARK}{stamp} run {rec.id} starts: {shlex.join(cmd)}\n".encode())
            log.flush()
            return spawn_engine(
                self.train_args(rec.id, cfg_path),
                home=self.home,
                python=self.python,
                db_url=self.child_db_url(),
                env={**self.env, **placed.env(), PLACED_ENV: placed.label},
                nproc=placed.world,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def _watch(self, run_id: int, proc: subprocess.Popen) -> None:
        rc = proc.wait()
        with self._lock:
            self._children.pop(run_id, None)
            cancelled = run_id in self._cancelling
            self._cancelling.discard(run_id)
        self._record_or_defer(run_id, rc, cancelled, proc.pid)
        self._wake.set()

    def _record_or_defer(self, run_id: int, rc: int, cancelled: bool, pid: int) -> None:
        """Record the child's end; if the database fails, keep it for reconcile() to retry (this thread ends)."""
        try:
            self._record_exit(run_id, rc, cancelled, pid)
        except KeyError:  # the run was deleted while it ran: nothing to record
            pass
        except Exception as e:
            with self._lock:
                self._unrecorded[run_id] = (rc, cancelled, pid)
            self._note_error(f"recording the end of run {run_id}", e)
            return
        with self._lock:
            self._unrecorded.pop(run_id, None)

    def _record_exit(self, run_id: int, rc: int, cancelled: bool, pid: int) -> None:
        rec = self.store.get_run(run_id)
        tail = TAIL_HEADER + self.log_tail(run_id)
        if rc < 0 and (cancelled or rec.summary.get("cancel_requested")):
            status = RunStatus.CANCELLED
            error = f"cancelled: the training process was {explain_exit(rc).split(':')[0]} before it could save"
        else:  # a run of several processes: the status of the rank that failed first (torchrun's report)
            status = RunStatus.FAILED
            error, rc = explain_end(rc, tail) if rc else ("exited with code 0 without recording how the run ended", rc)
        self._finish_attempt(run_id, pid, status, error + tail, exit_code=rc)
        rec = self.store.get_run(run_id)
        if rec.pid == pid:
            why = f": {rec.error.split(TAIL_HEADER)[0]}" if rec.error and rec.status is not RunStatus.SUCCEEDED else ""
            self._say(f"run {run_id}: {rec.status.value}{why}")
