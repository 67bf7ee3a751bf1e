"""Data-parallel training through accelerate: one code path for one process and for the N that torchrun starts.

    dist = Distributed(cfg)                         # accelerate.Accelerator: gloo on CPU, NCCL on GPUs
    forward, opt = dist.prepare(model, opt)         # DDP (or FSDP with peft's wrap policy) around the loss forward
    for micro, n_label, n_tokens in dist.steps(prep.train, cfg.train, start):   # this rank's share of each step
        with dist.sync(forward, last=...):  loss = forward(batch, packed).sum() * dist.world / n_label
    dist.mean(loss_acc), dist.any(should_stop()), dist.evaluate(val, run_eval)

Every optimizer step trains the next world × grad_accum micro-batches of the run's stream (engine.core.batching);
rank r trains the r-th slice. The loss of a micro-batch is its summed per-token losses × world / the target tokens
of the WHOLE step (all ranks): DDP averages gradients over the ranks, so the step's gradient is the sum of every
target token's gradient / the step's target tokens, exactly what one process with grad_accum × world computes.
Only rank 0 writes (metrics, checkpoints, the adapter, spectra, the database row); the others train and wait.
torch and accelerate live here; engine.core.devices holds the field rules, engine.core.launch the torchrun command.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from engine.core.batching import rank_share, step_micro_batches
from engine.core.config import RunConfig, TrainSpec
from engine.core.procs import PEER_LOST_EXIT  # noqa: F401  (a rank that stops because another one died)
from engine.ml.steps import token_losses

# What torch.distributed says when another rank is gone (its process died: sockets closed, NCCL aborted).
PEER_LOST_TEXTS = ("connection closed by peer", "connection reset by peer", "broken pipe", "nccl communicator")


class DistributedSetupError(ValueError):
    """A strategy or device choice this machine cannot run (one line, the fix)."""


class StepLoss(nn.Module):
    """The training forward as one module, so that DDP/FSDP see it whole (the packed path calls the decoder and
    the output head directly, which a wrapper's own forward would otherwise not run)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor] | None = None, fast: bool = False, chunk: int = 0, **inputs):
        if batch is None:  # a plain forward (evaluation through the FSDP root)
            return self.model(**inputs)
        return token_losses(self.model, batch, fast=fast, chunk=chunk)


def local_gpus() -> list[dict[str, Any]]:
    """This machine's GPUs as torch sees them (CUDA_VISIBLE_DEVICES applied): index, name, memory (GiB), free."""
    out = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        free, total = torch.cuda.mem_get_info(i)
        name = torch.cuda.get_device_name(i)
        out.append({"index": i, "name": name, "total_gb": round(total / 2**30, 2), "free_gb": round(free / 2**30, 2)})
    return out


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, processes on this machine) as torchrun sets them; (0, 1, 1) outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return int(os.environ.get("RANK", "0") or 0), world, int(os.environ.get("LOCAL_WORLD_SIZE", str(world)) or 1)


def is_peer_lost(e: BaseException) -> bool:
    """True when `e` says another rank is gone (not a failure of this rank's own work)."""
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(e).lower()
    return (isinstance(e, dist_error) and any(t in text for t in PEER_LOST_TEXTS)) or (
        isinstance(e, RuntimeError) and any(t in text for t in PEER_LOST_TEXTS)
    )


