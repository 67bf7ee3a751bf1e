"""Which devices a run trains on: the `train.devices` and `train.strategy` fields, this machine's GPUs, where a
run fits, and the memory each device needs. Stdlib only: the scheduler and the web server use it.

    req = parse_devices("0,1")                      # DeviceRequest(kind='ids', ids=(0, 1))
    gpus = gpus_from_doctor(doctor)                 # `engine doctor --json`'s GPU list → [Gpu, ...]
    p = place(req, "ddp", gpus, busy={0})           # Placement(gpus=(1,), world=1), None to wait, or Unplaceable
    p.label, p.env()                                # 'cuda:1', {'CUDA_VISIBLE_DEVICES': '1'}
    per_device_bytes(est, "fsdp", world=4, layers=32)

`devices` is `auto` (every free GPU; one process on a CPU-only machine), a count (`2`: two GPUs, or two CPU
processes on a machine without GPUs) or GPU ids (`0,1`; one id as `cuda:1`). A run with more than one process
is started with torchrun (engine.core.launch); the trainer splits every optimizer step's micro-batches between
the processes (engine.core.batching), so N processes × batch_size b train like one with grad_accum × N.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

STRATEGIES = ("ddp", "fsdp")
MAX_DEVICES = 1024
USABLE = 0.95  # of a GPU's memory a run may plan on (the allocator's fragmentation, the driver's reserve)
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"

DEVICES_HELP = (
    "Where the run trains: auto (every free GPU; one process on a CPU-only machine), a count (2 = two GPUs, or two "
    "CPU processes without GPUs), or GPU ids (0,1; one id as cuda:1). More than one process trains data-parallel "
    "under torchrun: batch_size is per process, so N processes act like grad_accum × N."
)
STRATEGY_HELP = (
    "How several processes share the model: ddp (every GPU holds the whole model; the usual choice for LoRA) or "
    "fsdp (weights, LoRA, gradients and AdamW states sharded across GPUs with peft's fsdp_auto_wrap_policy, for a "
    "base too big for one GPU). fsdp needs GPUs."
)


class Unplaceable(ValueError):
    """This machine can never run the request; the message names the field, the value and the fix."""


@dataclass(frozen=True)
class DeviceRequest:
    kind: str  # auto | count | ids
    count: int = 0
    ids: tuple[int, ...] = ()

    def __str__(self) -> str:
        return {"auto": "auto", "count": str(self.count)}.get(self.kind) or ",".join(map(str, self.ids))


def normalize_devices(value: Any) -> str:
    """A config value as the field's text: 2 → '2', [0, 1] → '0,1', ' Auto ' → 'auto'. TypeError otherwise."""
    if isinstance(value, bool):
        raise TypeError("must be auto, a count or GPU ids like '0,1'")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return ",".join(map(str, value)) + ("," if len(value) == 1 else "")
    if isinstance(value, str):
        return value.strip().lower()
    raise TypeError("must be auto, a count or GPU ids like '0,1'")


def parse_devices(text: str) -> DeviceRequest:
    """'auto' | 'N' (a count) | '0,1' / 'cuda:0,1' / 'cuda:1' / '1,' (GPU ids); ValueError saying what is allowed."""
    t = normalize_devices(text)
    if t == "auto":
        return DeviceRequest("auto")
    if t.isdigit():
        n = int(t)
        if not 1 <= n <= MAX_DEVICES:
            raise ValueError(f"a count of devices is 1–{MAX_DEVICES}")
        return DeviceRequest("count", count=n)
    body = t.removeprefix("cuda:")
    if re.fullmatch(r"\d+(,\d+)*,?", body) and (body != t or "," in body):
        ids = tuple(int(x) for x in body.split(",") if x)
        if len(set(ids)) != len(ids):
            raise ValueError("a GPU id appears twice")
        if max(ids) >= MAX_DEVICES:
            raise ValueError(f"GPU ids are 0–{MAX_DEVICES - 1}")
        return DeviceRequest("ids", ids=ids)
    raise ValueError("write auto, a count like 2, or GPU ids like 0,1 (one id: cuda:1)")


