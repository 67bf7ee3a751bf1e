"""Resumable checkpoints: written crash-safe (and disk-full aware), verified, and read without running code.

    ckpt = save_checkpoint(out_dir, model, opt, sched, step=40, tokens_seen=9000, best_val=1.2, elapsed_s=31.0)
    state, used = resume(ckpt, model, opt, sched)     # an unusable checkpoint falls back to the one before

A checkpoint is a folder runs/<id>/checkpoints/step-NNNNNNN/ (engine.core.runs names it) holding

    adapter_model.safetensors + adapter_config.json   the LoRA weights (peft's save_pretrained)
    trainer.pt                                        optimizer, scheduler and RNG states (torch.save)
    trainer_state.json                                step, tokens seen, best val loss, time; written last

trainer.pt is read with torch.load(weights_only=True): tensors and plain containers only. A pickle that
names any other callable (os.system, ...) is refused before anything runs, so a checkpoint copied from
elsewhere cannot execute code on resume.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from engine.core import runs as R
from engine.core.config import RunConfig
from engine.core.variants import MOVES_BASE
from engine.ml.adalora import unpruned_save

TRAINER_BLOB = "trainer.pt"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
STATE_KEYS = ("step", "tokens_seen")
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# What torch, safetensors and the OS say when a write runs out of room (torch's zip writer reports a short
# write as "[enforce fail at inline_container.cc:...] unexpected pos"; safetensors wraps the OS error).
DISK_FULL_TEXTS = ("no space left", "unexpected pos", "disk quota exceeded", "file too large", "os error 28")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the folder, what is wrong and what to do."""


class DiskFullError(OSError):
    """A write that ran out of disk space; the message says how much to free."""


# ---- writing ------------------------------------------------------------------------------------------


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).is_dir() else 0


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
        return True
    text = str(e).lower()
    return any(t in text for t in DISK_FULL_TEXTS)


def mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


@contextmanager
def writing(tmp: Path, what: str, expect_bytes: int = 0) -> Iterator[Path]:
    """Write into the fresh folder `tmp`; on any failure remove it, and say "disk full" plainly when it was.

    expect_bytes: how big the finished folder is expected to be (e.g. the previous checkpoint), for the
    message's "free at least N MB".
    """
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException as e:
        written = folder_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_disk_full(e):
            raise
        free = free_bytes(tmp.parent)
        need = max(expect_bytes, written)
        raise DiskFullError(
            f"disk full while writing {what} in {tmp.parent}: {mb(free)} free, it takes about {mb(need)}; "
            f"free at least {mb(max(need - free, 2**20))} on that disk (old runs' checkpoints folders take the "
            f"most room), then resume the run. The partial folder {tmp.name} was removed. "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else 'no details'})",
        ) from None


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def save_checkpoint(
    out_dir: Path,
    model,
    opt,
    sched,
    step: int,
    tokens_seen: int,
    best_val: float | None,
    elapsed_s: float,
    keep: int = R.KEEP_CHECKPOINTS,
    *,
    extra_state: dict[str, Any] | None = None,
    rank_rngs: list[dict[str, Any]] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Adapter + optimizer + scheduler + step + RNG, written to a temp folder and renamed (crash-safe).

    Leftover temp folders of a killed process are removed first; a failed write removes its own and, when
    the disk is full, raises DiskFullError saying how much room is missing. Keeps the newest `keep`.
    Data-parallel runs (engine.ml.distributed) add every rank's RNG (`rank_rngs`) and, in `extra_state`, the
    micro-batches trained and the number of processes; under FSDP `weights` is the gathered state dict and
    the optimizer state is left out (opt None: its moments live in shards).
    """
    root = Path(out_dir) / R.CHECKPOINTS_DIRNAME
    root.mkdir(exist_ok=True)
    for stale in root.glob(f".tmp-{R.CHECKPOINT_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = R.checkpoint_name(step)
    previous = R.latest_checkpoint(out_dir)
    with writing(root / f".tmp-{name}", f"checkpoint {name}", folder_bytes(previous) if previous else 0) as tmp:
        with unpruned_save(model):  # AdaLoRA: every triplet, so that a resumed run can load it
            model.save_pretrained(tmp, **({"state_dict": weights} if weights is not None else {}))
        blob = {"optimizer": opt.state_dict() if opt is not None else None, "scheduler": sched.state_dict()}
        blob.update(rng=rng_state(), **({"rank_rng": rank_rngs} if rank_rngs else {}))
        torch.save(blob, tmp / TRAINER_BLOB)
        state = {"step": step, "tokens_seen": tokens_seen, "best_val_loss": best_val, "elapsed_s": elapsed_s}
        state.update(extra_state or {})
        (tmp / R.TRAINER_STATE).write_text(json.dumps(state))
    target = root / name
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    for old in sorted(root.glob(f"{R.CHECKPOINT_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


# ---- reading ------------------------------------------------------------------------------------------


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(adapter state dict, trainer blob, trainer state) read and checked in full, or CheckpointError.

    Nothing is applied to a model here: a damaged file is found before any state changes.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / R.TRAINER_STATE).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {R.TRAINER_STATE})")
    try:
        state = json.loads((path / R.TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / R.TRAINER_STATE} is damaged ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int) for k in STATE_KEYS):
        raise CheckpointError(f"{path / R.TRAINER_STATE} lacks {' and '.join(STATE_KEYS)}")
    try:
        weights = load_file(str(path / ADAPTER_WEIGHTS))
    except Exception as e:  # safetensors raises its own SafetensorError (no common base beyond Exception)
        raise CheckpointError(f"{path / ADAPTER_WEIGHTS} is damaged or missing ({type(e).__name__}: {e})") from None
    try:
        blob = torch.load(path / TRAINER_BLOB, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path / TRAINER_BLOB} holds objects other than tensors and plain data; refused, since loading it "
            f"could run code. Only resume from checkpoints this app wrote. ({first[:200]})"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path / TRAINER_BLOB} is damaged ({type(e).__name__}: {e})") from None
    if not isinstance(blob, dict) or not {"optimizer", "scheduler", "rng"} <= set(blob):
        raise CheckpointError(f"{path / TRAINER_BLOB} lacks the optimizer, scheduler or RNG state")
    return weights, blob, state


def apply_checkpoint(path: Path, model, opt, sched, *, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Load a verified checkpoint into the model, optimizer, scheduler and RNGs; returns its trainer state.

    Rank r of a data-parallel run takes its own RNG state when the checkpoint was written by as many ranks
    (state["rank_rng_restored"] says whether it did); an optimizer state left out (FSDP) leaves AdamW fresh.
    """
    from peft import set_peft_model_state_dict

    weights, blob, state = read_checkpoint(path)
    try:
        set_peft_model_state_dict(model, weights)
        if blob["optimizer"] is not None:
            opt.load_state_dict(blob["optimizer"])
        sched.load_state_dict(blob["scheduler"])
        ranks = blob.get("rank_rng") or []
        state["rank_rng_restored"] = rank == 0 or len(ranks) == world
        rng = ranks[rank] if rank and len(ranks) == world else blob["rng"]
        random.setstate(_python_rng(rng["python"]))
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{path} does not fit this run (another model, targets or rank?): {type(e).__name__}: "
            f"{str(e).splitlines()[0][:300] if str(e) else ''}"
        ) from None
    return state


