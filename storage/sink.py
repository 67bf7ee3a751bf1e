"""StoreSink: the engine's MetricsSink, writing straight to a Store."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .store import Store


class StoreSink:
    """The engine's MetricsSink, writing each call straight to a Store.

    It matches engine/core/events.py's Protocol structurally, so storage never imports engine. Nothing
    is buffered: the trainer already logs only every `log_every` steps.
    """

    __slots__ = ("run_id", "store")

    def __init__(self, store: Store, run_id: int) -> None:
        self.store = store
        self.run_id = run_id

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.store.log_metrics(self.run_id, step, metrics)

    def log_spectra(
        self,
        step: int,
        spectra: Mapping[str, Sequence[float]],
        extra: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.store.save_spectra(self.run_id, step, spectra, extra)

    def set_summary(self, **fields: Any) -> None:
        self.store.update_run(self.run_id, **fields)
