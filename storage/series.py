"""The per-step series of a run: metrics (long format, polled with a cursor) and σ(ΔW) spectra.

A mixin of Store (storage.store): each method is one short transaction on the Store's sessions and hands
back frozen records, never ORM rows.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import delete, func, select

from .schema import MetricPoint, MetricRow, SpectrumRecord, SpectrumRow, dumps, metric_value

METRIC_NAME_MAX = 64  # the width of metrics.name; checked here so SQLite fails like PostgreSQL


class SeriesMixin:
    """Metrics and spectra of runs; needs the Store's `_sessions` and `_require`."""

    # -- metrics -------------------------------------------------------------------------------

    def log_metrics(self, run_id: int, step: int, metrics: Mapping[str, float | None]) -> None:
        """Append one step's scalars in one transaction; None values are skipped."""
        step = operator.index(step)
        now = time.time()
        rows = []
        for name, value in metrics.items():
            if value is None:
                continue
            if len(name) > METRIC_NAME_MAX:
                raise ValueError(f"metric name longer than {METRIC_NAME_MAX} characters: {name!r}")
            rows.append(MetricRow(run_id=run_id, step=step, name=name, value=float(value), wall_time=now))
        if not rows:
            return
        with self._sessions.begin() as s:
            self._require(s, run_id)
            s.add_all(rows)

    def metrics_since(self, run_id: int, after_id: int = 0, *, names: Iterable[str] | None = None) -> list[MetricPoint]:
        """Points logged after cursor `after_id`, oldest first; the last id is the next cursor.

        An unknown run has no points: the UI polls this and a deleted run is not an error there.
        """
        stmt = select(MetricRow).where(MetricRow.run_id == run_id, MetricRow.id > after_id).order_by(MetricRow.id)
        if names is not None:
            names = [names] if isinstance(names, str) else list(names)
            stmt = stmt.where(MetricRow.name.in_(names))
        with self._sessions.begin() as s:
            return [row.to_record() for row in s.scalars(stmt)]

    def metric_series(self, run_id: int, name: str) -> list[tuple[int, float]]:
        """(step, value) pairs of one metric, by step.

        A run resumed from a checkpoint logs some steps twice; the later value wins, so a plot
        never runs backwards.
        """
        stmt = (
            select(MetricRow.step, MetricRow.value)
            .where(MetricRow.run_id == run_id, MetricRow.name == name)
            .order_by(MetricRow.id)
        )
        with self._sessions.begin() as s:
            by_step = {step: metric_value(value) for step, value in s.execute(stmt)}
        return sorted(by_step.items())

    def last_metrics(self, run_id: int) -> dict[str, float]:
        """The latest value logged for each metric name of the run."""
        latest_ids = select(func.max(MetricRow.id)).where(MetricRow.run_id == run_id).group_by(MetricRow.name)
        stmt = select(MetricRow.name, MetricRow.value).where(MetricRow.id.in_(latest_ids))
        with self._sessions.begin() as s:
            return {name: metric_value(value) for name, value in s.execute(stmt)}

    # -- spectra -------------------------------------------------------------------------------

    def save_spectra(
        self,
        run_id: int,
        step: int,
        spectra: Mapping[str, Sequence[float]],
        extra: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """Store σ(ΔW) per module at `step`, replacing what that step already held for them."""
        step = operator.index(step)
        extra = extra or {}
        stray = sorted(set(extra) - set(spectra))
        if stray:
            raise ValueError(f"extra names modules that have no spectrum: {', '.join(stray)}")
        rows = [
            SpectrumRow(
                run_id=run_id,
                step=step,
                module=module,
                values_json=dumps([float(v) for v in values]),
                extra_json=dumps(dict(extra[module])) if module in extra else None,
            )
            for module, values in spectra.items()
        ]
        if not rows:
            return
        replaced = delete(SpectrumRow).where(
            SpectrumRow.run_id == run_id,
            SpectrumRow.step == step,
            SpectrumRow.module.in_(list(spectra)),
        )
        with self._sessions.begin() as s:
            self._require(s, run_id)
            s.execute(replaced)
            s.add_all(rows)

    def get_spectra(self, run_id: int, step: int | None = None) -> dict[str, SpectrumRecord]:
        """Spectra of one step by module name, in the order saved; step None → the latest step."""
        with self._sessions.begin() as s:
            if step is None:
                latest = select(func.max(SpectrumRow.step)).where(SpectrumRow.run_id == run_id)
                step = s.scalar(latest)
                if step is None:
                    return {}
            stmt = (
                select(SpectrumRow)
                .where(SpectrumRow.run_id == run_id, SpectrumRow.step == step)
                .order_by(SpectrumRow.id)
            )
            return {row.module: row.to_record() for row in s.scalars(stmt)}

    def spectra_steps(self, run_id: int) -> list[int]:
        stmt = select(SpectrumRow.step).where(SpectrumRow.run_id == run_id).distinct().order_by(SpectrumRow.step)
        with self._sessions.begin() as s:
            return list(s.scalars(stmt))
