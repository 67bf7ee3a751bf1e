"""Tests of storage.Store on real SQLite files (WAL needs a file) and on PostgreSQL (a fresh database per test on
the server of LORALAB_TEST_PG_URL; CI starts a throwaway cluster with .ci/postgres.sh), with threads and processes."""

import dataclasses
import math
import multiprocessing as mp
import os
import sqlite3
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import MetaData, Table, create_engine, text
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import NoInspectionAvailable
from sqlalchemy.pool import NullPool
from sqlalchemy.schema import CreateIndex, CreateTable

import storage
from storage import (
    SCHEMA_VERSION,
    TERMINAL,
    MetricPoint,
    RunRecord,
    RunStatus,
    SpectrumRecord,
    Store,
    StoreSink,
    default_db_url,
)
from storage.schema import Base

REPO_ROOT = Path(__file__).resolve().parents[1]
# Children are spawned, not forked: like the real training child they start a clean interpreter
# and open their own Store, instead of inheriting the parent's pooled SQLite connections.
SPAWN = mp.get_context("spawn")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "test.db"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, db_path: Path) -> str:
    return f"sqlite:///{db_path}" if request.param == "sqlite" else request.getfixturevalue("pg_url")


@pytest.fixture
def store(db_url: str):
    with Store(db_url) as s:
        yield s


@pytest.fixture
def sqlite_store(db_path: Path):
    with Store(f"sqlite:///{db_path}") as s:
        yield s


def raw(db_url: str, sql: str, **params: object) -> object:
    """Run one statement on a connection of its own, independently of Store's code; the first value, if any."""
    engine = create_engine(db_url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(sql), params)
            return result.scalar() if result.returns_rows else None
    finally:
        engine.dispose()


def raw_scalar(db_path: Path, sql: str, *args: object) -> object:
    """Ask the SQLite file directly with sqlite3 (for SQLite's own pragmas)."""
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute(sql, args).fetchone()[0]
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# Child-process bodies (module level so that spawn can import them)


def _claim_all(url: str, create: Any, claim: Any, ready: Any, out: Any) -> None:
    create.wait(10)  # first race: both processes create the new database at once
    with Store(url) as store:
        ready.put(os.getpid())
        claim.wait(10)  # second race: both claim, once the parent has queued the runs
        claimed = []
        while (run := store.claim_next_queued(worker_pid=os.getpid())) is not None:
            claimed.append(run.id)
        out.put((os.getpid(), claimed))


def _write_run(url: str, run_id: int, steps: int) -> None:
    with Store(url) as store:
        sink = StoreSink(store, run_id)
        store.mark_running(run_id, pid=os.getpid())
        for step in range(1, steps + 1):
            sink.log(step, {"train/loss": 10.0 / step, "lr": 1e-4})
            if step % 50 == 0:
                sink.log_spectra(step, {"layers.0.q_proj": [float(step), 1.0]})
        sink.set_summary(final_loss=10.0 / steps, steps_done=steps)
        store.finish(run_id, RunStatus.SUCCEEDED, exit_code=0)


# ---------------------------------------------------------------------------------------------
# Lifecycle


