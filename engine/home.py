"""The data home: one folder holding the database, runs, uploaded datasets and converted models.

    $LORALAB_HOME (default ~/.loralab)
      loralab.db            SQLite (WAL), unless LORALAB_DB_URL points elsewhere
      runs/<id>/            config.json, train.log, checkpoints/, adapter/ (PEFT format)
      datasets/             uploads (the app never writes datasets outside this folder)
      models/               the embedded model converted once to safetensors
"""

from __future__ import annotations

import os
from pathlib import Path


def data_home(explicit: str | os.PathLike | None = None) -> Path:
    """The data home folder (created if missing)."""
    p = Path(explicit or os.environ.get("LORALAB_HOME") or Path.home() / ".loralab").expanduser().resolve()
    p.mkdir(parents=True, exist_ok=True)
    return p


def runs_dir(home: Path) -> Path:
    return _mk(home / "runs")


def run_dir(home: Path, run_id: int) -> Path:
    return _mk(home / "runs" / str(run_id))


def datasets_dir(home: Path) -> Path:
    return _mk(home / "datasets")


def models_dir(home: Path) -> Path:
    return _mk(home / "models")


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p
