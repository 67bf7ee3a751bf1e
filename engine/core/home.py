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


EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct"  # the embedded GGUF, converted once, lives in <home>/models/<this>


def embedded_dir(home: Path) -> Path:
    """Where the embedded model is (or will be) converted to safetensors."""
    return Path(home) / "models" / EMBEDDED_DIRNAME


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


def open_store(home: str | os.PathLike | None = None, db_url: str | None = None):
    """The run database: `db_url` if given, else $LORALAB_DB_URL, else SQLite in the data home."""
    from storage import Store

    return Store(db_url) if db_url else Store.for_home(data_home(home))


def bf16_probe_file(home: Path) -> Path:
    """Where engine.ml.resources caches this CPU's fp32-vs-bf16 matmul probe (what `dtype: auto` picks)."""
    return Path(home) / "cache" / "bf16_probe.json"
