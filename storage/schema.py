"""The database schema: SQLAlchemy 2.0 typed ORM rows, and the frozen records they convert to.

The `*Row` classes are private to `storage`. Each has `to_record()` (Home Assistant's
`to_native()` idea), which `Store` calls before its session closes, so Gradio callbacks only ever
hold plain frozen dataclasses, never a detached ORM object that could try to lazy-load.

The same tables must work on SQLite (the default, one file in the data home) and PostgreSQL
(`--db-url`), so every type here is chosen to render correctly on both; see `BigInt` and
`UTCDateTime`. `make_engine` lives here too because the schema depends on it: SQLite only honours
the ON DELETE clauses below when each connection turns foreign keys on.
"""

import json
import math
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import partial
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Dialect,
    Double,
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    create_engine,
    event,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import StaticPool

# Bump when a table or column changes, and add the step from the previous version to MIGRATIONS.
SCHEMA_VERSION = 3
SCHEMA_VERSION_KEY = "schema_version"
# version → the DDL that takes a database from that version to the next. Only portable statements (the
# same text runs on SQLite and PostgreSQL); new tables need none: create_all adds them after migrating.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE runs ADD COLUMN host VARCHAR(255)",),
    2: (
        "ALTER TABLE runs ADD COLUMN sweep_id BIGINT REFERENCES sweeps(id) ON DELETE SET NULL",
        "ALTER TABLE runs ADD COLUMN devices VARCHAR(200)",
        "ALTER TABLE runs ADD COLUMN world_size INTEGER",
    ),
}


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL: frozenset[RunStatus] = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})

# Parameter and token counts pass 2**31 (a 7B model), so integers are BIGINT on PostgreSQL.
# SQLite keeps INTEGER: only `INTEGER PRIMARY KEY` is an alias of the rowid there, and a
# `BIGINT PRIMARY KEY` would silently lose its autoincrement.
BigInt = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    SQLite has no time zone type: SQLAlchemy writes the wall-clock digits and reads back a naive
    datetime. We store UTC digits and re-attach UTC on the way out, so DTOs always compare and
    subtract correctly. PostgreSQL gets `timestamptz` and is only normalised to UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware one, e.g. datetime.now(UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# ---------------------------------------------------------------------------------------------
# Records: what Store hands out


@dataclass(frozen=True)
class RunRecord:
    """One row of `runs`, with the JSON columns parsed and the timestamps in UTC."""

    id: int
    name: str
    status: RunStatus
    config: dict[str, Any] = field(hash=False)
    model: str
    out_dir: str
    pid: int | None
    worker_pid: int | None
    host: str | None  # the machine the run's worker and training process run on (several hosts may share a DB)
    parent_id: int | None
    sweep_id: int | None  # the sweep this run is a member of
    devices: str | None  # what it trains on, e.g. "cuda:0,1" or "cpu"
    world_size: int | None  # training processes (1 unless data-parallel)
    resume_from: str | None
    error: str | None
    exit_code: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    final_loss: float | None
    best_val_loss: float | None
    final_val_loss: float | None
    steps_done: int | None
    total_steps: int | None
    tokens_seen: int | None
    duration_s: float | None
    peak_mem_gb: float | None
    est_mem_gb: float | None
    trainable_params: int | None
    total_params: int | None
    adapter_dir: str | None
    device: str | None
    summary: dict[str, Any] = field(hash=False)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def duration(self) -> timedelta | None:
        """Wall time since the run started: up to finished_at, or up to now while it runs."""
        if self.started_at is None:
            return None
        return (self.finished_at or utcnow()) - self.started_at


@dataclass(frozen=True)
class SweepRecord:
    """One row of `sweeps`: a named grid of runs; its members are the runs whose sweep_id is this id."""

    id: int
    name: str
    spec: dict[str, Any] = field(hash=False)  # the sweep as written (base config, grid, budget, ...)
    created_at: datetime


@dataclass(frozen=True)
class MetricPoint:
    id: int  # the cursor for metrics_since()
    run_id: int
    step: int
    name: str
    value: float
    wall_time: float  # unix time, seconds


@dataclass(frozen=True)
class SpectrumRecord:
    step: int
    module: str
    values: tuple[float, ...]  # singular values of ΔW, in the order the engine wrote them
    extra: dict[str, Any] = field(hash=False)  # per-module stats (effective rank, energy, ...)


def _json_default(obj: Any) -> Any:
    # numpy and torch values (scalars and arrays) all offer tolist(); paths become strings.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable: {obj!r}")


def dumps(obj: Any) -> str:
    """JSON for the *_json columns; numpy/torch values and paths are converted."""
    return json.dumps(obj, default=_json_default)


def metric_value(value: float | None) -> float:
    # SQLite stores NaN as NULL; Store.log_metrics never writes NULL otherwise (it skips None).
    return math.nan if value is None else value


class Base(DeclarativeBase):
    type_annotation_map = {int: BigInt, float: Double, datetime: UTCDateTime()}


class RunRow(Base):
    """One training run: its configuration, lifecycle and final figures."""

    __tablename__ = "runs"
    # Serves claim_next_queued (oldest queued), queue_position, counts_by_status and the
    # status filter of list_runs: all filter on status and order or count by id.
    __table_args__ = (Index("ix_runs_status_id", "status", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default=RunStatus.QUEUED.value)
    config_json: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(300), default="")
    out_dir: Mapped[str] = mapped_column(Text)
    # The training child's pid (written by the child) and the scheduler that launched it: recover()
    # after a restart needs both to tell a live run from an orphaned row.
    pid: Mapped[int | None]
    worker_pid: Mapped[int | None]
    # The host of that worker and child: a worker only judges processes of its own host (pids are per host).
    host: Mapped[str | None] = mapped_column(String(255))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))
    sweep_id: Mapped[int | None] = mapped_column(ForeignKey("sweeps.id", ondelete="SET NULL"))
    devices: Mapped[str | None] = mapped_column(String(200))
    world_size: Mapped[int | None] = mapped_column(Integer)
    resume_from: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    exit_code: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # onupdate also fires for Core UPDATE statements, so conditional updates keep it fresh too.
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    # Final figures, written by the engine through update_run(); all optional.
    final_loss: Mapped[float | None]
    best_val_loss: Mapped[float | None]
    final_val_loss: Mapped[float | None]
    steps_done: Mapped[int | None]
    total_steps: Mapped[int | None]
    tokens_seen: Mapped[int | None]
    duration_s: Mapped[float | None]
    peak_mem_gb: Mapped[float | None]
    est_mem_gb: Mapped[float | None]
    trainable_params: Mapped[int | None]
    total_params: Mapped[int | None]
    adapter_dir: Mapped[str | None] = mapped_column(Text)
    device: Mapped[str | None] = mapped_column(String(64))
    summary_json: Mapped[str | None] = mapped_column(Text)

    def to_record(self) -> RunRecord:
        # Every column by name, so a column added here cannot be forgotten in the record.
        values = {c.key: getattr(self, c.key) for c in self.__table__.columns}
        values["status"] = RunStatus(values["status"])
        values["config"] = json.loads(values.pop("config_json"))
        summary = values.pop("summary_json")
        values["summary"] = json.loads(summary) if summary else {}
        return RunRecord(**values)


