"""Persistence for LoRA Lab: runs, metrics and spectra in one SQL database.

    store = Store.for_home("~/.loralab")          # or Store("postgresql+psycopg://...")
    run_id = store.create_run("r8-alpha16", cfg.to_dict(), out_dir="")
    sink = StoreSink(store, run_id)               # the engine's MetricsSink
    points = store.metrics_since(run_id, cursor)  # what the UI polls

Only records (frozen dataclasses) cross this boundary; the ORM rows stay in `storage.schema`.
This package imports nothing else of the project.
"""

from .schema import SCHEMA_VERSION, TERMINAL, MetricPoint, RunRecord, RunStatus, SpectrumRecord, SweepRecord
from .sink import StoreSink
from .store import HOST_ENV, Store, default_db_url, this_host

__all__ = [
    "HOST_ENV",
    "SCHEMA_VERSION",
    "TERMINAL",
    "MetricPoint",
    "RunRecord",
    "RunStatus",
    "SpectrumRecord",
    "Store",
    "StoreSink",
    "SweepRecord",
    "default_db_url",
    "this_host",
]