def validate_devices(tr: Any) -> list[str]:
    """The problems of train.devices and train.strategy (engine.core.config.validate adds them)."""
    problems = []
    try:
        parse_devices(tr.devices)
    except ValueError as e:
        problems.append(f"train.devices = {tr.devices!r}: {e}")
    if tr.strategy not in STRATEGIES:
        problems.append(f"train.strategy = {tr.strategy!r}: must be one of {', '.join(STRATEGIES)}")
    return problems


# ---- this machine's GPUs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gpu:
    """One GPU as `engine doctor --json` reports it (index as this process numbers them)."""

    index: int
    name: str = ""
    total_gb: float = 0.0
    free_gb: float | None = None  # when it was asked; None when unknown

    def fits(self, need_gb: float | None) -> bool:
        if need_gb is None:
            return True
        room = self.total_gb * USABLE if self.free_gb is None else min(self.total_gb * USABLE, self.free_gb)
        return need_gb <= room


def gpus_from_doctor(doctor: dict[str, Any] | None) -> list[Gpu]:
    return [
        Gpu(int(g["index"]), str(g.get("name") or ""), float(g.get("total_gb") or 0.0), g.get("free_gb"))
        for g in (doctor or {}).get("gpus") or []
    ]


def may_have_gpus() -> bool:
    """False when this machine surely has no CUDA/ROCm device (no driver nodes): asking torch can be skipped."""
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg"))


# ---- placement ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """The devices one run gets: GPU ids (as this machine numbers them; () on CPU) and its processes here."""

    gpus: tuple[int, ...]
    world: int

    @property
    def label(self) -> str:
        """What runs.devices records: 'cuda:0,1', or 'cpu' (with its process count in runs.world_size)."""
        return f"cuda:{','.join(map(str, self.gpus))}" if self.gpus else "cpu"

    def env(self, visible: str | None = None) -> dict[str, str]:
        """CUDA_VISIBLE_DEVICES for the run's processes, mapped through this process's own visible list."""
        if not self.gpus:
            return {}
        seen = [v for v in (visible if visible is not None else os.environ.get(VISIBLE_ENV, "")).split(",") if v]
        return {VISIBLE_ENV: ",".join(seen[i] if i < len(seen) else str(i) for i in self.gpus)}


def gpus_of(label: str | None) -> tuple[int, ...]:
    """The GPU ids of a runs.devices label ('cuda:0,1' → (0, 1)); () for cpu or nothing."""
    if not label or not label.startswith("cuda:"):
        return ()
    return tuple(int(x) for x in label.removeprefix("cuda:").split(",") if x.strip().isdigit())


def place(
    req: DeviceRequest, strategy: str, gpus: list[Gpu], busy: frozenset[int] | set[int] = frozenset(), *, need_gb=None
) -> Placement | None:
    """The devices the run gets now; None while they are busy (the run stays queued); Unplaceable when this
    machine can never run it. need_gb: the estimate per device (GiB), checked against each GPU's memory."""
    if not gpus:
        if req.kind == "ids":
            raise Unplaceable(
                f"train.devices = {str(req)!r} names GPUs, but this machine has none: give a count of CPU "
                "processes or auto"
            )
        if strategy == "fsdp":
            raise Unplaceable(
                "train.strategy = 'fsdp' needs GPUs (FSDP over gloo on CPU is not supported reliably): use ddp"
            )
        return Placement((), req.count if req.kind == "count" else 1)
    by_index = {g.index: g for g in gpus}
    if req.kind == "ids":
        missing = [i for i in req.ids if i not in by_index]
        if missing:
            raise Unplaceable(
                f"train.devices = {str(req)!r}: this machine has no GPU {', '.join(map(str, missing))} "
                f"(it has {', '.join(str(g.index) for g in gpus)})"
            )
        wanted = [by_index[i] for i in req.ids]
    elif req.kind == "count" and req.count > len(gpus):
        raise Unplaceable(f"train.devices = {req.count}: this machine has {len(gpus)} GPU{'s' * (len(gpus) != 1)}")
    else:
        wanted = gpus
    if need_gb is not None and not any(need_gb <= g.total_gb * USABLE for g in wanted):
        biggest = max(wanted, key=lambda g: g.total_gb)
        raise Unplaceable(
            f"needs about {need_gb:.1f} GB per device with {strategy}, more than GPU {biggest.index} has "
            f"({biggest.total_gb:.0f} GB): use more devices with strategy fsdp, quant 4bit, a smaller batch_size "
            "or gradient checkpointing"
        )
    free = [g for g in wanted if g.index not in busy and g.fits(need_gb)]
    if req.kind == "ids":
        return Placement(req.ids, len(req.ids)) if len(free) == len(wanted) else None
    k = req.count if req.kind == "count" else len(free)
    if k == 0 or len(free) < k:
        return None
    chosen = tuple(g.index for g in free[:k])
    return Placement(chosen, len(chosen))