class SweepRow(Base):
    """A sweep: several runs queued together from one base config and a grid of values."""

    __tablename__ = "sweeps"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    spec_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    def to_record(self) -> SweepRecord:
        return SweepRecord(id=self.id, name=self.name, spec=json.loads(self.spec_json), created_at=self.created_at)


class MetricRow(Base):
    """One scalar of one step, in long format: adding a metric name needs no schema change."""

    __tablename__ = "metrics"
    __table_args__ = (
        # metrics_since(): one range scan per poll, `run_id = ? AND id > cursor ORDER BY id`.
        Index("ix_metrics_run_id_id", "run_id", "id"),
        # metric_series() and last_metrics(): one name of one run, in log order.
        Index("ix_metrics_run_id_name_id", "run_id", "name", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int]
    name: Mapped[str] = mapped_column(String(64))
    # Nullable only because SQLite stores a NaN float as NULL; Store reads NULL back as NaN, so a
    # diverged loss is kept rather than failing the insert.
    value: Mapped[float | None]
    wall_time: Mapped[float]  # unix time, seconds

    def to_record(self) -> MetricPoint:
        return MetricPoint(
            id=self.id,
            run_id=self.run_id,
            step=self.step,
            name=self.name,
            value=metric_value(self.value),
            wall_time=self.wall_time,
        )


class SpectrumRow(Base):
    """Singular values of one module's ΔW = (α/r)·B·A at one step; values_json holds r floats."""

    __tablename__ = "spectra"
    # get_spectra() and spectra_steps() look up by (run_id, step); unique so that saving the same
    # step again replaces a module's spectrum instead of duplicating it.
    __table_args__ = (Index("ux_spectra_run_id_step_module", "run_id", "step", "module", unique=True),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int]
    module: Mapped[str] = mapped_column(String(300))
    values_json: Mapped[str] = mapped_column(Text)
    extra_json: Mapped[str | None] = mapped_column(Text)

    def to_record(self) -> SpectrumRecord:
        return SpectrumRecord(
            step=self.step,
            module=self.module,
            values=tuple(json.loads(self.values_json)),
            extra=json.loads(self.extra_json) if self.extra_json else {},
        )


class MetaRow(Base):
    """Key/value facts about the database itself, starting with the schema version."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


# ---------------------------------------------------------------------------------------------
# Connecting


def _sqlite_pragmas(dbapi_connection: Any, _record: Any, *, wal: bool) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # Wait for a writer instead of failing at once with "database is locked".
        cursor.execute("PRAGMA busy_timeout=5000")
        if wal:
            # The UI reads while the training child writes: with WAL, readers never block the
            # writer and never wait for it. The mode is stored in the file; repeating it is free.
            cursor.execute("PRAGMA journal_mode=WAL")
        # Safe with WAL: a power cut may lose the last commits but never corrupts the file.
        cursor.execute("PRAGMA synchronous=NORMAL")
        # Off by default in SQLite; the metrics/spectra cascades and parent_id SET NULL need it.
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for `url`; on SQLite every connection gets the pragmas the schema relies on."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # A server connection can drop while the UI idles; check it before use.
        return create_engine(url, pool_pre_ping=True)
    if parsed.database in (None, "", ":memory:") or parsed.query.get("mode") == "memory":
        # Each new connection to ":memory:" is a new, empty database: share a single one. Good for
        # single-threaded tests only; WAL does not exist in memory.
        engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", partial(_sqlite_pragmas, wal=False))
    else:
        engine = create_engine(url)
        event.listen(engine, "connect", partial(_sqlite_pragmas, wal=True))
    return engine