def _python_rng(state: Any) -> tuple:
    """random.setstate wants (version, tuple of ints, gauss) tuples; a loaded state may hold lists."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def fallbacks(path: Path) -> list[Path]:
    """`path`, then the older complete checkpoints of the same run, newest first."""
    path = Path(path)
    if path.parent.name != R.CHECKPOINTS_DIRNAME:
        return [path]
    older = [p for p in R.checkpoints(path.parent.parent) if p.name < path.name]
    return [path, *reversed(older)]


def resume(
    path: Path,
    model,
    opt,
    sched,
    say: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
    *,
    rank: int = 0,
    world: int = 1,
) -> tuple[dict[str, Any], Path, list[str]]:
    """Restore the newest usable checkpoint, starting at `path`: (trainer state, the one used, what was skipped).

    A damaged or refused checkpoint is reported with `say` and the one before it is tried; CheckpointError
    when none can be used.
    """
    skipped: list[str] = []
    candidates = fallbacks(path)
    for i, ckpt in enumerate(candidates):
        try:
            state = apply_checkpoint(ckpt, model, opt, sched, rank=rank, world=world)
        except CheckpointError as e:
            skipped.append(str(e))
            nxt = f"falling back to {candidates[i + 1].name}" if i + 1 < len(candidates) else "no older checkpoint"
            say(f"warning: cannot resume from {ckpt.name}: {e}; {nxt}")
            continue
        if skipped:
            say(f"resuming from {ckpt.name} (step {state['step']}) instead of {Path(path).name}")
        return state, ckpt, skipped
    raise CheckpointError(
        f"cannot resume from {path}: " + " / ".join(skipped) + ". Submit the run again to start from step 0."
    )


def save_adapter(
    model,
    tok,
    out_dir: Path,
    cfg: RunConfig,
    name: str = R.ADAPTER_DIRNAME,
    write: Callable[[Path, Any], None] | None = None,
    *,
    weights: dict | None = None,
) -> Path:
    """Standard PEFT folder out_dir/name (adapter_config.json + adapter_model.safetensors) plus the tokenizer,
    written to a temporary folder and renamed into place. write(folder, model): writes the PEFT files instead
    of model.save_pretrained (ReLoRA's cumulative adapter). weights: a gathered state dict (FSDP)."""
    target = out_dir / name
    tmp = out_dir / f"{name}.tmp"
    kw: dict[str, Any] = {"state_dict": weights} if weights is not None else {}
    with writing(tmp, "the adapter", folder_bytes(target)):
        if write is not None:
            write(tmp, model)
        elif cfg.lora.init in MOVES_BASE:
            # Convert PiSSA/OLoRA to a plain LoRA (rank 2r) that applies to the ORIGINAL base weights.
            model.save_pretrained(tmp, path_initial_model_for_weight_conversion=str(out_dir / "init_adapter"), **kw)
        else:
            model.save_pretrained(tmp, **kw)
        tok.save_pretrained(tmp)
        (tmp / "loralab.json").write_text(json.dumps({"run_config": cfg.to_dict()}, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target
