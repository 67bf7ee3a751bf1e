"""The LoRA variants the seed papers describe beside plain LoRA, as rules: AdaLoRA (learned rank allocation),
VeRA (shared frozen random matrices, trainable scaling vectors), LoftQ (quantization-aware initialisation)
and ReLoRA (high-rank training by repeated merges). Stdlib only: the web server imports this module.

    problems(cfg)                  # every combination that cannot work, one line each (config.validate calls it)
    counts(chosen, cfg.lora)       # exact adapter parameter counts per method, equal to peft's own
    adalora_budget(cfg.lora, n)    # AdaLoRA's rank budget: (at the start, at the end)

What each variant is, in the words of the seed texts, is in HELP: the config's help texts (the Train form's
info= texts and the README config table) come from here, so the rules and their explanation stay together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

METHODS = ("lora", "adalora", "vera")
# Inits that move the base weights to W − B₀A₀ (the trainer measures and saves against the original W).
MOVES_BASE = ("pissa", "olora")

HELP = {
    "method": (
        'The shape of the update. lora: ΔW = (α/r)·B·A. adalora (AdaLoRA): ΔW = P·Λ·Q in SVD form; it "dynamically '
        'allocates the parameter budget to weight matrices based on importance scores", pruning singular values '
        'during training, and "always prefers allocating more budget to FFNs and top layers" (lora.r = the rank '
        "each module starts with). vera (VeRA): one pair of frozen random matrices shared by every layer, and "
        "trainable scaling vectors per module: ΔW = Λ_b·B·Λ_d·A, r + d_out trainable numbers per module; take r "
        "much higher than for LoRA (e.g. 256) and a higher lr (VeRA's tables use ~10× LoRA's)."
    ),
    "adalora_target_r": (
        "AdaLoRA: the average rank per module at the end; the final budget is target_r × modules singular values, "
        "shared out by importance (the rank each module starts with is lora.r)."
    ),
    "adalora_tinit": (
        "AdaLoRA: steps of warm-up before any pruning (t_i), so that the adapters hold information before ranks are "
        "cut; the budget then falls on a cubic schedule."
    ),
    "adalora_tfinal": (
        "AdaLoRA: the last steps (t_f) train with the final allocation fixed; the budget reaches its target at "
        "total steps − t_f."
    ),
    "adalora_delta_t": "AdaLoRA: re-allocate the budget every ΔT steps (the paper uses 10–100; 1 = every step).",
    "adalora_orth_reg": (
        "AdaLoRA: weight γ of the penalty R(P, Q) = ‖PᵀP − I‖_F + ‖QQᵀ − I‖_F that keeps P and Q orthogonal, "
        '"avoiding extensive SVD computations and stabilizing the training" (train/loss includes it).'
    ),
    "init_loftq": (
        "loftq (4-bit only): A, B from the SVD of the NF4 quantization error W − Q(W), so that Q(W) + ΔW starts "
        "close to W (LoftQ applies quantization and LoRA fine-tuning together)."
    ),
    "vera_d_initial": "VeRA: initial value of the scaling vector Λ_d; small values (≤ 0.1) are recommended.",
    "relora_every": (
        "ReLoRA (0 = off): every N optimizer steps merge ΔW into the base, re-initialise A and B and continue, so "
        'that "iteratively applying low-rank updates" trains a high-rank ΔW (the run keeps the cumulative ΔW; '
        "the saved adapter holds all of it, rank up to r × cycles). Not for quantized bases."
    ),
    "relora_reset": (
        "ReLoRA: at each restart, the fraction of the optimizer's moments of A and B pruned by magnitude "
        "(the paper's partial reset prunes 99 %; 1 = a full reset)."
    ),
    "relora_warmup": "ReLoRA: steps of linear re-warm-up of the learning rate after each restart (the jagged schedule).",
}


def _shown(value: Any) -> str:
    return repr(value) if not isinstance(value, str) or len(value) < 60 else repr(value[:60] + "…")


def problems(cfg: Any) -> list[str]:
    """Every variant setting of a RunConfig that cannot work, one line each (field, value, the fix)."""
    lo, tr, out = cfg.lora, cfg.train, []
    if lo.method not in METHODS:
        out.append(f"lora.method = {_shown(lo.method)}: must be one of {', '.join(METHODS)}")
    if lo.method in ("adalora", "vera"):
        name = {"adalora": "AdaLoRA", "vera": "VeRA"}[lo.method]
        clash = [
            ("lora.use_dora", lo.use_dora),
            ("lora.freeze_A (LoRA-FA)", lo.freeze_A),
            ("lora.use_rslora", lo.use_rslora),
            ("lora.loraplus_lr_ratio (LoRA+)", lo.loraplus_lr_ratio != 0),
            (f"lora.init = {lo.init!r}", lo.init != "gaussian"),
            ("train.relora_every (ReLoRA)", tr.relora_every != 0),
        ]
        for what, on in clash:
            if on:
                out.append(f"{what} with lora.method = {lo.method!r}: {name} has its own parametrisation; turn one off")
    if lo.method == "adalora":
        out.extend(_adalora_problems(lo, tr))
    if lo.method == "vera" and not (math.isfinite(lo.vera_d_initial) and 0 < lo.vera_d_initial <= 1):
        out.append(f"lora.vera_d_initial = {lo.vera_d_initial!r}: must be in (0, 1] (VeRA recommends ≤ 0.1)")
    if lo.init == "loftq":
        if cfg.quant != "4bit":
            out.append(
                f"lora.init = 'loftq' with quant = {cfg.quant!r}: LoftQ initialises LoRA against the 4-bit NF4 "
                "quantization error; use quant 4bit (or init gaussian)"
            )
        if lo.use_dora:
            out.append("lora.init = 'loftq' with lora.use_dora: LoftQ sets A and B only; turn DoRA off")
    out.extend(_relora_problems(cfg))
    return out


def _adalora_problems(lo: Any, tr: Any) -> list[str]:
    out = []
    if not 1 <= lo.adalora_target_r <= lo.r:
        out.append(
            f"lora.adalora_target_r = {lo.adalora_target_r!r}: must be 1 to lora.r = {lo.r} (the rank modules start with)"
        )
    for name in ("adalora_tinit", "adalora_tfinal"):
        if getattr(lo, name) < 0:
            out.append(f"lora.{name} = {getattr(lo, name)!r}: must be ≥ 0 steps")
    if lo.adalora_delta_t < 1:
        out.append(f"lora.adalora_delta_t = {lo.adalora_delta_t!r}: must be ≥ 1 step")
    if not (math.isfinite(lo.adalora_orth_reg) and lo.adalora_orth_reg >= 0):
        out.append(f"lora.adalora_orth_reg = {lo.adalora_orth_reg!r}: must be ≥ 0 (peft's default 0.5)")
    if tr.max_steps and lo.adalora_tinit + lo.adalora_tfinal >= tr.max_steps:
        out.append(
            f"lora.adalora_tinit + lora.adalora_tfinal = {lo.adalora_tinit + lo.adalora_tfinal} with train.max_steps = "
            f"{tr.max_steps}: no steps are left to allocate the budget; lower them or train longer"
        )
    return out


def _relora_problems(cfg: Any) -> list[str]:
    lo, tr, out = cfg.lora, cfg.train, []
    if tr.relora_every < 0:
        out.append(f"train.relora_every = {tr.relora_every!r}: must be ≥ 0 (0 = off)")
    if not (math.isfinite(tr.relora_reset) and 0 <= tr.relora_reset <= 1):
        out.append(f"train.relora_reset = {tr.relora_reset!r}: must be in [0, 1] (the paper prunes 0.99)")
    if tr.relora_warmup < 0:
        out.append(f"train.relora_warmup = {tr.relora_warmup!r}: must be ≥ 0 steps")
    if tr.relora_every <= 0:
        return out
    if tr.relora_every < 2 or tr.relora_warmup >= tr.relora_every:
        out.append(
            f"train.relora_every = {tr.relora_every} with train.relora_warmup = {tr.relora_warmup}: a cycle must be "
            "≥ 2 steps and longer than its re-warm-up"
        )
    if cfg.quant != "none":
        out.append(
            f"train.relora_every with quant = {cfg.quant!r}: ReLoRA merges ΔW into the base weights, which a "
            "quantized base cannot hold exactly; use quant none"
        )
    for what, on in (
        ("lora.use_dora", lo.use_dora),
        ("lora.freeze_A (LoRA-FA)", lo.freeze_A),
        (f"lora.init = {lo.init!r}", lo.init != "gaussian"),
    ):
        if on:
            out.append(f"train.relora_every with {what}: ReLoRA restarts plain LoRA (A random, B = 0); turn one off")
    return out


# ---- parameter counts ------------------------------------------------------------------------------


def counts(chosen: Sequence[Mapping[str, Any]], lo: Any) -> dict[str, Any]:
    """Exact parameter counts of the adapter on the `chosen` anatomy modules, as peft counts them.

    lora: A (r × in) + B (out × r) per module, + a DoRA magnitude (out); LoRA-FA trains B only.
    adalora: P (r × in), Λ (r × 1) and Q (out × r) per module at the initial rank r, all trainable (peft
      masks pruned singular values rather than resizing), + one frozen `ranknum` per module in the total.
    vera: Λ_d (r) + Λ_b (out) trainable per module; the shared A (r × max in) and B (max out × r) are
      buffers: not parameters, but saved in the adapter file.
    Returns adapter_params (trainable + frozen adapter parameters), trainable, frozen (in the total only),
    file_params (numbers in adapter_model.safetensors) and suffixes (the per-module tensor key suffixes).
    """
    r = lo.r
    ins, outs = sum(m["in"] for m in chosen), sum(m["out"] for m in chosen)
    if lo.method == "adalora":
        params = r * (ins + outs) + r * len(chosen)
        return dict(
            adapter_params=params,
            trainable=params,
            frozen=len(chosen),
            file_params=params,
            suffixes=(".lora_A", ".lora_B", ".lora_E"),
            shared={},
        )
    if lo.method == "vera":
        params = r * len(chosen) + outs
        max_in = max((m["in"] for m in chosen), default=0)
        max_out = max((m["out"] for m in chosen), default=0)
        shared = {"base_model.vera_A": r * max_in, "base_model.vera_B": max_out * r}
        return dict(
            adapter_params=params,
            trainable=params,
            frozen=0,
            file_params=params + sum(shared.values()),
            suffixes=(".vera_lambda_b", ".vera_lambda_d"),
            shared=shared,
        )
    lora_A = r * ins
    params = lora_A + r * outs + (outs if lo.use_dora else 0)
    return dict(
        adapter_params=params,
        trainable=params - (lora_A if lo.freeze_A else 0),
        frozen=0,
        file_params=params,
        suffixes=(".lora_A.weight", ".lora_B.weight") + ((".lora_magnitude_vector",) if lo.use_dora else ()),
        shared={},
    )


def adalora_budget(lo: Any, n_modules: int) -> tuple[int, int]:
    """AdaLoRA's total rank budget (singular values kept over all modules): at the start and at the end."""
    return lo.r * n_modules, lo.adalora_target_r * n_modules