def test_lifecycle_queued_running_succeeded_sets_utc_timestamps(store: Store) -> None:
    before = datetime.now(UTC)
    run_id = store.create_run("r8", {"lora": {"r": 8, "alpha": 16}}, "", model="tiny-llama")
    store.set_out_dir(run_id, f"runs/{run_id}")

    queued = store.get_run(run_id)
    assert queued.status is RunStatus.QUEUED
    assert queued.config == {"lora": {"r": 8, "alpha": 16}}
    assert (queued.model, queued.out_dir) == ("tiny-llama", f"runs/{run_id}")
    assert queued.created_at.tzinfo is UTC and before <= queued.created_at <= datetime.now(UTC)
    assert (queued.started_at, queued.finished_at, queued.duration) == (None, None, None)
    assert store.queue_position(run_id) == 1

    claimed = store.claim_next_queued(worker_pid=4242)
    assert claimed is not None and claimed.id == run_id
    assert (claimed.status, claimed.worker_pid, claimed.pid) == (RunStatus.RUNNING, 4242, None)
    assert claimed.started_at >= queued.created_at
    assert store.queue_position(run_id) is None

    assert store.mark_running(run_id, pid=777) is True
    running = store.get_run(run_id)
    assert running.pid == 777
    assert running.started_at == claimed.started_at  # the child keeps the scheduler's start time
    assert not running.is_terminal

    assert store.finish(run_id, RunStatus.SUCCEEDED, exit_code=0) is True
    done = store.get_run(run_id)
    assert done.status is RunStatus.SUCCEEDED and done.is_terminal
    assert (done.exit_code, done.error) == (0, None)
    assert done.started_at <= done.finished_at <= datetime.now(UTC)
    assert done.duration == done.finished_at - done.started_at
    assert done.updated_at >= done.finished_at

    # A fresh engine reads the naive SQLite digits back as the same aware UTC instants.
    with Store(store.url) as reopened:
        again = reopened.get_run(run_id)
    assert again.finished_at == done.finished_at and again.finished_at.tzinfo is UTC
    assert store.counts_by_status() == {"queued": 0, "running": 0, "succeeded": 1, "failed": 0, "cancelled": 0}


def test_finish_only_if_not_terminal_keeps_the_childs_own_ending(store: Store) -> None:
    run_id = store.create_run("a", {}, "runs/a", status=RunStatus.RUNNING)
    assert store.finish(run_id, RunStatus.SUCCEEDED) is True
    ended = store.get_run(run_id)

    # The parent's watcher sees the child exit afterwards and must not overwrite its success.
    assert store.finish(run_id, RunStatus.FAILED, error="exit -9", exit_code=-9, only_if_not_terminal=True) is False
    kept = store.get_run(run_id)
    assert (kept.status, kept.error, kept.exit_code) == (RunStatus.SUCCEEDED, None, None)
    assert kept.finished_at == ended.finished_at
    # A late child reporting in must not resurrect an ended run either.
    assert store.mark_running(run_id, pid=1) is False
    assert store.get_run(run_id).status is RunStatus.SUCCEEDED

    # A child that died without writing its ending: the watcher's write goes through.
    died = store.create_run("b", {}, "runs/b", status=RunStatus.RUNNING)
    assert store.finish(died, RunStatus.FAILED, error="exit 3", exit_code=3, only_if_not_terminal=True) is True
    failed = store.get_run(died)
    assert (failed.status, failed.error, failed.exit_code) == (RunStatus.FAILED, "exit 3", 3)

    with pytest.raises(ValueError, match="terminal status"):
        store.finish(died, RunStatus.RUNNING)
    with pytest.raises(KeyError, match="no run with id 999"):
        store.finish(999, RunStatus.FAILED, only_if_not_terminal=True)


def test_requeue_clears_the_previous_attempt(store: Store) -> None:
    run_id = store.create_run("a", {}, "runs/a")
    store.claim_next_queued(worker_pid=10)
    store.mark_running(run_id, pid=11)
    store.finish(run_id, RunStatus.FAILED, error="server restarted", exit_code=-15)

    store.requeue(run_id, resume_from="runs/a/checkpoints/step-100")
    run = store.get_run(run_id)
    assert run.status is RunStatus.QUEUED
    assert run.resume_from == "runs/a/checkpoints/step-100"
    assert (run.pid, run.worker_pid, run.error, run.exit_code) == (None, None, None, None)
    assert (run.started_at, run.finished_at) == (None, None)
    assert store.claim_next_queued(worker_pid=12).id == run_id


# ---------------------------------------------------------------------------------------------
# Queue


def test_claim_next_queued_is_fifo_and_skips_non_queued_runs(store: Store) -> None:
    first = store.create_run("1", {}, "")
    store.create_run("busy", {}, "", status=RunStatus.RUNNING)
    second = store.create_run("2", {}, "")
    third = store.create_run("3", {}, "")
    assert [store.queue_position(i) for i in (first, second, third)] == [1, 2, 3]

    claimed = [store.claim_next_queued(worker_pid=1).id for _ in range(3)]
    assert claimed == [first, second, third]
    assert store.claim_next_queued(worker_pid=1) is None
    assert store.counts_by_status()["running"] == 4