def world_here(req: DeviceRequest, gpus: list[Gpu]) -> int:
    """The processes the request means on this machine when nothing is busy (for estimates before placement)."""
    if req.kind == "ids":
        return len(req.ids)
    if req.kind == "count":
        return req.count
    return max(1, len(gpus))


# ---- memory per device -----------------------------------------------------------------------------------------


def per_device_bytes(est: Any, strategy: str, world: int, layers: int | None = None, *, base: int | None = None) -> int:
    """What each of `world` processes holds at its peak, from a one-process Estimate (engine.core.estimate).

    ddp: a whole replica, plus DDP's gradient buckets (one more copy of the trainable gradients). fsdp: the
    linear layers' weights, LoRA and AdamW states sharded over the processes; the root unit (embeddings, norm,
    head) whole; two decoder layers gathered at a time (the one running and the one prefetched); activations,
    logits and workspace per process as before. base: the one-process figure to start from (default the total).
    """
    total = est.total_bytes if base is None else base
    if world <= 1:
        return total
    if strategy == "ddp":
        return total + est.grad_bytes
    sharded = est.base_linear_bytes + est.lora_bytes + est.optimizer_bytes
    gathered = 2 * est.base_linear_bytes // max(1, int(layers or 1))
    return total - sharded + sharded // world + gathered


# ---- what the Train tab offers and says ------------------------------------------------------------------------


def device_choices(gpus: list[Gpu], cpus: int) -> list[tuple[str, str]]:
    """(label, value) pairs of train.devices for this machine: auto, counts, and each GPU by id."""
    if not gpus:
        counts = range(2, max(2, min(cpus, 8)) + 1)
        return [("auto — one process (no GPU)", "auto")] + [(f"{n} CPU processes (gloo)", str(n)) for n in counts]
    out = [(f"auto — every free GPU ({len(gpus)})", "auto")]
    out += [(f"{n} GPU{'s' * (n > 1)}, any free", str(n)) for n in range(1, len(gpus) + 1)]
    out += [(f"GPU {g.index}: {g.name} ({g.total_gb:.0f} GB)", f"cuda:{g.index}") for g in gpus]
    if len(gpus) > 1:
        out.append((f"GPUs {','.join(str(g.index) for g in gpus)}", ",".join(str(g.index) for g in gpus)))
    return out


def scale_note(est: Any, tr: Any, gpus: list[Gpu], layers: int | None) -> str:
    """One line of the estimate: the processes train.devices means here, the memory per device with the strategy,
    or why this machine cannot run it; '' for one process with nothing to say."""
    try:
        req = parse_devices(tr.devices)
    except ValueError:
        return ""
    world = world_here(req, gpus)
    per_device = per_device_bytes(est, tr.strategy, world, layers) / 2**30
    try:
        place(req, tr.strategy, gpus, need_gb=per_device)
    except Unplaceable as e:
        return f"⚠ {e}"
    if world == 1:
        return ""
    where = f"{world} GPUs" if gpus else f"{world} CPU processes"
    return (
        f"**≈ {per_device:.2f} GB per device** on {where} ({tr.strategy}); batch_size {tr.batch_size} per process: "
        f"a step trains {world * tr.grad_accum * tr.batch_size} examples"
    )
