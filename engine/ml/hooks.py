"""Extension points of the training loop (engine.ml.train.train), so that a method which changes what
happens around a step lives in its own module instead of inside the loop.

A hook sees the run's state at fixed moments and may act on it:

    on_start(state)          after model, data, optimizer, schedule and resume; before the first step
    loss_term(state)         a tensor added to every micro-batch's loss (scaled by 1/grad_accum), or None
    after_step(state)        after optimizer.step() and scheduler.step(); state.step is the new step count; the
                             step's gradients are still there (cleared after the hooks)
    after_eval(state, loss)  after each validation pass, with its mean per-token loss
    on_end(state)            after the last step (or a stop), before the adapter is saved

Setting `state.stop_reason` ends the run cleanly after the current step (the adapter is saved, the status
is `succeeded`, the reason goes into the run's summary). `state.summary` collects entries for the summary.
Hooks come from build_hooks(cfg) in a fixed order; a hook is built only when its config asks for it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.core.config import RunConfig
from engine.core.events import MetricsSink


@dataclass
class TrainState:
    """What a hook may read (and, for model/optimizer/scheduler, change) while the run trains."""

    cfg: RunConfig
    model: Any  # the PeftModel being trained
    opt: Any
    sched: Any
    tok: Any
    prep: Any  # engine.ml.data's Prepared: train/val examples
    out_dir: Path
    sink: MetricsSink
    device: Any
    total_steps: int
    step: int = 0
    stop_reason: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    # The trainer's own helpers, for hooks that evaluate or save: evaluate() → mean validation loss;
    # save_adapter(name) → writes the current adapter as a PEFT folder out_dir/name and returns it.
    evaluate: Callable[[], float] | None = None
    save_adapter: Callable[[str], Path] | None = None
    # σ(ΔW) of the adapter as the run stores it, {module: engine.ml.spectra.ModuleSpectrum}; a hook may replace
    # it, and save_adapter, when its ΔW is not the live LoRA's (ReLoRA's cumulative update).
    spectra: Callable[[], Any] | None = None
    # False on the ranks > 0 of a data-parallel run: they train but write nothing (out_dir is None there).
    main: bool = True


class TrainHook:
    """A no-op at every moment; subclasses override what they need."""

    def on_start(self, state: TrainState) -> None:
        pass

    def loss_term(self, state: TrainState):
        return None

    def after_step(self, state: TrainState) -> None:
        pass

    def after_eval(self, state: TrainState, val_loss: float) -> None:
        pass

    def on_end(self, state: TrainState) -> None:
        pass


def _method(module: str, cls: str, wanted: Callable[[RunConfig], bool]) -> Callable[[RunConfig], TrainHook | None]:
    """A factory that imports the method's module only when the config asks for it."""

    def make(cfg: RunConfig) -> TrainHook | None:
        return getattr(importlib.import_module(module), cls)(cfg) if wanted(cfg) else None

    return make


# (name, factory): each factory returns a hook for this config, or None when the config does not ask for it.
# Methods register here, in the order they must run (e.g. a rank allocator before early stopping).
FACTORIES: list[tuple[str, Callable[[RunConfig], TrainHook | None]]] = [
    ("adalora", _method("engine.ml.adalora", "AdaLoraHook", lambda cfg: cfg.lora.method == "adalora")),
    ("relora", _method("engine.ml.relora", "ReLoraHook", lambda cfg: cfg.train.relora_every > 0)),
]


def build_hooks(cfg: RunConfig) -> list[TrainHook]:
    return [h for _, make in FACTORIES if (h := make(cfg)) is not None]
