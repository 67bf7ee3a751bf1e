"""ReLoRA: high-rank training through low-rank updates. Every `train.relora_every` steps the LoRA update is
merged into the (frozen) base weights, A and B restart (A random, B = 0), most of their optimizer state is
pruned, and the learning rate warms up again: the sum of the merged low-rank updates can reach a rank far
above r.

    hook = ReLoraHook(cfg)        # built by engine.ml.hooks.build_hooks when train.relora_every > 0

The run keeps the cumulative update as factors, ΔW = Σₖ sₖ·Bₖ·Aₖ = [s·B₁ … s·Bₖ]·[A₁; …; Aₖ] (rank ≤ k·r),
never as a dense matrix, so that:

- the spectra of the run are those of the cumulative ΔW (with the current cycle), by the QR trick;
- the saved adapter is a plain PEFT LoRA of rank (k + 1)·r holding all of it (scaling folded into B, α = rank):
  loaded on the ORIGINAL base with plain peft it gives the trained model;
- a resumed run re-applies the merges it had done (one small file per merge, relora/merge-NNNNNNN.safetensors)
  up to its checkpoint's step.

Partial reset (Lialin et al.): at each restart the Adam moments of every A and B are pruned by magnitude,
keeping the largest (1 − relora_reset) first moments and their second moments; the step counts stay. The jagged schedule multiplies the run's own
schedule by a linear warm-up over relora_warmup steps after each restart. A base kept in a 16-bit dtype
receives each merge rounded to that dtype; the saved adapter holds the exact fp32 sum.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine.core.config import ConfigError, RunConfig
from engine.ml.hooks import TrainHook, TrainState

ADAPTER = "default"
PREFIX = "base_model.model."
MERGES_DIR = "relora"
NOTE = "ReLoRA: cumulative ΔW of {k} merged cycle(s) + the current one, rank ≤ {rank}"


def lora_layers(model) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {
        n.removeprefix(PREFIX): m for n, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A
    }


def prune_moments_(state: dict[str, Any], ratio: float) -> None:
    """Zero the `ratio` fraction of Adam's first moments with the smallest |value|, and the second moments at
    the same entries, in place. One mask for both: a kept first moment over a pruned second moment would make
    the next update m/ε (and A's gradient is exactly 0 right after a restart, since B = 0)."""
    m, v = state.get("exp_avg"), state.get("exp_avg_sq")
    if m is None or v is None:
        return
    k = int(ratio * m.numel())
    if k <= 0:
        return
    if k >= m.numel():
        m.zero_(), v.zero_()
        return
    pruned = m.abs() <= m.abs().flatten().kthvalue(k).values
    m.masked_fill_(pruned, 0.0)
    v.masked_fill_(pruned, 0.0)


def jagged(schedule, every: int, warmup: int):
    """The schedule's lr multiplier times a linear re-warm-up over `warmup` steps after every restart."""

    def factor(step: int) -> float:
        if warmup <= 0 or step < every:
            return 1.0
        return min(1.0, (step % every + 1) / warmup)  # the first step after a restart at lr/warmup, not 0

    return lambda step: schedule(step) * factor(step)


class ReLoraHook(TrainHook):
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.A: dict[str, list[Tensor]] = {}  # per module: the merged cycles' A (r × in)
        self.B: dict[str, list[Tensor]] = {}  # per module: the merged cycles' s·B (out × r)
        self.merges = 0

    # ---- the loop's moments --------------------------------------------------------------------------

    def on_start(self, state: TrainState) -> None:
        from engine.ml import checkpoint as C

        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if world > 1:  # every rank would merge into its own base and only rank 0 may write the merges
            raise ConfigError(
                f"train.relora_every with {world} processes: ReLoRA's merges are made in one process; "
                "set train.devices: 1 (or turn ReLoRA off)"
            )

        self.layers = lora_layers(state.model)
        self.A = {n: [] for n in self.layers}
        self.B = {n: [] for n in self.layers}
        self.folder = state.out_dir / MERGES_DIR
        for path in sorted(self.folder.glob("merge-*.safetensors")) if state.step > 0 else []:
            if int(path.stem.split("-")[1]) <= state.step:  # merges after the checkpoint are redone
                self._reapply(path)
        tr = self.cfg.train
        state.sched.lr_lambdas = [jagged(f, tr.relora_every, tr.relora_warmup) for f in state.sched.lr_lambdas]
        default_spectra = state.spectra
        state.spectra = lambda: self.spectra() if self.merges else default_spectra()
        model, tok, out_dir, cfg = state.model, state.tok, state.out_dir, state.cfg
        state.save_adapter = lambda name: C.save_adapter(
            model, tok, out_dir, cfg, name, write=self.write_adapter if self.merges else None
        )

    def after_step(self, state: TrainState) -> None:
        if state.step % self.cfg.train.relora_every == 0 and state.step < state.total_steps:
            self.restart(state)
            state.sink.log(state.step, {"relora/merges": float(self.merges)})

    def on_end(self, state: TrainState) -> None:
        state.summary["relora"] = {"merges": self.merges, "every": self.cfg.train.relora_every, "rank": self.rank()}

    # ---- merge, restart, reset -----------------------------------------------------------------------

    @torch.no_grad()
    def restart(self, state: TrainState) -> None:
        """Merge s·B·A into the base, keep its factors, restart A and B, prune their optimizer moments."""
        for name, m in self.layers.items():
            A, B = m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight
            base = m.get_base_layer().weight
            base.data += m.get_delta_weight(ADAPTER).to(base.dtype)  # peft's ΔW (scaling, Conv1D transpose)
            self.A[name].append(A.detach().float().clone())
            self.B[name].append((m.scaling[ADAPTER] * B.detach().float()).clone())
            m.reset_lora_parameters(ADAPTER, True)  # A: kaiming uniform, B: 0 (peft's LoRA default)
            for p in (A, B):
                prune_moments_(state.opt.state.get(p, {}), self.cfg.train.relora_reset)
        self.merges += 1
        self._save_merge(state.step)

    def _save_merge(self, step: int) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"{n}.A": self.A[n][-1].contiguous() for n in self.layers}
        tensors.update({f"{n}.B": self.B[n][-1].contiguous() for n in self.layers})
        tmp = self.folder / f".tmp-merge-{step:07d}.safetensors"
        save_file(tensors, str(tmp), metadata={"step": str(step)})
        tmp.replace(self.folder / f"merge-{step:07d}.safetensors")

    @torch.no_grad()
    def _reapply(self, path: Path) -> None:
        from peft.utils.other import transpose
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        for name, m in self.layers.items():
            A, B = tensors[f"{name}.A"], tensors[f"{name}.B"]
            base = m.get_base_layer().weight
            base.data += transpose(B @ A, m.fan_in_fan_out).to(base.device, base.dtype)
            self.A[name].append(A.to(m.lora_A[ADAPTER].weight.device))
            self.B[name].append(B.to(m.lora_B[ADAPTER].weight.device))
        self.merges += 1

    # ---- the cumulative ΔW ---------------------------------------------------------------------------

    def rank(self) -> int:
        return (self.merges + 1) * self.cfg.lora.r

    def factors(self) -> dict[str, tuple[Tensor, Tensor, float]]:
        """{name: (A, B, 1.0)}: the cumulative ΔW = B·A of every merged cycle and the current one."""
        out = {}
        for name, m in self.layers.items():
            A_now = m.lora_A[ADAPTER].weight.detach().float()
            B_now = m.scaling[ADAPTER] * m.lora_B[ADAPTER].weight.detach().float()
            out[name] = (torch.cat([*self.A[name], A_now], 0), torch.cat([*self.B[name], B_now], 1), 1.0)
        return out

    def spectra(self):
        from engine.ml.spectra import factor_spectra

        return factor_spectra(self.factors(), NOTE.format(k=self.merges, rank=self.rank()))

    def write_adapter(self, folder: Path, model) -> None:
        """A plain PEFT LoRA folder of rank (merges + 1)·r with the cumulative ΔW (for the ORIGINAL base)."""
        from safetensors.torch import save_file

        rank = self.rank()
        config = copy.deepcopy(model.peft_config[ADAPTER])
        config.r, config.lora_alpha, config.use_rslora = rank, rank, False  # scaling α/r = 1: s is in B
        config.rank_pattern, config.alpha_pattern = {}, {}
        config.save_pretrained(str(folder))
        tensors = {}
        for name, (A, B, _) in self.factors().items():
            tensors[f"{PREFIX}{name}.lora_A.weight"] = A.cpu().contiguous()
            tensors[f"{PREFIX}{name}.lora_B.weight"] = B.cpu().contiguous()
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / "relora.json").write_text(json.dumps({"merges": self.merges, "cycle_r": self.cfg.lora.r}))
