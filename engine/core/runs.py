"""Where a run's files live: its folder, adapter, checkpoints, log and exports. Stdlib only.

    <home>/runs/<id>/config.json            the frozen RunConfig
    <home>/runs/<id>/train.log              everything the training process printed
    <home>/runs/<id>/checkpoints/step-NNNNNNN/   adapter + optimizer/scheduler/RNG state (the last KEEP_CHECKPOINTS)
    <home>/runs/<id>/adapter/               the final PEFT adapter (adapter_config.json + adapter_model.safetensors)
    <home>/runs/<id>/best_adapter/          the adapter of the best validation step (early stopping, keep_best)
    <home>/runs/<id>/best.json              which step that was and its val loss: {"step", "val_loss", ...}
    <home>/runs/<id>/compare.json           the latest outcome comparison this run took part in (engine.core.compare)
    <home>/exports/run-<id>-adapter.zip     the adapter with its model card (run-<id>-best-adapter.zip: the best one)
    <home>/exports/run-<id>-merged/         base + adapter merged
    <home>/exports/run-<id>.gguf            base + adapter merged, as GGUF (+ run-<id>.Modelfile for Ollama)
    <home>/exports/run-<id>-lora.gguf       the adapter as a llama.cpp LoRA GGUF (+ run-<id>-lora.Modelfile)
    <home>/exports/compare-runs-<ids>.csv   an outcome comparison of those runs, one row per prompt × model

The trainer writes these names, the job queue, the CLI and the UI read them: all through this module.
`run` below is a storage RunRecord (anything with id, out_dir and adapter_dir).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ADAPTER_DIRNAME = "adapter"
CHECKPOINTS_DIRNAME = "checkpoints"
CHECKPOINT_PREFIX = "step-"
TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint: its presence marks it complete
CONFIG_NAME = "config.json"
LOG_NAME = "train.log"
KEEP_CHECKPOINTS = 2
ADAPTER_CONFIG = "adapter_config.json"
BEST_ADAPTER_DIRNAME = "best_adapter"
BEST_MARK = "best.json"
COMPARE_RESULT = "compare.json"
ADAPTER_CHOICES = ("last", "best")  # which of a run's adapters: the final one, or the best validation step's


def run_folder(run: Any, home: str | Path | None = None) -> Path:
    """The run's folder: what the database recorded, else <home>/runs/<id>."""
    if getattr(run, "out_dir", None):
        return Path(run.out_dir)
    if home is None:
        raise ValueError(f"run {run.id} has no folder recorded; give the data home to find runs/{run.id}")
    return Path(home) / "runs" / str(run.id)


def adapter_dir(run: Any, home: str | Path | None = None) -> Path:
    """Where the run's final adapter is (or will be): the recorded adapter_dir, else <run folder>/adapter."""
    if getattr(run, "adapter_dir", None):
        return Path(run.adapter_dir)
    return run_folder(run, home) / ADAPTER_DIRNAME


def is_adapter_folder(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / ADAPTER_CONFIG).is_file()


def saved_adapter(run: Any, home: str | Path | None = None) -> Path | None:
    """The run's adapter folder if it has been saved, else None."""
    try:
        d = adapter_dir(run, home)
    except ValueError:
        return None
    return d if is_adapter_folder(d) else None


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def checkpoints(out_dir: str | Path) -> list[Path]:
    """The run's complete checkpoints, oldest first (a checkpoint is complete once its trainer state is in)."""
    root = Path(out_dir) / CHECKPOINTS_DIRNAME
    return [p for p in sorted(root.glob(f"{CHECKPOINT_PREFIX}*")) if (p / TRAINER_STATE).is_file()]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = checkpoints(out_dir)
    return found[-1] if found else None


def exports_dir(home: str | Path) -> Path:
    p = Path(home) / "exports"
    p.mkdir(parents=True, exist_ok=True)
    return p


def adapter_zip_path(home: str | Path, run_id: int, which: str = "last") -> Path:
    """run-<id>-adapter.zip, or run-<id>-best-adapter.zip for the best validation step's adapter."""
    return exports_dir(home) / f"run-{run_id}{'-best' if which == 'best' else ''}-adapter.zip"


def merged_path(home: str | Path, run_id: int) -> Path:
    return exports_dir(home) / f"run-{run_id}-merged"


def gguf_path(home: str | Path, run_id: int, adapter: bool = False) -> Path:
    return exports_dir(home) / f"run-{run_id}{'-lora' if adapter else ''}.gguf"


# ---- the best adapter (early stopping, train.keep_best) ------------------------------------------------


def best_info(run: Any, home: str | Path | None = None) -> dict[str, Any] | None:
    """{"step", "val_loss", "adapter_dir"} of the run's best validation step, if its adapter was kept."""
    try:
        folder = run_folder(run, home)
    except ValueError:
        return None
    mark = folder / BEST_MARK
    if not (mark.is_file() and is_adapter_folder(folder / BEST_ADAPTER_DIRNAME)):
        return None
    try:
        info = json.loads(mark.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {**info, "adapter_dir": str(folder / BEST_ADAPTER_DIRNAME)} if isinstance(info, dict) else None


def chosen_adapter(run: Any, which: str = "last", home: str | Path | None = None) -> Path:
    """The folder of the run's last adapter, or of its best one; ValueError saying why when there is none."""
    if which not in ADAPTER_CHOICES:
        raise ValueError(f"adapter {which!r}: choose one of {', '.join(ADAPTER_CHOICES)}")
    if which == "last":
        return adapter_dir(run, home)
    best = best_info(run, home)
    if best is None:
        raise ValueError(
            f"run {run.id} kept no best adapter (train.early_stopping_patience or train.keep_best, with validation)"
        )
    return Path(best["adapter_dir"])


def compare_csv_path(home: str | Path, run_ids: list[int]) -> Path:
    return exports_dir(home) / f"compare-runs-{'-'.join(str(i) for i in sorted(set(run_ids)))}.csv"


def compare_path(run: Any, home: str | Path | None = None) -> Path:
    """Where the latest outcome comparison that included this run is stored."""
    return run_folder(run, home) / COMPARE_RESULT


def deletable_folder(home: str | Path, run: Any) -> Path:
    """The run's folder, only if it lies inside <home>/runs (never delete anything else)."""
    runs = (Path(home) / "runs").resolve()
    folder = run_folder(run, home).resolve()
    if folder.parent != runs:
        raise ValueError(f"run #{run.id}'s folder {folder} is not inside {runs}; delete it by hand")
    return folder
