"""What every subcommand shares: the data home and database from the global flags, one-line errors, JSON."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from engine.core.home import data_home
from engine.core.home import open_store as _open_store


def home_of(args) -> Path:
    return data_home(args.home)


def open_store(args):
    return _open_store(args.home, args.db_url)


def fail(message: str, code: int = 2) -> int:
    """Print `error: message` on stderr (one line a problem, no traceback) and return the exit code."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=1, default=str))


def key_error(e: KeyError) -> str:
    return str(e.args[0]) if e.args else str(e)


def run_to_dict(r) -> dict[str, Any]:
    d = dataclasses.asdict(r)
    for k, v in d.items():
        if hasattr(v, "isoformat"):
            d[k] = v.isoformat()
    d["status"] = str(r.status.value if hasattr(r.status, "value") else r.status)
    return d


def get_run(args, run_id: int):
    """The run, or KeyError with 'no run with id N'."""
    return open_store(args).get_run(run_id)