class Distributed:
    """accelerate.Accelerator for one run, plus the few collective steps the trainer needs."""

    def __init__(self, cfg: RunConfig) -> None:
        from accelerate import Accelerator

        self.rank, self.world, self.local_world = world_from_env()
        cuda = torch.cuda.is_available()
        self.fsdp = cfg.train.strategy == "fsdp" and self.world > 1
        if cfg.train.strategy == "fsdp" and not cuda:
            raise DistributedSetupError(
                "train.strategy = 'fsdp' needs GPUs (FSDP over gloo on CPU is not supported reliably): use ddp"
            )
        plugin = None
        if self.fsdp:  # GPU only; not exercised by the CPU test suite
            from accelerate.utils import FullyShardedDataParallelPlugin

            plugin = FullyShardedDataParallelPlugin(
                use_orig_params=True, sync_module_states=True, state_dict_type="FULL_STATE_DICT"
            )
        # The trainer keeps its own autocast, gradient accumulation and device placement (the base is loaded on
        # self.device, quantized bases included, which must not be moved): accelerate wraps and reduces.
        self.acc = Accelerator(cpu=not cuda, mixed_precision="no", fsdp_plugin=plugin, device_placement=False)
        self.device = self.acc.device
        self.main = self.acc.is_main_process
        self.forward: nn.Module | None = None

    # -- setup ------------------------------------------------------------------------------------------

    @property
    def label(self) -> str:
        """What runs.devices records: 'cpu', or this machine's GPUs as the machine numbers them ('cuda:0,1')."""
        if self.device.type != "cuda":
            return "cpu"
        seen = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        ids = seen[: self.local_world] if seen else [str(i) for i in range(self.local_world)]
        return "cuda:" + ",".join(ids)

    def threads(self, n: int) -> int:
        """CPU threads per process: the machine's share of each of the processes on it."""
        k = max(1, n // max(1, self.local_world))
        torch.set_num_threads(k)
        return k

    def prepare(self, model: nn.Module, opt):
        """(forward, optimizer): the loss forward wrapped by DDP/FSDP (as is for one process), accelerate's
        optimizer. Gradient checkpointing, if on, was enabled with use_reentrant=False, which DDP needs."""
        step = StepLoss(model)
        if self.fsdp:
            from peft.utils.other import fsdp_auto_wrap_policy

            self.acc.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
        self.forward, opt = self.acc.prepare(step, opt)
        return self.forward, opt

    # -- the step ----------------------------------------------------------------------------------------

    def steps(self, examples: Sequence[Any], tr: TrainSpec, start: int = 0) -> Iterator[tuple[list, int, int]]:
        """Per optimizer step: (this rank's micro-batches of examples, target tokens of the whole step, tokens of
        the whole step). The whole step is known to every rank (the order is a pure function): no communication."""
        per_step = self.world * tr.grad_accum
        for step in step_micro_batches(len(examples), tr.batch_size, tr.seed, per_step, start):
            mine = [[examples[i] for i in mb] for mb in rank_share(step, self.rank, self.world)]
            everyone = [examples[i] for mb in step for i in mb]
            yield mine, sum(e.n_label_tokens for e in everyone), sum(len(e.input_ids) for e in everyone)

    def sync(self, forward: nn.Module, last: bool):
        """Gradients are all-reduced on the step's last micro-batch only (DDP's no_sync before it)."""
        return contextlib.nullcontext() if last or self.world == 1 else self.acc.no_sync(forward)

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss)

    def clip(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm (FSDP: over every shard) and return it."""
        chosen = list(self.forward.parameters()) if self.fsdp and self.forward is not None else params
        return self.acc.clip_grad_norm_(chosen, max_norm)

    # -- reductions ---------------------------------------------------------------------------------------

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.world == 1 else self.acc.reduce(t.detach().clone(), "mean")

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any: all ranks stop at the same step (a cancel, a hook's stop)."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.acc.reduce(t, "max").item() > 0)

    def evaluate(self, examples: Sequence[Any], run: Callable[[Sequence[Any]], float]) -> float:
        """The mean per-token validation loss over all ranks: each evaluates every world-th example, the sums
        and token counts are added up."""
        if self.world == 1:
            return run(examples)
        mine = list(examples[self.rank :: self.world])
        n = sum(e.n_label_tokens for e in mine)
        local = run(mine) * n if mine else 0.0
        t = self.acc.reduce(torch.tensor([local, float(n)], dtype=torch.float64, device=self.device), "sum")
        return float(t[0]) / max(1.0, float(t[1]))

    def rates(self, tokens: int, seconds: float) -> list[float]:
        """Tokens per second of every rank over the same window (all ranks step together)."""
        t = torch.tensor([tokens / max(1e-9, seconds)], dtype=torch.float64, device=self.device)
        return [float(x) for x in (self.acc.gather(t) if self.world > 1 else t).tolist()]

    # -- saving --------------------------------------------------------------------------------------------

    def adapter_state(self) -> dict[str, torch.Tensor] | None:
        """FSDP: the whole model's state dict gathered on rank 0 (every rank must call this; the keys of the
        loss wrapper's `model.` prefix removed), for peft's save_pretrained(state_dict=...). None otherwise: the
        LoRA weights are whole on every rank."""
        if not self.fsdp or self.forward is None:
            return None
        sd = self.acc.get_state_dict(self.forward)
        return {k.removeprefix("model."): v for k, v in sd.items()} if self.main else None

    def rank_rngs(self) -> list[dict[str, Any]] | None:
        """Every rank's RNG state, gathered on rank 0 for the checkpoint (None with one process)."""
        if self.world == 1:
            return None
        from engine.ml.checkpoint import rng_state

        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, rng_state())
        return out

    def barrier(self) -> None:
        if self.world > 1:
            self.acc.wait_for_everyone()

    def end(self) -> None:
        """Leave the process group (after the last collective)."""
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
