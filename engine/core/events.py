"""The metrics stream between the trainer and whoever listens (the database, the terminal, nothing).

train() only knows this Protocol; storage.StoreSink implements it structurally, so the trainer never
imports the database and the database never imports the engine (torchtune's MetricLogger idea,
nanochat's null object).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol


class MetricsSink(Protocol):
    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def log_spectra(
        self, step: int, spectra: Mapping[str, Sequence[float]], extra: Mapping[str, Mapping[str, Any]] | None = None
    ) -> None: ...

    def set_summary(self, **fields: Any) -> None: ...


class NullSink:
    """Accepts everything, keeps nothing: for library use and tests that do not care."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def log_spectra(self, step, spectra, extra=None) -> None:
        pass

    def set_summary(self, **fields: Any) -> None:
        pass


class ListSink:
    """Keeps everything in memory: tests assert on `.metrics`, `.spectra` and `.summary`."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.spectra: list[tuple[int, dict[str, list[float]]]] = []
        self.summary: dict[str, Any] = {}

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_spectra(self, step, spectra, extra=None) -> None:
        self.spectra.append((step, {k: list(v) for k, v in spectra.items()}))

    def set_summary(self, **fields: Any) -> None:
        self.summary.update(fields)

    def series(self, name: str) -> list[tuple[int, float]]:
        return [(s, m[name]) for s, m in self.metrics if name in m]


class PrintSink:
    """One line per logged step on stderr, `step 10/60 | loss 2.314 | lr 1.9e-04 | 812 tok/s | ETA 0:41`."""

    def __init__(self, stream=None, every: int = 1) -> None:
        self.stream = stream or sys.stderr
        self.every = every
        self.t0 = time.time()

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if step % self.every and "val/loss" not in metrics:
            return
        parts = [f"step {step}" + (f"/{int(metrics['total_steps'])}" if "total_steps" in metrics else "")]
        for key, fmt in (
            ("train/loss", "loss {:.4f}"),
            ("val/loss", "val {:.4f}"),
            ("lr", "lr {:.2e}"),
            ("grad_norm", "gnorm {:.3f}"),
            ("tokens_per_s", "{:.0f} tok/s"),
        ):
            if key in metrics:
                parts.append(fmt.format(metrics[key]))
        if "eta_s" in metrics:
            parts.append("ETA " + format_duration(metrics["eta_s"]))
        print(" | ".join(parts), file=self.stream, flush=True)

    def log_spectra(self, step, spectra, extra=None) -> None:
        pass

    def set_summary(self, **fields: Any) -> None:
        pass


class TeeSink:
    """Sends everything to several sinks (database + terminal)."""

    def __init__(self, *sinks: MetricsSink) -> None:
        self.sinks = sinks

    def log(self, step, metrics) -> None:
        for s in self.sinks:
            s.log(step, metrics)

    def log_spectra(self, step, spectra, extra=None) -> None:
        for s in self.sinks:
            s.log_spectra(step, spectra, extra)

    def set_summary(self, **fields) -> None:
        for s in self.sinks:
            s.set_summary(**fields)


def format_duration(seconds: float) -> str:
    s = int(max(0, seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
