"""Will a run fit on the data home's disk? Its checkpoints, its adapter and (once) the embedded model's
conversion, checked before the run is queued. Stdlib only.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from engine.core.config import EMBEDDED_MODEL, RunConfig
from engine.core.home import embedded_dir
from engine.core.runs import KEEP_CHECKPOINTS

# Disk estimate. A checkpoint holds the fp32 LoRA weights and AdamW's two moment buffers (3 × 4 bytes per
# trainable parameter); the trainer keeps KEEP_CHECKPOINTS of them plus the final adapter.
DEFAULT_TRAINABLE_PARAMS = 50_000_000  # conservative when the count is not known yet (r=64 on a 7B model ≈ 40 M)
EMBEDDED_CONVERT_BYTES = 600 * 10**6
DISK_MARGIN_BYTES = 200 * 10**6


class DiskSpaceError(ValueError):
    """The data home lacks room for a run's checkpoints and adapter."""


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def disk_need_bytes(cfg: RunConfig, home: Path, trainable_params: int | None = None) -> dict[str, int]:
    """Bytes a run of `cfg` writes under the data home, by item: kept checkpoints, adapter, converted base."""
    n = trainable_params or DEFAULT_TRAINABLE_PARAMS
    need = {"checkpoints": KEEP_CHECKPOINTS * n * 4 * 3, "adapter": n * 4}
    if cfg.model == EMBEDDED_MODEL and not (embedded_dir(home) / "model.safetensors").is_file():
        need["embedded model, converted once"] = EMBEDDED_CONVERT_BYTES
    return need


def check_disk(cfg: RunConfig, home: Path, trainable_params: int | None = None) -> None:
    """Raise DiskSpaceError, with the numbers and the fix, if the data home lacks room for the run."""
    need, free = disk_need_bytes(cfg, home, trainable_params), free_bytes(home)
    total = sum(need.values())
    if free >= total + DISK_MARGIN_BYTES:
        return
    gb = lambda b: f"{b / 1e9:.2f} GB"
    params = (
        f"{trainable_params:,} trainable parameters"
        if trainable_params
        else f"up to {DEFAULT_TRAINABLE_PARAMS:,} trainable parameters, the count not being known yet"
    )
    items = ", ".join(f"{what} {gb(b)}" for what, b in need.items())
    raise DiskSpaceError(
        f"not enough disk space in {home}: {gb(free)} free, but this run needs about {gb(total)} ({items}; "
        f"for {params}) plus a {gb(DISK_MARGIN_BYTES)} margin. Free space on that disk, or delete old runs "
        f"(their runs/<id>/checkpoints folders take the most room)."
    )