def test_two_threads_claim_each_of_20_runs_exactly_once(store: Store) -> None:
    ids = [store.create_run(f"r{i}", {}, "") for i in range(20)]
    n_threads = 4
    start = threading.Barrier(n_threads)
    claims: dict[int, list[int]] = {t: [] for t in range(n_threads)}

    def worker(t: int) -> None:
        start.wait()
        while (run := store.claim_next_queued(worker_pid=1000 + t)) is not None:
            claims[t].append(run.id)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)

    everything = [i for got in claims.values() for i in got]
    assert sorted(everything) == ids  # each run once: no duplicate, none lost
    for t, got in claims.items():
        assert got == sorted(got)  # each claimer still sees the queue in FIFO order
        assert {store.get_run(i).worker_pid for i in got} <= {1000 + t}
    assert store.counts_by_status()["running"] == 20


def test_claims_record_the_host_and_skip_rows_another_claimer_holds(store: Store, db_url: str) -> None:
    first, second = store.create_run("1", {}, ""), store.create_run("2", {}, "")
    if db_url.startswith("postgresql"):
        # Another claimer holds the oldest queued row (SELECT ... FOR UPDATE, transaction still open):
        # SKIP LOCKED hands this one the next row instead of waiting for the first to commit.
        engine = create_engine(db_url, poolclass=NullPool)
        holder = engine.connect()
        tx = holder.begin()
        holder.execute(text("SELECT id FROM runs WHERE id = :id FOR UPDATE"), {"id": first})
        got: list = []
        t = threading.Thread(target=lambda: got.append(store.claim_next_queued(worker_pid=5, host="node-b")))
        t.start()
        t.join(30)
        tx.rollback()
        holder.close()
        engine.dispose()
        assert not t.is_alive() and got and got[0].id == second and got[0].host == "node-b"
        assert store.claim_next_queued(worker_pid=6).id == first
    else:
        assert store.claim_next_queued(worker_pid=5, host="node-b").id == first
    run = store.get_run(first)
    assert run.host in ("node-b", storage.this_host()) and run.worker_pid in (5, 6)
    store.mark_running(first, pid=123)  # the child reports from its own machine
    assert store.get_run(first).host == storage.this_host()
    store.finish(first, RunStatus.FAILED)
    store.requeue(first, resume_from=None)
    assert store.get_run(first).host is None  # a new attempt may run anywhere


