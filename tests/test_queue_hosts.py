"""The shared queue: several workers on one database (PostgreSQL here, as on several machines), placement of runs
on a machine's GPUs (a stand-in GPU list), and recovery judged by runs.host.

The children are a stand-in for `python -m engine train ... --run-id N` (STANDIN): it imports only `storage`, so a
run takes a fraction of a second; what is tested is the queue, not the trainer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.core.devices import Gpu
from engine.core.jobs import JobRunner, pid_alive, signal_group
from storage import RunStatus, Store
from tests.test_jobs import REPO_ROOT, start_lines, wait_for

STANDIN = '''#!{python}
"""Stand-in for `python -m engine --home H train CONFIG --run-id N`: reports in (pid, host), notes its
CUDA_VISIBLE_DEVICES beside its config, and ends `succeeded` (STANDIN_MODE=quick) or, on SIGTERM, `cancelled`
(sleep). Plain SQL through sqlite3/psycopg: no SQLAlchemy start-up, so twenty runs take seconds."""
import datetime, os, pathlib, signal, sys, time
args = sys.argv
run_id, home = int(args[args.index("--run-id") + 1]), args[args.index("--home") + 1]
pathlib.Path(args[args.index("train") + 1]).with_name("visible").write_text(os.environ.get("CUDA_VISIBLE_DEVICES", ""))
url = os.environ.get("LORALAB_DB_URL") or "sqlite:///" + os.path.join(home, "loralab.db")
if url.startswith("sqlite"):
    import sqlite3
    db, q = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30), "?"
    now = lambda: datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M:%S.%f")
else:
    import psycopg
    db, q = psycopg.connect(url.replace("+psycopg", "")), "%s"
    now = datetime.datetime.utcnow
def sql(text, *values):
    db.execute(text.replace("?", q), values)
    db.commit()
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
sql("UPDATE runs SET pid = ?, host = ? WHERE id = ? AND status = 'running'", os.getpid(), os.environ["LORALAB_HOST"], run_id)
while os.environ.get("STANDIN_MODE") == "sleep" and not stop:
    time.sleep(0.05)
sql("UPDATE runs SET status = ?, exit_code = 0, finished_at = ? WHERE id = ? AND status = 'running'",
    "cancelled" if stop else "succeeded", now(), run_id)
'''

CFG = {"model": "embedded:SmolLM2-135M-Instruct", "dataset": "builtin:persona", "train": {"max_steps": 1}}


@pytest.fixture
def standin(tmp_path) -> str:
    p = tmp_path / "standin-python"
    p.write_text(STANDIN.format(python=sys.executable))
    p.chmod(0o755)
    return str(p)


@pytest.fixture
def stores():
    made: list[Store] = []

    def make(url: str) -> Store:
        made.append(Store(url))
        return made[-1]

    yield make
    for s in made:
        s.close()


def runner(store, home, python, mode="quick", **kw) -> JobRunner:
    return JobRunner(store, home, python=python, poll_s=0.05, reconcile_s=0.2, env={"STANDIN_MODE": mode}, **kw)


def test_twenty_submissions_from_two_workers_run_once_each_fifo_on_postgres(pg_url, stores, home, standin):
    # two schedulers, each with its own connections (as two machines would have): the claim is atomic
    a = runner(stores(pg_url), home, standin, db_url=pg_url, host="host-a")
    b = runner(stores(pg_url), home, standin, db_url=pg_url, host="host-b")
    ids = [a.submit(CFG, trainable_params=1000) for _ in range(10)] + [
        b.submit(CFG, trainable_params=1000) for _ in range(10)
    ]
    a.start()
    b.start()
    try:
        assert a.wait_idle(60) and b.wait_idle(10)
    finally:
        a.stop()
        b.stop()
    runs = sorted(a.store.list_runs(), key=lambda r: r.id)
    assert [r.id for r in runs] == ids
    assert [r.status for r in runs] == [RunStatus.SUCCEEDED] * 20, [(r.id, r.error) for r in runs]
    assert [start_lines(home, i) for i in ids] == [1] * 20  # each launched exactly once
    assert [r.id for r in sorted(runs, key=lambda r: r.started_at)] == ids  # claimed oldest first
    assert {r.host for r in runs} == {"host-a", "host-b"}  # both took part, each recording its host


def test_a_sigkilled_worker_is_recovered_by_a_worker_on_its_own_host_only(pg_url, stores, home, standin):
    store = stores(pg_url)
    run_id = runner(store, home, standin).submit(CFG, trainable_params=1000)
    worker = subprocess.Popen(  # a worker process on host-a whose child trains "forever"
        [
            sys.executable,
            "-c",
            "import sys, time; from storage import Store; from engine.core.jobs import JobRunner; "
            "r = JobRunner(Store(sys.argv[1]), sys.argv[2], python=sys.argv[3], db_url=sys.argv[1], host='host-a', "
            "env={'STANDIN_MODE': 'sleep'}, poll_s=0.05); r.start(); time.sleep(600)",
            pg_url,
            str(home),
            standin,
        ],
        cwd=REPO_ROOT,
    )
    try:
        rec = wait_for(lambda: (r := store.get_run(run_id)).pid and r, 30, "the run's child to report in")
        assert rec.host == "host-a" and rec.worker_pid == worker.pid
        os.kill(worker.pid, signal.SIGKILL)  # the worker dies with no chance to clean up...
        signal_group(rec.pid, signal.SIGKILL)  # ...and so does its training process
        worker.wait(10)
        wait_for(lambda: not pid_alive(rec.pid), 10, "the child to die")
        other = runner(stores(pg_url), home, standin, host="host-b")
        assert other.recover() == [] and other.reconcile() == []  # a pid means nothing on another host
        assert store.get_run(run_id).status is RunStatus.RUNNING
        same = runner(stores(pg_url), home, standin, host="host-a")
        assert same.recover() == [run_id]
        rec = store.get_run(run_id)
        assert rec.status is RunStatus.FAILED and "restarted" in rec.error
    finally:
        if worker.poll() is None:
            worker.kill()


def test_two_one_gpu_jobs_run_at_once_on_two_gpus_and_a_third_waits(store_home, standin):
    store, home = store_home
    gpus = [Gpu(0, "stand-in", 80.0, 80.0), Gpu(1, "stand-in", 80.0, 80.0)]
    r = runner(store, home, standin, mode="sleep", gpus=gpus)
    one_gpu = {**CFG, "train": {"max_steps": 1, "devices": 1}}
    ids = [r.submit(one_gpu, trainable_params=1000) for _ in range(3)]
    r.start()
    try:
        wait_for(lambda: [store.get_run(i).pid is not None for i in ids[:2]] == [True, True], 30, "two runs to start")
        time.sleep(0.5)  # several scheduler passes: the third must stay queued
        first, second, third = (store.get_run(i) for i in ids)
        assert third.status is RunStatus.QUEUED and r.limit() == 2
        assert {first.devices, second.devices} == {"cuda:0", "cuda:1"}
        visible = {(home / "runs" / str(i) / "visible").read_text() for i in ids[:2]}
        assert visible == {"0", "1"}  # each child sees its own GPU only (CUDA_VISIBLE_DEVICES)
        assert (first.world_size, second.world_size) == (1, 1)
        freed = first.devices
        r.cancel(ids[0])  # its GPU frees: the third starts there
        wait_for(lambda: store.get_run(ids[2]).pid is not None, 30, "the third run to start")
        assert store.get_run(ids[2]).devices == freed
        assert store.get_run(ids[0]).status is RunStatus.CANCELLED
    finally:
        r.stop(cancel_running=True, timeout=10)


@pytest.fixture
def store_home(home):
    s = Store.for_home(home)
    yield s, Path(home)
    s.close()
