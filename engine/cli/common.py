"""What every subcommand shares: the data home and database from the global flags, one-line errors, JSON."""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback
from datetime import datetime
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


# Failures that are the user's input, not a bug: one line, no traceback. Classes of torch-side modules are
# looked up only once those modules are loaded, so that `runs` and `show` never import torch.
USER_ERRORS = {
    "engine.core.config": ("ConfigError",),
    "engine.core.export": ("ExportError",),
    "engine.core.jobs": ("DiskSpaceError",),
    "engine.core.launch": ("EngineCommandError",),
    "engine.core.chat": ("ChatError",),
    "engine.ml.model": ("ModelError",),
    "engine.ml.data": ("DatasetError",),
    "engine.ml.checkpoint": ("CheckpointError", "DiskFullError"),
    "engine.ml.generate": ("AdapterBaseMismatch",),
    "engine.ml.train": ("TrainingDiverged",),
}


def is_user_error(e: BaseException) -> bool:
    """A known failure of the input (bad config, model, dataset, checkpoint, a missing file, a full disk)."""
    if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return True
    for module, names in USER_ERRORS.items():
        mod = sys.modules.get(module)
        if mod is not None and isinstance(e, tuple(getattr(mod, n) for n in names)):
            return True
    return False


def log_traceback(args, e: BaseException) -> Path | None:
    """Append the traceback of an unexpected error to <home>/logs/engine.log; the path, or None if unwritable."""
    try:
        log = home_of(args) / "logs" / "engine.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a", encoding="utf-8") as f:
            f.write(f"--- {datetime.now().astimezone().isoformat(timespec='seconds')} {' '.join(sys.argv)}\n")
            f.write("".join(traceback.format_exception(e)))
        return log
    except OSError:
        return None


def internal_error(args, e: BaseException) -> int:
    """A real bug: the traceback goes to the log, the user gets one line saying where."""
    where = log_traceback(args, e)
    if where is None:
        traceback.print_exc()
    first = str(e).splitlines()[0][:300] if str(e) else ""
    return fail(f"internal error {type(e).__name__}: {first} (traceback in {where or 'stderr above'})", 1)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_phi_grid(grid: list[list[float]]) -> None:
    """φ(i, j) as a text table: a row per i, a column per j (engine spectra --similarity, engine phi)."""
    print("      " + " ".join(f"j={c:<4}" for c in range(1, len(grid[0]) + 1)))
    for i, row in enumerate(grid, 1):
        print(f"i={i:<3} " + " ".join(f"{v:6.3f}" for v in row))


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
