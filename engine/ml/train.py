"""One LoRA fine-tune, top to bottom: `train(cfg, out_dir, sink, should_stop) -> TrainResult`.

    python -m engine train examples/quickstart.yaml          # the CLI wraps this function

Phases: 1) seed, threads, device  2) tokenizer + data  3) model + LoRA  4) optimizer + schedule  5) resume
        6) loop: accumulate → clip → step → log → eval → checkpoint  7) adapter, spectra, summary

The loop knows nothing of SQLite, Gradio or subprocesses: it reports through a MetricsSink and stops
when should_stop() says so (the CLI wires that to SIGTERM), saving a checkpoint first.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.core import runs as R
from engine.core.batching import DataFacts
from engine.core.batching import total_steps as run_steps
from engine.core.config import RunConfig
from engine.core.events import MetricsSink, NullSink
from engine.core.home import data_home
from engine.ml import checkpoint as C
from engine.ml import data as D
from engine.ml import model as M
from engine.ml.hooks import TrainState, build_hooks
from engine.ml.resources import ThreadWatch, peak_mem_gb, rss_gb
from engine.ml.steps import evaluate, fast_paths, token_losses


class TrainingDiverged(RuntimeError):
    """Loss or gradient became NaN/inf."""


@dataclass
class TrainResult:
    status: str  # succeeded | cancelled
    steps_done: int
    total_steps: int
    adapter_dir: str
    checkpoint_dir: str | None
    final_loss: float | None
    best_val_loss: float | None
    final_val_loss: float | None
    tokens_seen: int
    duration_s: float
    peak_mem_gb: float
    trainable_params: int
    total_params: int
    device: str
    extra: dict[str, Any] = field(default_factory=dict)


# transformers' schedules (the same curves as Trainer): linear warmup from 0 over warmup_steps, then
# cosine down to 10 % of the peak, linear down to 0, or constant.
SCHEDULES = {
    "cosine": ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
    "linear": ("linear", {}),
    "constant": ("constant_with_warmup", {}),
}


def make_scheduler(opt, cfg: RunConfig, total_steps: int):
    """The learning-rate schedule of cfg.train as a torch LambdaLR from transformers.get_scheduler."""
    from transformers import get_scheduler

    name, kwargs = SCHEDULES[cfg.train.scheduler]
    return get_scheduler(
        name,
        opt,
        num_warmup_steps=cfg.train.warmup_steps,
        num_training_steps=total_steps,
        scheduler_specific_kwargs=kwargs or None,
    )


def train(
    cfg: RunConfig,
    out_dir: str | Path,
    sink: MetricsSink = NullSink(),
    should_stop: Callable[[], bool] = lambda: False,
    *,
    resume_from: str | Path | None = None,
    home: Path | None = None,
) -> TrainResult:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    home = home or data_home()
    t_start = time.time()

    # 1) seed, threads, device ------------------------------------------------------------------
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    device = M.pick_device()
    dtype = M.compute_dtype(cfg, device)  # refuses fp16 on a CPU before any weights are read
    threads = ThreadWatch(cfg.train.threads) if device.type == "cpu" else None  # re-checked during the run
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_base = rss_gb()  # CPU memory is reported as growth of peak RSS over this baseline

    # 2) tokenizer and data, before any weights: a bad model path or data file fails at once --------
    ref = M.resolve_model(cfg.model, home)
    tok = M.load_tokenizer(ref, cfg.trust_remote_code)
    prep = D.prepare(cfg, tok, cache_dir=home / "cache" / "datasets")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    tr = cfg.train
    micro_per_epoch = math.ceil(len(prep.train) / tr.batch_size)
    steps_per_epoch = max(1, micro_per_epoch // tr.grad_accum)
    total_steps = run_steps(len(prep.train), tr)

    # 3) model + LoRA -------------------------------------------------------------------------
    base = M.load_base_model(ref, cfg, device)
    modules = M.describe(base)
    model = M.attach_lora(base, cfg, modules, model_name=cfg.model)
    trainable, total = M.count_params(model)
    reference = None
    if cfg.lora.init != "gaussian":
        # PiSSA/OLoRA change the base weight to W − B₀A₀; spectra must measure against the original W,
        # and the saved adapter is converted so that it applies to the original base.
        from engine.ml.spectra import capture_reference

        reference = capture_reference(model)
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(out_dir / "init_adapter")
        model.peft_config["default"].init_lora_weights = cfg.lora.init
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32 and cfg.quant == "none")

    # 4) optimizer + schedule ----------------------------------------------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(model, params, cfg, device)
    sched = make_scheduler(opt, cfg, total_steps)

    # 5) resume -----------------------------------------------------------------------------------
    step, tokens_seen, best_val, elapsed_before = 0, 0, None, 0.0
    if resume_from:
        # verified first; a damaged newest checkpoint falls back to the one before it, saying so
        state, used, skipped = C.resume(Path(resume_from), model, opt, sched)
        step, tokens_seen = state["step"], state["tokens_seen"]
        best_val, elapsed_before = state.get("best_val_loss"), state.get("elapsed_s", 0.0)
        if skipped:
            sink.set_summary(summary={"resumed_from": str(used), "resume_skipped": skipped})
    est = estimate_memory(cfg, home, device, prep.facts(cfg))
    sink.set_summary(
        total_steps=total_steps, trainable_params=trainable, total_params=total, device=str(device), est_mem_gb=est
    )
    sink.log(step, {"total_steps": total_steps, "train/examples": len(prep.train), "val/examples": len(prep.val)})

    # the chunked output head and packing, checked on this model (engine/ml/steps.py fast_paths)
    paths = fast_paths(model, prep.train[: min(4, len(prep.train))], pad_id, tr.max_seq_len, device, autocast)
    packed = tr.packing and paths.packed
    make_batch = (
        (lambda mb: D.collate_packed(mb, pad_id, tr.max_seq_len)) if packed else (lambda mb: D.collate(mb, pad_id))
    )

    batches = D.micro_batches(len(prep.train), tr.batch_size, tr.seed)
    for _ in range(step * tr.grad_accum):  # skip what was already trained; the order is a pure function
        next(batches)
    hooks = build_hooks(cfg) + ([threads] if threads else [])
    state = TrainState(
        cfg,
        model,
        opt,
        sched,
        tok,
        prep,
        out_dir,
        sink,
        device,
        total_steps,
        step=step,
        evaluate=lambda: evaluate(
            model,
            prep.val,
            tr.batch_size,
            pad_id,
            device,
            autocast,
            packed,
            tr.max_seq_len,
            fast=paths.head,
            chunk=tr.loss_chunk,
        ),
        save_adapter=lambda name: C.save_adapter(model, tok, out_dir, cfg, name),
    )
    for h in hooks:
        h.on_start(state)

    # 6) the loop ---------------------------------------------------------------------------------
    model.train()
    loss_acc = torch.zeros((), device=device)  # summed on device: no host sync until a log step
    tok_window, slot_window, t_window, t_loop = 0, 0, time.time(), time.time()
    steps_at_start = step
    last_loss, last_val, status, ckpt = None, None, "succeeded", None
    while step < total_steps:
        if should_stop():
            status = "cancelled"
            break
        micro = [[prep.train[i] for i in next(batches)] for _ in range(tr.grad_accum)]
        step_slots = 0
        n_label = sum(e.n_label_tokens for mb in micro for e in mb)  # normalise over the whole step
        for mb in micro:
            batch = {k: v.to(device) for k, v in make_batch(mb).items()}
            with autocast:
                # Sum of per-token losses / target tokens of the whole step: every token weighs the same,
                # however the step's examples are split into micro-batches.
                loss = token_losses(model, batch, fast=paths.head, chunk=tr.loss_chunk).sum() / n_label
                for term in (h.loss_term(state) for h in hooks):
                    if term is not None:
                        loss = loss + term / tr.grad_accum
            loss.backward()
            loss_acc += loss.detach()
            step_slots += batch["input_ids"].numel()
        step_tokens = sum(len(e.input_ids) for mb in micro for e in mb)  # counted on the host: no sync
        tokens_seen += step_tokens
        tok_window += step_tokens
        slot_window += step_slots
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tr.max_grad_norm if tr.max_grad_norm > 0 else float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        state.step = step
        for h in hooks:
            h.after_step(state)

        if step % tr.log_every == 0 or step == total_steps:
            last_loss, gn = float(loss_acc), float(grad_norm)  # the one host sync of the step
            if not (math.isfinite(last_loss) and math.isfinite(gn)):
                raise TrainingDiverged(
                    f"loss became {last_loss} (grad norm {gn}) at step {step}; lower train.lr "
                    f"(now {tr.lr}) or raise warmup_steps, or use dtype fp32"
                )
            now = time.time()
            rate = (step - steps_at_start) / max(1e-9, now - t_loop)
            sink.log(
                step,
                {
                    "train/loss": last_loss,
                    "lr": sched.get_last_lr()[0],
                    "grad_norm": gn,
                    "tokens_per_s": tok_window / max(1e-9, now - t_window),
                    "tokens_seen": tokens_seen,
                    "pad_frac": 1.0 - tok_window / max(1, slot_window),
                    "epoch": step / steps_per_epoch,
                    "elapsed_s": elapsed_before + now - t_start,
                    "eta_s": (total_steps - step) / max(rate, 1e-9),
                    "total_steps": total_steps,
                    "mem/peak_gb": peak_mem_gb(device, rss_base),
                },
            )
            tok_window, slot_window, t_window = 0, 0, now
        loss_acc.zero_()

        if prep.val and (step % tr.eval_every == 0 or step == total_steps):
            last_val = state.evaluate()
            best_val = last_val if best_val is None else min(best_val, last_val)
            sink.log(step, {"val/loss": last_val})
            for h in hooks:
                h.after_eval(state, last_val)
        if tr.save_every and step % tr.save_every == 0 and step < total_steps:
            ckpt = C.save_checkpoint(
                out_dir,
                model,
                opt,
                sched,
                step,
                tokens_seen,
                best_val,
                elapsed_before + time.time() - t_start,
                keep=R.KEEP_CHECKPOINTS,
            )
            log_spectra(sink, step, model, reference)  # how the spectrum evolves, checkpoint by checkpoint
            sink.log(step, {"checkpoint": step})
        if state.stop_reason:  # a hook ended the run (e.g. early stopping): saved below like any ending
            break

    # 7) adapter, spectra, summary ---------------------------------------------------------------------
    for h in hooks:
        h.on_end(state)
    elapsed = elapsed_before + time.time() - t_start
    ckpt = C.save_checkpoint(out_dir, model, opt, sched, step, tokens_seen, best_val, elapsed, keep=R.KEEP_CHECKPOINTS)
    adapter_dir = C.save_adapter(model, tok, out_dir, cfg)
    extra = {
        **prep.stats(),
        "train_examples": len(prep.train),
        "val_examples": len(prep.val),
        "data_fingerprint": prep.fingerprint,
        "packing": packed,
        "chunked_loss": paths.head,
        **({"stopped": state.stop_reason} if state.stop_reason else {}),
        **state.summary,
    }
    log_spectra(sink, step, model, reference)
    result = TrainResult(
        status,
        step,
        total_steps,
        str(adapter_dir),
        str(ckpt) if ckpt else None,
        last_loss,
        best_val,
        last_val,
        tokens_seen,
        elapsed,
        peak_mem_gb(device, rss_base),
        trainable,
        total,
        str(device),
        extra,
    )
    sink.set_summary(
        final_loss=last_loss,
        best_val_loss=best_val,
        final_val_loss=last_val,
        steps_done=step,
        tokens_seen=tokens_seen,
        duration_s=elapsed,
        peak_mem_gb=result.peak_mem_gb,
        adapter_dir=str(adapter_dir),
        summary=extra,
    )
    return result


def make_optimizer(model, params, cfg: RunConfig, device: torch.device):
    """AdamW over the trainable parameters; LoRA-FA and LoRA+ through peft's own optimizer builders."""
    tr = cfg.train
    if cfg.lora.freeze_A:
        from peft.optimizers import create_lorafa_optimizer

        return create_lorafa_optimizer(
            model, r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lr=tr.lr, weight_decay=tr.weight_decay
        )
    if cfg.lora.loraplus_lr_ratio:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(
            model,
            torch.optim.AdamW,
            lr=tr.lr,
            loraplus_lr_ratio=cfg.lora.loraplus_lr_ratio,
            weight_decay=tr.weight_decay,
        )
    return torch.optim.AdamW(params, lr=tr.lr, weight_decay=tr.weight_decay, fused=device.type == "cuda")


def log_spectra(sink: MetricsSink, step: int, model, reference) -> None:
    from engine.ml.spectra import model_spectra

    spectra = model_spectra(model, reference)
    sink.log_spectra(step, {k: v.sigma for k, v in spectra.items()}, {k: v.to_stats() for k, v in spectra.items()})


def estimate_memory(cfg: RunConfig, home: Path, device: torch.device, facts: DataFacts | None = None) -> float | None:
    """The calculator's estimate for this run (GiB), stored beside the measured peak; with `facts` (the
    prepared training split's token counts) sized on the micro-batches this run really builds.

    On CPU the measured figure is the growth of peak RSS over the process baseline, so the estimate's
    fixed runtime overhead (already in the baseline) is left out; on GPU it is max_memory_allocated,
    which does not see the CUDA context either.
    """
    from engine.core import estimate as E

    anatomy = M.inspect_model(cfg.model, home, trust_remote_code=cfg.trust_remote_code)
    est = E.estimate(anatomy, cfg, device=device.type, bf16_capable=M.bf16_capable(device), data=facts)
    return E.gb(est.allocated_bytes)


# ---- saving and resuming ------------------------------------------------------------------------