def test_two_processes_create_the_database_then_claim_each_of_20_runs_once(db_url: str) -> None:
    create, claim, ready, out = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue(), SPAWN.Queue()
    args = (db_url, create, claim, ready, out)
    procs = [SPAWN.Process(target=_claim_all, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    create.set()
    for _ in procs:
        ready.get(timeout=30)  # both opened the new file: neither failed on the other's tables
    with Store(db_url) as store:
        ids = [store.create_run(f"r{i}", {}, "") for i in range(20)]
        claim.set()
        results = dict(out.get(timeout=30) for _ in procs)
        for p in procs:
            p.join(30)
            assert p.exitcode == 0

        everything = [i for got in results.values() for i in got]
        assert sorted(everything) == ids
        for pid, got in results.items():
            assert all(store.get_run(i).worker_pid == pid for i in got)


# ---------------------------------------------------------------------------------------------
# Metrics


def test_metrics_since_cursor_returns_only_newer_points_in_order(store: Store) -> None:
    run_id = store.create_run("a", {}, "")
    other = store.create_run("b", {}, "")
    t0 = datetime.now(UTC).timestamp()
    store.log_metrics(run_id, 1, {"train/loss": 2.0, "lr": 1e-4, "grad_norm": None})
    store.log_metrics(other, 1, {"train/loss": 9.0})

    first = store.metrics_since(run_id)
    assert [(p.step, p.name, p.value) for p in first] == [(1, "train/loss", 2.0), (1, "lr", 1e-4)]
    assert all(p.run_id == run_id and t0 <= p.wall_time for p in first)
    cursor = first[-1].id
    assert store.metrics_since(run_id, cursor) == []

    store.log_metrics(run_id, 2, {"train/loss": 1.5})
    store.log_metrics(run_id, 3, {"train/loss": 1.0, "lr": 5e-5})
    newer = store.metrics_since(run_id, cursor)
    assert [(p.step, p.name, p.value) for p in newer] == [
        (2, "train/loss", 1.5),
        (3, "train/loss", 1.0),
        (3, "lr", 5e-5),
    ]
    ids = [p.id for p in newer]
    assert ids == sorted(ids) and ids[0] > cursor and len(set(ids)) == 3
    assert store.metrics_since(run_id, newer[-1].id) == []  # the other run's points never show

    assert [p.value for p in store.metrics_since(run_id, names=["lr"])] == [1e-4, 5e-5]
    assert store.last_metrics(run_id) == {"train/loss": 1.0, "lr": 5e-5}
    assert store.metric_series(run_id, "train/loss") == [(1, 2.0), (2, 1.5), (3, 1.0)]


def test_metric_series_prefers_the_resumed_value_and_keeps_nan(store: Store) -> None:
    run_id = store.create_run("a", {}, "")
    for step, loss in [(1, 2.0), (2, 1.8), (3, 1.6), (2, 1.7), (3, math.nan)]:
        store.log_metrics(run_id, step, {"loss": loss})
    steps, values = zip(*store.metric_series(run_id, "loss"))
    assert steps == (1, 2, 3)
    assert values[:2] == (2.0, 1.7) and math.isnan(values[2])
    assert math.isnan(store.last_metrics(run_id)["loss"])


def test_log_metrics_fails_loudly(store: Store) -> None:
    with pytest.raises(KeyError, match="no run with id 5"):
        store.log_metrics(5, 1, {"loss": 1.0})
    run_id = store.create_run("a", {}, "")
    with pytest.raises(ValueError, match="longer than 64"):
        store.log_metrics(run_id, 1, {"x" * 65: 1.0})
    assert store.metrics_since(run_id) == []


# ---------------------------------------------------------------------------------------------
# Spectra


def test_spectra_latest_step_order_extra_and_replacement(store: Store) -> None:
    run_id = store.create_run("a", {}, "")
    sink = StoreSink(store, run_id)
    sink.log_spectra(10, {"q_proj": [3, 2, 1], "v_proj": [1.5]}, {"q_proj": {"erank": 2.1}})
    sink.log_spectra(20, {"q_proj": [5.0, 4.0]})
    sink.log_spectra(20, {"q_proj": [6.0, 4.0]})  # recomputed: replaces, never duplicates

    latest = store.get_spectra(run_id)
    assert latest == {"q_proj": SpectrumRecord(step=20, module="q_proj", values=(6.0, 4.0), extra={})}
    early = store.get_spectra(run_id, step=10)
    assert list(early) == ["q_proj", "v_proj"]
    assert early["q_proj"].values == (3.0, 2.0, 1.0) and early["q_proj"].extra == {"erank": 2.1}
    assert store.spectra_steps(run_id) == [10, 20]
    assert store.get_spectra(store.create_run("b", {}, "")) == {}
    with pytest.raises(ValueError, match="k_proj"):
        sink.log_spectra(30, {"q_proj": [1.0]}, {"k_proj": {"erank": 1.0}})


# ---------------------------------------------------------------------------------------------
# Records, updates, listing, deletion


def test_records_are_frozen_dataclasses_not_orm_rows(store: Store) -> None:
    run_id = store.create_run("a", {"lr": 1e-4}, "")
    store.log_metrics(run_id, 1, {"loss": 1.0})
    store.save_spectra(run_id, 1, {"q_proj": [1.0]})
    run = store.get_run(run_id)
    point = store.metrics_since(run_id)[0]
    spectrum = store.get_spectra(run_id)["q_proj"]
    listed = store.list_runs()[0]

    for record, kind in [(run, RunRecord), (point, MetricPoint), (spectrum, SpectrumRecord), (listed, RunRecord)]:
        assert type(record) is kind and dataclasses.is_dataclass(record)
        assert not isinstance(record, Base)
        with pytest.raises(NoInspectionAvailable):
            sa_inspect(record)
        with pytest.raises(dataclasses.FrozenInstanceError):
            record.step = 99  # type: ignore[misc]
    assert isinstance(hash(run), int)

    run.config["lr"] = 1.0  # a record is a copy: changing it changes nothing stored
    assert store.get_run(run_id).config == {"lr": 1e-4}
    store.close()  # records stay usable with the engine gone: nothing left to lazy-load
    assert (listed.id, point.value, spectrum.values) == (run_id, 1.0, (1.0,))


def test_update_run_sets_figures_and_rejects_unknown_fields(store: Store) -> None:
    run_id = store.create_run("a", {}, "", est_mem_gb=1.5, trainable_params=8_000_000_000)
    store.update_run(
        run_id, final_loss=1.25, steps_done=100, adapter_dir=Path("runs/1/adapter"), summary={"tokens_per_s": 3400.0}
    )
    StoreSink(store, run_id).set_summary(best_val_loss=0.9, summary={"stopped": "early"})

    run = store.get_run(run_id)
    assert (run.final_loss, run.best_val_loss, run.steps_done) == (1.25, 0.9, 100)
    assert (run.adapter_dir, run.est_mem_gb) == ("runs/1/adapter", 1.5)
    assert run.trainable_params == 8_000_000_000
    assert run.summary == {"tokens_per_s": 3400.0, "stopped": "early"}

    with pytest.raises(ValueError, match=r"unknown field.*loss_final.*allowed:.*final_loss"):
        store.update_run(run_id, loss_final=1.0, final_loss=0.1)
    with pytest.raises(TypeError, match="steps_done must be int"):
        store.update_run(run_id, steps_done=2.5)
    assert store.get_run(run_id).final_loss == 1.25  # rejected calls wrote nothing
    with pytest.raises(KeyError):
        store.update_run(999, final_loss=1.0)


def test_list_runs_newest_first_with_filters(store: Store) -> None:
    a = store.create_run("a", {}, "", model="m1")
    b = store.create_run("b", {}, "", model="m2", status=RunStatus.RUNNING)
    c = store.create_run("c", {}, "", model="m1")
    store.finish(c, RunStatus.CANCELLED)

    assert [r.id for r in store.list_runs()] == [c, b, a]
    assert [r.id for r in store.list_runs(limit=2)] == [c, b]
    assert [r.id for r in store.list_runs(status="queued")] == [a]
    assert [r.id for r in store.list_runs(status=TERMINAL | {RunStatus.RUNNING})] == [c, b]
    assert [r.id for r in store.list_runs(model="m1")] == [c, a]
    with pytest.raises(ValueError, match="unknown run status 'done'"):
        store.list_runs(status="done")


def test_delete_run_cascades_metrics_and_spectra(store: Store, db_url: str) -> None:
    parent = store.create_run("parent", {}, "")
    child = store.create_run("child", {}, "", parent_id=parent, resume_from="ckpt")
    for run_id in (parent, child):
        store.log_metrics(run_id, 1, {"loss": 1.0, "lr": 0.1})
        store.save_spectra(run_id, 1, {"q_proj": [1.0], "v_proj": [2.0]})
    count = "SELECT count(*) FROM {} WHERE run_id = :id"
    assert raw(db_url, count.format("metrics"), id=parent) == 2

    store.delete_run(parent)
    assert raw(db_url, count.format("metrics"), id=parent) == 0
    assert raw(db_url, count.format("spectra"), id=parent) == 0
    assert raw(db_url, count.format("metrics"), id=child) == 2
    assert raw(db_url, count.format("spectra"), id=child) == 2
    assert store.get_run(child).parent_id is None  # ON DELETE SET NULL
    with pytest.raises(KeyError):
        store.get_run(parent)
    with pytest.raises(KeyError):
        store.delete_run(parent)


# ---------------------------------------------------------------------------------------------
# SQLite behaviour, schema, opening


def test_file_database_is_in_wal_mode(sqlite_store: Store, db_path: Path) -> None:
    assert raw_scalar(db_path, "PRAGMA journal_mode") == "wal"
    # Store's own connections have the per-connection pragmas too.
    with sqlite_store._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL


def test_writer_process_and_reader_share_the_database(store: Store) -> None:
    steps = 200
    run_id = store.create_run("live", {}, "")
    writer = SPAWN.Process(target=_write_run, args=(store.url, run_id, steps))
    writer.start()

    seen, cursor, batches = [], 0, 0
    while True:  # what the UI's timer does, as fast as it can, while the child writes
        finished = store.get_run(run_id).is_terminal
        new = store.metrics_since(run_id, cursor)
        store.get_spectra(run_id)
        if new:
            seen.extend(new)
            cursor = new[-1].id
            batches += 1
        elif finished or not writer.is_alive():
            break
    writer.join(30)

    assert writer.exitcode == 0  # a "database is locked" in the child would exit non-zero
    assert batches > 1  # the reader saw the run progress while it was being written
    assert [p.id for p in seen] == sorted({p.id for p in seen})
    assert [p.step for p in seen if p.name == "train/loss"] == list(range(1, steps + 1))
    run = store.get_run(run_id)
    assert (run.status, run.steps_done, run.final_loss) == (RunStatus.SUCCEEDED, steps, 10.0 / steps)
    assert run.started_at is not None and run.started_at <= run.finished_at  # set by mark_running
    assert store.spectra_steps(run_id) == [50, 100, 150, 200]


def test_newer_or_older_schema_version_refuses_to_open(db_url: str) -> None:
    Store(db_url).close()
    version = "SELECT value FROM meta WHERE key = 'schema_version'"
    assert raw(db_url, version) == str(SCHEMA_VERSION)
    raw(db_url, "UPDATE meta SET value = :v WHERE key = 'schema_version'", v=str(SCHEMA_VERSION + 1))
    with pytest.raises(RuntimeError, match=f"schema version {SCHEMA_VERSION + 1}.*Upgrade LoRA Lab"):
        Store(db_url)
    raw(db_url, "UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    with pytest.raises(RuntimeError, match="schema version 0, older"):
        Store(db_url)


# What each schema version lacks, against the current one: tables and runs columns.
ADDED_IN = {2: ((), ("host",)), 3: (("sweeps",), ("sweep_id", "devices", "world_size"))}


def write_old_database(db_url: str, version: int) -> None:
    """An empty database exactly as release `version` created it: today's tables minus what came later."""
    later = [ADDED_IN[v] for v in ADDED_IN if v > version]
    tables = {t for added, _ in later for t in added}
    columns = {c for _, added in later for c in added}
    old = MetaData()
    for t in Base.metadata.sorted_tables:
        if t.name not in tables:
            Table(t.name, old, *(c._copy() for c in t.columns if t.name != "runs" or c.name not in columns))
    engine = create_engine(db_url, poolclass=NullPool)
    old.create_all(engine)
    engine.dispose()
    raw(db_url, "INSERT INTO meta (key, value) VALUES ('schema_version', :v)", v=str(version))


@pytest.mark.parametrize("old", [1, 2])
def test_an_older_database_is_migrated_in_place(db_url: str, old: int) -> None:
    """A database written by an earlier release opens, keeps its runs and gains the new columns and tables."""
    write_old_database(db_url, old)
    raw(
        db_url,
        "INSERT INTO runs (name, status, config_json, model, out_dir, created_at, updated_at) VALUES "
        "('old', 'queued', '{\"lora\": {\"r\": 4}}', 'm', 'runs/1', :t, :t)",
        t=datetime.now(UTC).replace(tzinfo=None),
    )
    kept = raw(db_url, "SELECT id FROM runs")
    raw(db_url, "INSERT INTO metrics (run_id, step, name, value, wall_time) VALUES (:r, 1, 'loss', 2.0, 0)", r=kept)
    with Store(db_url) as store:
        run = store.get_run(kept)
        assert (run.name, run.config, run.model, run.host, run.sweep_id) == ("old", {"lora": {"r": 4}}, "m", None, None)
        assert store.metric_series(kept, "loss") == [(1, 2.0)]
        assert store.get_meta("schema_version") == str(SCHEMA_VERSION)
        claimed = store.claim_next_queued(worker_pid=7, host="node-a")
        assert (claimed.id, claimed.host) == (kept, "node-a")
        sweep = store.create_sweep("rank", {"grid": {"lora.r": [1, 4]}})
        member = store.create_run("r1", {}, "", sweep_id=sweep)
        assert [r.id for r in store.list_runs(sweep_id=sweep)] == [member]
    columns = {c["name"] for c in sa_inspect(create_engine(db_url, poolclass=NullPool)).get_columns("runs")}
    assert {"host", "sweep_id", "devices", "world_size"} <= columns


def test_sweeps_group_runs_and_outlive_nothing(store: Store) -> None:
    spec = {"base": {"model": "m"}, "grid": {"lora.r": [1, 4], "lora.targets": ["qv", "all-linear"]}}
    sweep = store.create_sweep("r × targets", spec)
    members = [store.create_run(f"m{i}", {}, "", sweep_id=sweep) for i in range(4)]
    loner = store.create_run("alone", {}, "")
    assert store.get_sweep(sweep).spec == spec and store.get_sweep(sweep).name == "r × targets"
    assert [s.id for s in store.list_sweeps()] == [sweep]
    assert [r.id for r in store.list_runs(sweep_id=sweep)] == members[::-1]
    assert store.get_run(loner).sweep_id is None
    store.update_run(members[0], devices="cuda:0,1", world_size=2)
    assert (store.get_run(members[0]).devices, store.get_run(members[0]).world_size) == ("cuda:0,1", 2)
    with pytest.raises(KeyError, match="no sweep with id 999"):
        store.create_run("x", {}, "", sweep_id=999)
    store.delete_sweep(sweep)  # the runs stay (the caller deletes them first to remove them)
    assert all(store.get_run(i).sweep_id is None for i in members)
    with pytest.raises(KeyError):
        store.get_sweep(sweep)


def test_for_home_creates_the_folder_and_honours_the_env_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LORALAB_DB_URL", raising=False)
    home = tmp_path / "nested" / "home"
    with Store.for_home(home) as store:
        assert store.url == default_db_url(home) == f"sqlite:///{home.resolve()}/loralab.db"
        store.create_run("a", {}, "")
    assert (home / "loralab.db").is_file()

    other = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("LORALAB_DB_URL", other)
    with Store.for_home(tmp_path / "home2") as store:
        assert store.url == other
        assert store.list_runs() == []
    assert (tmp_path / "home2").is_dir() and (tmp_path / "elsewhere.db").is_file()
    assert not (tmp_path / "home2" / "loralab.db").exists()


def test_in_memory_database_works_without_wal() -> None:
    with Store("sqlite://") as store:
        run_id = store.create_run("a", {"x": 1}, "")
        store.log_metrics(run_id, 1, {"loss": 1.0})
        assert store.get_run(run_id).config == {"x": 1}
        store.delete_run(run_id)  # foreign_keys is on here too: the metric goes with it
        assert store.metrics_since(run_id) == []
        assert store.get_meta("schema_version") == str(SCHEMA_VERSION)
        store.set_meta("note", "hello")
        assert store.get_meta("note") == "hello" and store.get_meta("nope", "d") == "d"


def test_schema_compiles_for_postgresql() -> None:
    dialect = postgresql.dialect()
    ddl = {t.name: str(CreateTable(t).compile(dialect=dialect)) for t in Base.metadata.sorted_tables}
    assert "id BIGSERIAL" in ddl["runs"] and "total_params BIGINT" in ddl["runs"]
    assert "created_at TIMESTAMP WITH TIME ZONE NOT NULL" in ddl["runs"]
    assert "ON DELETE CASCADE" in ddl["metrics"] and "ON DELETE CASCADE" in ddl["spectra"]
    indexes = {str(CreateIndex(i).compile(dialect=dialect)) for t in Base.metadata.sorted_tables for i in t.indexes}
    assert "CREATE INDEX ix_metrics_run_id_id ON metrics (run_id, id)" in indexes


def test_storage_imports_nothing_of_the_project_and_exports_no_orm() -> None:
    code = (
        "import sys, storage\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'engine', 'ui', 'app', 'torch'})\n"
        "assert not bad, bad\n"
        "assert not [n for n in storage.__all__ if n.endswith('Row') or n == 'Base'], storage.__all__\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
