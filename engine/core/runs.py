"""Where a run's files live: its folder, adapter, checkpoints, log and exports. Stdlib only.

    <home>/runs/<id>/config.json            the frozen RunConfig
    <home>/runs/<id>/train.log              everything the training process printed
    <home>/runs/<id>/checkpoints/step-NNNNNNN/   adapter + optimizer/scheduler/RNG state (the last KEEP_CHECKPOINTS)
    <home>/runs/<id>/adapter/               the final PEFT adapter (adapter_config.json + adapter_model.safetensors)
    <home>/exports/run-<id>-adapter.zip     the adapter with its model card
    <home>/exports/run-<id>-merged/         base + adapter merged
    <home>/exports/run-<id>.gguf            base + adapter merged, as GGUF (+ run-<id>.Modelfile for Ollama)
    <home>/exports/run-<id>-lora.gguf       the adapter as a llama.cpp LoRA GGUF (+ run-<id>-lora.Modelfile)

The trainer writes these names, the job queue, the CLI and the UI read them: all through this module.
`run` below is a storage RunRecord (anything with id, out_dir and adapter_dir).
"""

from __future__ import annotations

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


def adapter_zip_path(home: str | Path, run_id: int) -> Path:
    return exports_dir(home) / f"run-{run_id}-adapter.zip"


def merged_path(home: str | Path, run_id: int) -> Path:
    return exports_dir(home) / f"run-{run_id}-merged"


def gguf_path(home: str | Path, run_id: int, adapter: bool = False) -> Path:
    return exports_dir(home) / f"run-{run_id}{'-lora' if adapter else ''}.gguf"
