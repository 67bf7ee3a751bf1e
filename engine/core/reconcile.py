"""Which runs recorded `running` have no process any more, and why: the rule behind JobRunner.reconcile().

A run is `running` from the moment a scheduler claims it until its process (or that process's watcher)
records the end. If that record never comes (the child was SIGKILLed with no watcher of ours, a foreground
`engine train` was killed, a scheduler died between its claim and the launch, the database was
unreachable when the end was due), the scheduler's periodic check ends the run `failed` with the cause
found here. Only runs of this host are judged: a pid means nothing on another machine sharing the
database. Stdlib + psutil (engine.core.procs).
"""

from __future__ import annotations

from typing import Any

from engine.core.procs import is_training_child, pid_alive, this_host

GONE_ERROR = (
    "its training process (pid {pid}) is gone without recording how the run ended: it was killed (SIGKILL, "
    "e.g. by the kernel's OOM killer or by hand) or crashed before it could write its end"
)
NEVER_STARTED_ERROR = "the scheduler (pid {worker}) that claimed it is gone; its training process was never started"
LAUNCH_ERROR = "could not start the training process: {why}"


def host_of(rec: Any) -> str | None:
    """The host the run's process runs on: runs.host, set by the claim and by the child's mark_running (None:
    recorded before hosts were)."""
    return getattr(rec, "host", None)


def on_this_host(rec: Any, host: str | None = None) -> bool:
    return host_of(rec) in (None, host or this_host())


def why_gone(rec: Any, *, me: int, host: str | None = None) -> str | None:
    """Why the `running` run `rec` has no live process on this host; None while it is alive or may be starting.

    me: this scheduler's pid (a run it claimed but has not launched is its own business, see JobRunner).
    """
    if not on_this_host(rec, host):
        return None
    if rec.pid is None:  # claimed, not started yet: its scheduler is launching it, or died doing so
        if rec.worker_pid is None or rec.worker_pid == me or pid_alive(rec.worker_pid):
            return None
        return NEVER_STARTED_ERROR.format(worker=rec.worker_pid)
    if is_training_child(rec.pid):
        return None
    return GONE_ERROR.format(pid=rec.pid)


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:limit]}" if text else type(e).__name__
