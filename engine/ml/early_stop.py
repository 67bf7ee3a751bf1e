"""Early stopping and the best adapter, as a trainer hook (engine.ml.hooks).

    train.early_stopping_patience: 3        # stop after 3 validations in a row without improvement
    train.early_stopping_min_delta: 0.01    # a fall of the val loss smaller than this is no improvement
    train.keep_best: true                   # keep the best adapter without stopping early

After every validation the hook compares the val loss with the best so far. A new minimum writes the
current adapter to runs/<id>/best_adapter (state.save_adapter) and its step and loss to runs/<id>/best.json
(engine.core.runs reads both), so the kept adapter is always that of the lowest val loss logged. Patience
counts validations since the last *improvement*, a fall of at least min_delta below the loss of the previous
improvement (Keras' rule); a smaller new minimum still replaces the best adapter, it only does not reset
the count. When the count reaches the patience, state.stop_reason ends the run cleanly: the last adapter
and a checkpoint are saved as at any ending, the run `succeeded`, the reason in its summary.

A resumed run reads best.json back, so the best adapter is not replaced by a worse one; the patience count
starts again from 0 (it is not in the checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import shutil

from engine.core import runs as R
from engine.core.config import RunConfig
from engine.ml import hooks as H


class EarlyStopping(H.TrainHook):
    def __init__(self, patience: int, min_delta: float):
        self.patience, self.min_delta = patience, min_delta
        self.best: float | None = None  # the lowest val loss so far (its adapter is kept)
        self.best_step: int | None = None
        self.reference: float | None = None  # the val loss of the last improvement (≥ min_delta)
        self.bad = 0  # validations since the last improvement

    def on_start(self, state: H.TrainState) -> None:
        if not state.main:  # ranks > 0 of a data-parallel run follow the same (reduced) val losses, write nothing
            return
        mark, folder = state.out_dir / R.BEST_MARK, state.out_dir / R.BEST_ADAPTER_DIRNAME
        if state.step == 0:  # a fresh start: a best adapter left in the folder is not this run's
            mark.unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
        elif mark.is_file() and R.is_adapter_folder(folder):  # resumed: keep the best of the steps before
            info = json.loads(mark.read_text(encoding="utf-8"))
            self.best = self.reference = float(info["val_loss"])
            self.best_step = int(info["step"])
        if not state.prep.val:
            state.summary["best"] = {"note": "no validation examples: no best adapter kept, no early stopping"}

    def after_eval(self, state: H.TrainState, val_loss: float) -> None:
        if not math.isfinite(val_loss):
            return
        if self.best is None or val_loss < self.best:
            self.best, self.best_step = val_loss, state.step
            assert state.save_adapter is not None
            state.save_adapter(R.BEST_ADAPTER_DIRNAME)  # every rank takes part (FSDP gathers); rank 0 writes
            if state.main:
                self._mark(state)
        if self.reference is None or val_loss < self.reference - self.min_delta:
            self.reference, self.bad = val_loss, 0
            return
        self.bad += 1
        if self.patience and self.bad >= self.patience:
            state.stop_reason = (
                f"early stopping at step {state.step}: {self.bad} validations without the val loss falling by "
                f"≥ {self.min_delta:g} (best {self.best:.4f} at step {self.best_step})"
            )

    def on_end(self, state: H.TrainState) -> None:
        if self.best is not None and state.main:
            state.summary["best"] = {
                "step": self.best_step,
                "val_loss": self.best,
                "adapter_dir": str(state.out_dir / R.BEST_ADAPTER_DIRNAME),
            }

    def _mark(self, state: H.TrainState) -> None:
        """best.json, written atomically after the adapter folder is in place."""
        mark = state.out_dir / R.BEST_MARK
        tmp = mark.with_name(f".{mark.name}.tmp")
        tmp.write_text(
            json.dumps({"step": self.best_step, "val_loss": self.best, "total_steps": state.total_steps}),
            encoding="utf-8",
        )
        os.replace(tmp, mark)


def make(cfg: RunConfig) -> EarlyStopping | None:
    tr = cfg.train
    if not (tr.early_stopping_patience or tr.keep_best):
        return None
    return EarlyStopping(tr.early_stopping_patience, tr.early_stopping_min_delta)


H.FACTORIES.append(("early_stopping", make))
