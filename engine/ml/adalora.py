"""AdaLoRA in the training loop: peft's rank allocator after every optimizer step, the orthogonality penalty in
the loss, and the rank of every module recorded over the run.

    hook = AdaLoraHook(cfg)       # built by engine.ml.hooks.build_hooks when lora.method = 'adalora'

peft (AdaLoraModel) parametrises ΔW = P·Λ·Q and prunes singular values by importance; what it needs from the
loop, and where this hook gives it:

- `update_and_allocate(global_step)` after each optimizer step, while the step's gradients still exist
  (its importance score is |w · ∂L/∂w|): after_step (the trainer clears gradients after its hooks).
- The regulariser γ·R(P, Q): peft adds it only inside its own forward when that forward computes a loss
  from `labels`; the trainer's loss (engine.ml.steps.token_losses) never passes labels and, when packed,
  calls the decoder directly, so the same term is added here as a loss_term, computed as peft computes it:
  the mean over P and Q matrices of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F.
- The rank of each module over time: the masks peft keeps in `rank_pattern` (one bool per singular value).
  Logged as `adalora/budget` (the scheduler's budget), `adalora/rank_total` and `adalora/r/<module>` when it
  changes; the final ranks go into the run's summary under `adalora`.

Checkpoints keep every triplet (unpruned_save): peft's save_pretrained drops pruned ones, which a resumed run
could not load into its full-rank layers. A resumed run rebuilds the masks from Λ's zeros; the importance
averages (EMA) restart.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from engine.core.config import RunConfig
from engine.ml.hooks import TrainHook, TrainState

ADAPTER = "default"
METRIC_NAME_MAX = 64  # storage's metric name width


def rank_metric(module: str) -> str:
    name = f"adalora/r/{module}"
    return name if len(name) <= METRIC_NAME_MAX else "adalora/r/…" + module[-(METRIC_NAME_MAX - 11) :]


def _layers(model) -> dict[str, Any]:
    from peft.tuners.adalora import AdaLoraLayer

    prefix = "base_model.model."
    return {
        n.removeprefix(prefix): m
        for n, m in model.named_modules()
        if isinstance(m, AdaLoraLayer) and ADAPTER in m.lora_E
    }


def ranks(model) -> dict[str, int]:
    """Module name → its current rank: the singular values peft's last allocation kept (all, before any)."""
    layers = _layers(model)
    pattern = model.peft_config[ADAPTER].rank_pattern
    if not pattern:
        return {n: int(m.r[ADAPTER]) for n, m in layers.items()}
    kept = {key.split(".lora_E")[0]: sum(bool(x) for x in mask) for key, mask in pattern.items()}
    return {n: kept.get(n, int(m.r[ADAPTER])) for n, m in layers.items()}


def orth_penalty(layers: dict[str, Any]) -> torch.Tensor:
    """peft's R(P, Q): mean over the Q (lora_A, r × in) and P (lora_B, out × r) matrices of ‖QQᵀ − I‖_F and
    ‖PᵀP − I‖_F (AdaLoraModel.forward)."""
    terms = []
    for m in layers.values():
        Q, P = m.lora_A[ADAPTER], m.lora_B[ADAPTER]
        for cov in (Q @ Q.T, P.T @ P):  # (r, r)
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)))
    return torch.stack(terms).mean() if terms else torch.zeros(())


@contextmanager
def unpruned_save(model) -> Iterator[None]:
    """While saving a checkpoint: no rank_pattern, so that peft writes every triplet (pruned Λ entries are 0)."""
    config = getattr(model, "peft_config", {}).get(ADAPTER)
    pattern = getattr(config, "rank_pattern", None) if type(config).__name__ == "AdaLoraConfig" else None
    if pattern is None:
        yield
        return
    config.rank_pattern = None
    try:
        yield
    finally:
        config.rank_pattern = pattern


class AdaLoraHook(TrainHook):
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.last: dict[str, int] = {}

    def on_start(self, state: TrainState) -> None:
        self.tuner = state.model.base_model  # peft's AdaLoraModel
        self.layers = _layers(state.model)
        config = state.model.peft_config[ADAPTER]
        if state.step > 0 and not config.rank_pattern:  # resumed: the masks are Λ's exact zeros
            config.rank_pattern = {
                f"{n}.lora_E.{ADAPTER}": (m.lora_E[ADAPTER] != 0).view(-1).tolist() for n, m in self.layers.items()
            }
        self._log(state)

    def loss_term(self, state: TrainState):
        weight = self.cfg.lora.adalora_orth_reg
        return weight * orth_penalty(self.layers) if weight else None

    def after_step(self, state: TrainState) -> None:
        self.tuner.update_and_allocate(state.step)
        self._log(state)

    def _log(self, state: TrainState) -> None:
        now = ranks(state.model)
        budget, _ = self.tuner.rankallocator.budget_schedule(state.step)
        changed = {rank_metric(n): float(r) for n, r in now.items() if self.last.get(n) != r}
        metrics = {"adalora/budget": float(budget), "adalora/rank_total": float(sum(now.values())), **changed}
        if state.step % self.cfg.train.log_every == 0 or changed:
            with torch.no_grad():
                metrics["adalora/orth_reg"] = float(orth_penalty(self.layers))
            state.sink.log(state.step, metrics)
        self.last = now

    def on_end(self, state: TrainState) -> None:
        final = ranks(state.model)
        lo, n = self.cfg.lora, len(final)
        state.summary["adalora"] = {
            "init_r": lo.r,
            "target_r": lo.adalora_target_r,
            "budget_start": lo.r * n,
            "budget_target": lo.adalora_target_r * n,
            "rank_total": sum(final.values()),
            "final_ranks": final,
        }
