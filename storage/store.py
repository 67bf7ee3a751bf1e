"""Store: the one source of truth for runs, their metrics and their spectra.

The training child writes progress (`StoreSink`), the parent scheduler writes what the child
cannot (that it died), and the UI polls with a cursor (`metrics_since`). Each method is one short
transaction, `with self._sessions.begin() as s:`, and hands back frozen dataclasses, never ORM
rows: Gradio runs handlers on a thread pool, and a detached row lazy-loading there fails.

Whenever a write depends on the current status (claiming a queued run, finishing a run that may
already be over), it is a single conditional `UPDATE ... WHERE status ...` whose rowcount says who
won. That is atomic on SQLite and PostgreSQL alike, without locks or SQLite-only SQL.
"""

from __future__ import annotations

import json
import operator
import os
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import delete, func, literal, select, text, update
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from .schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    TERMINAL,
    Base,
    MetaRow,
    RunRecord,
    RunRow,
    RunStatus,
    SweepRecord,
    SweepRow,
    UTCDateTime,
    make_engine,
    utcnow,
)
from .schema import (
    dumps as _dumps,
)
from .series import SeriesMixin

if TYPE_CHECKING:
    from sqlalchemy.engine import CursorResult
    from sqlalchemy.sql.dml import Delete, Update

DB_URL_ENV = "LORALAB_DB_URL"
DB_FILENAME = "loralab.db"

_TERMINAL_VALUES = sorted(s.value for s in TERMINAL)

# update_run() may set these columns, each coerced to its Python type before binding: numpy and
# torch scalars are not bindable by the sqlite3 driver.
_FIGURES: dict[str, type] = {
    **dict.fromkeys(("final_loss", "best_val_loss", "final_val_loss"), float),
    **dict.fromkeys(("duration_s", "peak_mem_gb", "est_mem_gb"), float),
    **dict.fromkeys(("steps_done", "total_steps", "tokens_seen"), int),
    **dict.fromkeys(("trainable_params", "total_params"), int),
    **dict.fromkeys(("adapter_dir", "device", "devices"), str),
    "world_size": int,
}
UPDATABLE_FIELDS = frozenset(_FIGURES) | {"summary"}


# ---------------------------------------------------------------------------------------------
# Small helpers


HOST_ENV = "LORALAB_HOST"


def this_host() -> str:
    """This machine's name, as recorded in runs.host (a pid means something only on its own host):
    $LORALAB_HOST when set (containers whose host names change or repeat), else the host name."""
    return os.environ.get(HOST_ENV, "").strip() or socket.gethostname()


def default_db_url(home: str | Path) -> str:
    """`sqlite:///<home>/loralab.db`, with an absolute path so child processes agree on it."""
    return f"sqlite:///{Path(home).expanduser().resolve() / DB_FILENAME}"


def _status(value: str) -> RunStatus:
    try:
        return RunStatus(value)
    except ValueError:
        allowed = ", ".join(s.value for s in RunStatus)
        raise ValueError(f"unknown run status {value!r}; expected one of: {allowed}") from None


def _coerce(name: str, value: Any) -> Any:
    """The value of final-figure column `name` as the plain Python type the column holds."""
    if value is None:
        return None
    kind = _FIGURES[name]
    got = f"{type(value).__name__} {value!r}"
    wrong = TypeError(f"{name} must be {kind.__name__} or None, got {got}")
    try:
        if kind is int:
            return operator.index(value)  # rejects 2.5 instead of truncating it
        if kind is float and not isinstance(value, str):
            return float(value)
        if kind is str and isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
    except TypeError as e:
        raise wrong from e
    raise wrong


def _rowcount(s: Session, stmt: Update | Delete) -> int:
    # We never load the row before a conditional UPDATE in the same session, so there is nothing
    # in the identity map to synchronise.
    result = s.execute(stmt.execution_options(synchronize_session=False))
    return cast("CursorResult[Any]", result).rowcount


# ---------------------------------------------------------------------------------------------
# The store


class Store(SeriesMixin):
    """Runs, metrics and spectra in one SQL database (SQLite by default, PostgreSQL by URL).

    Safe to share between threads (each method opens its own short session) and between
    processes (each opens its own Store on the same URL). In-memory SQLite (`sqlite://`) is the
    exception: one shared connection, for single-threaded tests.
    """

    def __init__(self, url: str) -> None:
        """Open the database at `url`, creating the tables if it is new.

        Raises RuntimeError, saying what to do, if the database has another schema version.
        """
        self._url = url
        self._engine = make_engine(url)
        self._sessions = sessionmaker(self._engine)
        try:
            self._init_schema()
        except BaseException:
            self._engine.dispose()
            raise

    @classmethod
    def for_home(cls, home: str | Path) -> Store:
        """Open the store of a LoRA Lab data home, creating the folder if needed.

        The database is `<home>/loralab.db`, unless the environment variable LORALAB_DB_URL is
        set (e.g. `postgresql+psycopg://user@host/loralab`): then that URL is used, and the home
        folder still holds runs/ and datasets/.
        """
        home = Path(home).expanduser()
        home.mkdir(parents=True, exist_ok=True)
        return cls(os.environ.get(DB_URL_ENV) or default_db_url(home))

    @property
    def url(self) -> str:
        """The URL as given (with any password): child processes open the same database with it."""
        return self._url

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self._engine.url.render_as_string(hide_password=True)!r})"

    def _init_schema(self) -> None:
        # Processes opening a new database at the same moment race to create it: the loser's
        # CREATE TABLE or version INSERT fails because the winner's landed first. Trying again
        # finds the winner's tables; a persistent error is still raised after the last attempt.
        attempts = 5
        for attempt in range(1, attempts + 1):
            try:
                return self._create_or_check_schema()
            except (OperationalError, IntegrityError, ProgrammingError):
                if attempt == attempts:
                    raise
                time.sleep(0.05 * attempt)

    def _create_or_check_schema(self) -> None:
        with self._sessions.begin() as s:
            conn = s.connection()
            # Read the version before creating anything: older code must not add its tables to a
            # database written by newer code.
            MetaRow.__table__.create(conn, checkfirst=True)
            found = s.get(MetaRow, SCHEMA_VERSION_KEY)
            if found is not None:
                version = self._check_schema_version(found.value)
                # An older database: first the tables it lacks (a new column may reference one), then each
                # version's ALTERs in turn.
                Base.metadata.create_all(conn)
                for step in range(version, SCHEMA_VERSION):
                    for ddl in MIGRATIONS[step]:
                        conn.execute(text(ddl))
                found.value = str(SCHEMA_VERSION)
            Base.metadata.create_all(conn)
            if found is None:
                s.add(MetaRow(key=SCHEMA_VERSION_KEY, value=str(SCHEMA_VERSION)))

    def _check_schema_version(self, found: str) -> int:
        """The database's schema version; RuntimeError if it is not one this code can open or migrate."""
        where = repr(self)
        if not found.isdigit():
            raise RuntimeError(f"{where}: meta.schema_version is {found!r}, not a number")
        version = int(found)
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{where} has schema version {version}, but this LoRA Lab only knows version "
                f"{SCHEMA_VERSION}. Upgrade LoRA Lab, or use another database "
                f"(--home, or the {DB_URL_ENV} environment variable)."
            )
        if any(step not in MIGRATIONS for step in range(version, SCHEMA_VERSION)):
            raise RuntimeError(
                f"{where} has schema version {version}, older than {SCHEMA_VERSION}, and no "
                f"migration exists for it. Move the database file aside to start a fresh one."
            )
        return version

    @staticmethod
    def _require(s: Session, run_id: int) -> RunRow:
        row = s.get(RunRow, run_id)
        if row is None:
            raise KeyError(f"no run with id {run_id}")
        return row

    def _update_if(self, run_id: int, conditions: Sequence[Any], **values: Any) -> bool:
        """UPDATE runs SET values WHERE id = run_id AND conditions; True if the row changed.

        False means the conditions did not hold; a missing run raises KeyError.
        """
        stmt = update(RunRow).where(RunRow.id == run_id, *conditions).values(**values)
        with self._sessions.begin() as s:
            if _rowcount(s, stmt) == 1:
                return True
            self._require(s, run_id)
            return False

    # -- runs: creation and lookup ------------------------------------------------------------

    def create_run(
        self,
        name: str,
        config: Mapping[str, Any],
        out_dir: str | Path,
        *,
        model: str = "",
        parent_id: int | None = None,
        sweep_id: int | None = None,
        resume_from: str | None = None,
        status: str = RunStatus.QUEUED,
        est_mem_gb: float | None = None,
        trainable_params: int | None = None,
        total_params: int | None = None,
    ) -> int:
        """Insert a run and return its id (known only now: callers then name runs/<id>/)."""
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping (RunConfig.to_dict()), got {type(config)}")
        status = _status(status)
        now = utcnow()
        row = RunRow(
            name=name,
            status=status.value,
            config_json=_dumps(dict(config)),
            model=model,
            out_dir=os.fspath(out_dir),
            parent_id=parent_id,
            sweep_id=sweep_id,
            resume_from=resume_from,
            created_at=now,
            updated_at=now,
            started_at=None if status is RunStatus.QUEUED else now,
            finished_at=now if status in TERMINAL else None,
            est_mem_gb=_coerce("est_mem_gb", est_mem_gb),
            trainable_params=_coerce("trainable_params", trainable_params),
            total_params=_coerce("total_params", total_params),
        )
        with self._sessions.begin() as s:
            if parent_id is not None:
                self._require(s, parent_id)
            if sweep_id is not None:
                self._require_sweep(s, sweep_id)
            s.add(row)
            s.flush()
            return row.id

    def set_out_dir(self, run_id: int, out_dir: str | Path) -> None:
        with self._sessions.begin() as s:
            self._require(s, run_id).out_dir = os.fspath(out_dir)

    def get_run(self, run_id: int) -> RunRecord:
        """The run with this id; KeyError if there is none."""
        with self._sessions.begin() as s:
            return self._require(s, run_id).to_record()

    def list_runs(
        self,
        *,
        status: str | Iterable[str] | None = None,
        model: str | None = None,
        sweep_id: int | None = None,
        limit: int = 500,
        oldest_first: bool = False,
    ) -> list[RunRecord]:
        """Runs newest first (oldest first if asked), optionally only those with the given status(es), base
        model or sweep."""
        stmt = select(RunRow).order_by(RunRow.id if oldest_first else RunRow.id.desc()).limit(limit)
        if sweep_id is not None:
            stmt = stmt.where(RunRow.sweep_id == sweep_id)
        if status is not None:
            wanted = [status] if isinstance(status, str) else list(status)
            stmt = stmt.where(RunRow.status.in_([_status(w).value for w in wanted]))
        if model is not None:
            stmt = stmt.where(RunRow.model == model)
        with self._sessions.begin() as s:
            return [row.to_record() for row in s.scalars(stmt)]

    def queue_position(self, run_id: int) -> int | None:
        """1 for the next run to start, 2 for the one after, ...; None if the run is not queued."""
        with self._sessions.begin() as s:
            if self._require(s, run_id).status != RunStatus.QUEUED:
                return None
            ahead = select(func.count()).where(RunRow.status == RunStatus.QUEUED.value, RunRow.id <= run_id)
            return s.scalar(ahead)

    def counts_by_status(self) -> dict[str, int]:
        """How many runs have each status; every status is present, zeros included."""
        counts = {status.value: 0 for status in RunStatus}
        stmt = select(RunRow.status, func.count()).group_by(RunRow.status)
        with self._sessions.begin() as s:
            counts.update({status: n for status, n in s.execute(stmt)})
        return counts

    # -- runs: lifecycle -----------------------------------------------------------------------

    def claim_next_queued(self, worker_pid: int, host: str | None = None) -> RunRecord | None:
        """Take the oldest queued run and mark it running for `worker_pid` on `host` (default: this
        machine); None if none is queued.

        Schedulers on several hosts may call this at once. On PostgreSQL the oldest queued row is
        locked with SELECT ... FOR UPDATE SKIP LOCKED, so concurrent claimers take different rows
        without waiting; on SQLite (one writer at a time) the clause is left out. Either way the UPDATE
        only succeeds while the run is still queued, so exactly one claimer gets each run.
        """
        oldest = (
            select(RunRow.id)
            .where(RunRow.status == RunStatus.QUEUED.value)
            .order_by(RunRow.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        with self._sessions.begin() as s:
            while (run_id := s.scalar(oldest)) is not None:
                claim = (
                    update(RunRow)
                    .where(RunRow.id == run_id, RunRow.status == RunStatus.QUEUED.value)
                    .values(status=RunStatus.RUNNING.value, worker_pid=worker_pid, host=host or this_host())
                    .values(started_at=utcnow())
                )
                if _rowcount(s, claim) == 1:
                    return self._require(s, run_id).to_record()
        return None

    def claim_run(self, run_id: int, worker_pid: int, host: str | None = None) -> RunRecord | None:
        """Claim this queued run as claim_next_queued claims the oldest (a scheduler that places runs on
        devices picks which one); None if it is no longer queued (another scheduler took it, or it was
        cancelled). KeyError if there is no such run."""
        claimed = self._update_if(
            run_id,
            [RunRow.status == RunStatus.QUEUED.value],
            status=RunStatus.RUNNING.value,
            worker_pid=worker_pid,
            host=host or this_host(),
            started_at=utcnow(),
        )
        return self.get_run(run_id) if claimed else None

    def mark_running(self, run_id: int, pid: int, host: str | None = None) -> bool:
        """The training child reports in: status running, its pid and host (default: this machine),
        started_at if not yet set.

        Returns False, changing nothing, if the run already ended (e.g. cancelled while the child
        was starting): the child should then exit instead of training.
        """
        started = func.coalesce(RunRow.started_at, literal(utcnow(), UTCDateTime()))
        return self._update_if(
            run_id,
            [RunRow.status.not_in(_TERMINAL_VALUES)],
            status=RunStatus.RUNNING.value,
            pid=pid,
            host=host or this_host(),
            started_at=started,
        )

    def finish(
        self,
        run_id: int,
        status: str,
        *,
        error: str | None = None,
        exit_code: int | None = None,
        only_if_not_terminal: bool = False,
    ) -> bool:
        """Set a terminal status and finished_at; True if the row was written.

        With only_if_not_terminal, a run that already ended is left alone and False returned:
        the parent's watcher uses it so that it never overwrites the child's own ending.
        """
        status = _status(status)
        if status not in TERMINAL:
            ends = ", ".join(sorted(_TERMINAL_VALUES))
            raise ValueError(f"finish() needs a terminal status ({ends}), got {status.value!r}")
        conditions = [RunRow.status.not_in(_TERMINAL_VALUES)] if only_if_not_terminal else []
        return self._update_if(
            run_id,
            conditions,
            status=status.value,
            error=error,
            exit_code=exit_code,
            finished_at=utcnow(),
        )

    def requeue(self, run_id: int, *, resume_from: str | None) -> None:
        """Put a run back in the queue, optionally to resume from a checkpoint.

        Clears everything that described the previous attempt (pids, start and end, error), so
        the timestamps and duration describe the attempt to come.
        """
        cleared = dict.fromkeys(["pid", "worker_pid", "host", "error", "exit_code", "started_at", "finished_at"])
        self._update_if(run_id, [], status=RunStatus.QUEUED.value, resume_from=resume_from, **cleared)

    def update_run(self, run_id: int, **fields: Any) -> None:
        """Set final figures (final_loss, steps_done, ...) and/or merge keys into `summary`."""
        unknown = sorted(set(fields) - UPDATABLE_FIELDS)
        if unknown:
            raise ValueError(
                f"update_run: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(UPDATABLE_FIELDS))}"
            )
        summary = fields.pop("summary", None)
        if summary is not None and not isinstance(summary, Mapping):
            raise TypeError(f"summary must be a mapping, got {type(summary).__name__}")
        values = {name: _coerce(name, value) for name, value in fields.items()}
        with self._sessions.begin() as s:
            row = self._require(s, run_id)
            for name, value in values.items():
                setattr(row, name, value)
            if summary:
                merged = json.loads(row.summary_json) if row.summary_json else {}
                merged.update(summary)
                row.summary_json = _dumps(merged)

    def delete_run(self, run_id: int) -> None:
        """Delete the run; the database cascades to metrics and spectra. Files are the caller's."""
        with self._sessions.begin() as s:
            if _rowcount(s, delete(RunRow).where(RunRow.id == run_id)) == 0:
                raise KeyError(f"no run with id {run_id}")

    # -- sweeps --------------------------------------------------------------------------------

    @staticmethod
    def _require_sweep(s: Session, sweep_id: int) -> SweepRow:
        row = s.get(SweepRow, sweep_id)
        if row is None:
            raise KeyError(f"no sweep with id {sweep_id}")
        return row

    def create_sweep(self, name: str, spec: Mapping[str, Any]) -> int:
        """Insert a sweep (its members are created with create_run(..., sweep_id=...)); returns its id."""
        if not isinstance(spec, Mapping):
            raise TypeError(f"spec must be a mapping, got {type(spec).__name__}")
        row = SweepRow(name=name, spec_json=_dumps(dict(spec)), created_at=utcnow())
        with self._sessions.begin() as s:
            s.add(row)
            s.flush()
            return row.id

    def get_sweep(self, sweep_id: int) -> SweepRecord:
        """The sweep with this id; KeyError if there is none."""
        with self._sessions.begin() as s:
            return self._require_sweep(s, sweep_id).to_record()

    def list_sweeps(self, limit: int = 200) -> list[SweepRecord]:
        """Sweeps newest first."""
        with self._sessions.begin() as s:
            return [row.to_record() for row in s.scalars(select(SweepRow).order_by(SweepRow.id.desc()).limit(limit))]

    def delete_sweep(self, sweep_id: int) -> None:
        """Delete the sweep row; its runs stay, with sweep_id set to NULL (delete them first to remove them)."""
        with self._sessions.begin() as s:
            if _rowcount(s, delete(SweepRow).where(SweepRow.id == sweep_id)) == 0:
                raise KeyError(f"no sweep with id {sweep_id}")

    # -- meta ----------------------------------------------------------------------------------

    def set_meta(self, key: str, value: str) -> None:
        with self._sessions.begin() as s:
            row = s.get(MetaRow, key)
            if row is None:
                s.add(MetaRow(key=key, value=value))
            else:
                row.value = value

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        with self._sessions.begin() as s:
            row = s.get(MetaRow, key)
            return default if row is None else row.value
