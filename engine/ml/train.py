"""One LoRA fine-tune, top to bottom: `train(cfg, out_dir, sink, should_stop) -> TrainResult`.

    python -m engine train examples/quickstart.yaml          # the CLI wraps this function

Phases: 1) seed, threads, device  2) tokenizer + data  3) model + LoRA  4) optimizer + schedule  5) resume
        6) loop: accumulate → clip → step → log → eval → checkpoint  7) adapter, spectra, summary

The loop knows nothing of SQLite, Gradio or subprocesses: it reports through a MetricsSink and stops
when should_stop() says so (the CLI wires that to SIGTERM), saving a checkpoint first. The same code runs
as one of N data-parallel processes under torchrun (engine.ml.distributed): every rank trains its share of
each step, only rank 0 writes (metrics, checkpoints, the adapter, spectra).
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
from engine.core.variants import MOVES_BASE
from engine.ml import checkpoint as C
from engine.ml import data as D
from engine.ml import early_stop  # noqa: F401  (registers its hook in engine.ml.hooks.FACTORIES)
from engine.ml import model as M
from engine.ml.distributed import Distributed
from engine.ml.hooks import TrainState, build_hooks
from engine.ml.resources import ThreadWatch, peak_mem_gb, pick_threads, rss_gb
from engine.ml.spectra import adapter_spectra, model_spectra
from engine.ml.steps import evaluate, fast_paths


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
    out_dir: str | Path | None,
    sink: MetricsSink = NullSink(),
    should_stop: Callable[[], bool] = lambda: False,
    *,
    resume_from: str | Path | None = None,
    home: Path | None = None,
) -> TrainResult:
    home = home or data_home()
    t_start = time.time()

    # 1) seed, threads, device: one process, or one of the N that torchrun started --------------------
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    dist = Distributed(cfg)  # accelerate; rank 0 alone writes (out_dir may be None on the other ranks)
    sink = sink if dist.main else NullSink()
    out_dir = Path(out_dir) if out_dir is not None else None
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    device = dist.device
    dtype = M.compute_dtype(cfg, device)  # refuses fp16 on a CPU before any weights are read
    threads = None  # one process on a CPU: the choice is re-checked during the run and logged
    if device.type == "cpu" and dist.local_world == 1:
        threads = ThreadWatch(cfg.train.threads)
    elif device.type == "cpu":
        dist.threads(pick_threads(cfg.train.threads))  # the machine's cores shared by its processes
    else:
        torch.cuda.reset_peak_memory_stats()
    rss_base = rss_gb()  # CPU memory is reported as growth of peak RSS over this baseline

    # 2) tokenizer and data, before any weights: a bad model path or data file fails at once --------
    ref = M.resolve_model(cfg.model, home)
    tok = M.load_tokenizer(ref, cfg.trust_remote_code)
    prep = D.prepare(cfg, tok, cache_dir=home / "cache" / "datasets")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    tr = cfg.train
    micro_per_epoch = math.ceil(len(prep.train) / tr.batch_size)
    steps_per_epoch = max(1, micro_per_epoch // (tr.grad_accum * dist.world))
    total_steps = run_steps(len(prep.train), tr, dist.world)  # a step trains world × grad_accum micro-batches

    # 3) model + LoRA -------------------------------------------------------------------------
    base = M.load_base_model(ref, cfg, device)
    modules = M.describe(base)
    model = M.attach_lora(base, cfg, modules, model_name=cfg.model, total_steps=total_steps)
    trainable, total = M.count_params(model)
    reference = None
    if cfg.lora.init in MOVES_BASE:
        # PiSSA/OLoRA change the base weight to W − B₀A₀; spectra must measure against the original W,
        # and the saved adapter is converted so that it applies to the original base.
        from engine.ml.spectra import capture_reference

        reference = capture_reference(model)
        model.peft_config["default"].init_lora_weights = True
        if dist.main:
            model.save_pretrained(out_dir / "init_adapter")
        model.peft_config["default"].init_lora_weights = cfg.lora.init
    if dist.rank:  # the same LoRA init on every rank (DDP broadcasts rank 0's anyway), its own dropout
        torch.manual_seed(cfg.train.seed + dist.rank)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32 and cfg.quant == "none")

    # 4) optimizer + schedule ----------------------------------------------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(model, params, cfg, device)
    sched = make_scheduler(opt, cfg, total_steps)

    # 5) resume -----------------------------------------------------------------------------------
    step, tokens_seen, best_val, elapsed_before, micro_start = 0, 0, None, 0.0, 0
    if resume_from:
        # verified first; a damaged newest checkpoint falls back to the one before it, saying so
        state, used, skipped = C.resume(Path(resume_from), model, opt, sched, rank=dist.rank, world=dist.world)
        step, tokens_seen = state["step"], state["tokens_seen"]
        best_val, elapsed_before = state.get("best_val_loss"), state.get("elapsed_s", 0.0)
        # the data continues where the stream stopped, whatever the number of processes was
        micro_start = state.get("micro_batches", step * tr.grad_accum)
        if state.get("world", 1) != dist.world:  # documented: the schedule continues, not bit-exact
            sink.set_summary(summary={"resumed_with_world_size": f"{state.get('world', 1)} → {dist.world}"})
        if skipped:
            sink.set_summary(summary={"resumed_from": str(used), "resume_skipped": skipped})
    est = estimate_memory(cfg, home, device, prep.facts(cfg), dist.world) if dist.main else None
    sink.set_summary(
        total_steps=total_steps, trainable_params=trainable, total_params=total, device=str(device), est_mem_gb=est
    )
    sink.set_summary(devices=dist.label, world_size=dist.world)
    sink.log(step, {"total_steps": total_steps, "train/examples": len(prep.train), "val/examples": len(prep.val)})

    # the chunked output head and packing, checked on this model (engine/ml/steps.py fast_paths); under FSDP
    # every forward goes through the wrapper: padded layout, whole logits
    paths = fast_paths(model, prep.train[: min(4, len(prep.train))], pad_id, tr.max_seq_len, device, autocast)
    fast_head = paths.head and not dist.fsdp
    packed = tr.packing and paths.packed and not dist.fsdp
    make_batch = (
        (lambda mb: D.collate_packed(mb, pad_id, tr.max_seq_len)) if packed else (lambda mb: D.collate(mb, pad_id))
    )

    # after resume: DDP starts every rank from rank 0's weights. The stream skips what was already trained.
    forward, opt = dist.prepare(model, opt)
    batches = dist.steps(prep.train, tr, start=micro_start)
    run_eval = lambda ex: evaluate(
        forward if dist.fsdp else model,
        ex,
        tr.batch_size,
        pad_id,
        device,
        autocast,
        packed,
        tr.max_seq_len,
        fast=fast_head,
        chunk=tr.loss_chunk,
    )

    def write_adapter(name: str = R.ADAPTER_DIRNAME) -> Path | None:
        weights = dist.adapter_state()  # every rank takes part (FSDP gathers); only rank 0 writes
        return C.save_adapter(model, tok, out_dir, cfg, name, weights=weights) if dist.main else None

    def write_checkpoint() -> Path | None:
        weights, rngs = dist.adapter_state(), dist.rank_rngs()
        if not dist.main:
            return None
        trained = {"micro_batches": micro_start + (step - steps_at_start) * tr.grad_accum * dist.world}
        return C.save_checkpoint(
            out_dir,
            model,
            None if dist.fsdp else opt,
            sched,
            step,
            tokens_seen,
            best_val,
            elapsed_before + time.time() - t_start,
            keep=R.KEEP_CHECKPOINTS,
            extra_state={**trained, "world": dist.world},
            rank_rngs=rngs,
            weights=weights,
        )

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
        evaluate=lambda: dist.evaluate(prep.val, run_eval),  # every rank evaluates its share
        save_adapter=write_adapter,
        spectra=lambda: model_spectra(model, reference),
        main=dist.main,
    )
    for h in hooks:
        h.on_start(state)

    # 6) the loop ---------------------------------------------------------------------------------
    model.train()
    loss_acc = torch.zeros((), device=device)  # summed on device: no host sync until a log step
    tok_window, own_window, slot_window, t_window, t_loop = 0, 0, 0, time.time(), time.time()
    steps_at_start = step
    last_loss, last_val, status, ckpt = None, None, "succeeded", None
    while step < total_steps:
        if dist.any(should_stop()):  # every rank stops at the same step
            status = "cancelled"
            break
        # this rank's micro-batches; target tokens and tokens of the whole step (all ranks), on the host
        micro, n_label, step_tokens = next(batches)
        for i, mb in enumerate(micro):
            batch = {k: v.to(device) for k, v in make_batch(mb).items()}
            with dist.sync(forward, last=i == len(micro) - 1):  # gradients all-reduced once per step
                with autocast:
                    # Sum of per-token losses / target tokens of the whole step: every token weighs the same,
                    # however the step is split into micro-batches and processes (× world: DDP averages).
                    loss = forward(batch, fast_head, tr.loss_chunk).sum() * dist.world / n_label
                    for term in (h.loss_term(state) for h in hooks):
                        if term is not None:
                            loss = loss + term / tr.grad_accum
                dist.backward(loss)
            loss_acc += loss.detach()
            slot_window += batch["input_ids"].numel()
            own_window += sum(len(e.input_ids) for e in mb)
        tokens_seen += step_tokens
        tok_window += step_tokens
        grad_norm = dist.clip(params, tr.max_grad_norm if tr.max_grad_norm > 0 else float("inf"))
        opt.step()
        sched.step()
        step += 1
        state.step = step
        for h in hooks:
            h.after_step(state)  # with the step's gradients (AdaLoRA's allocator reads them)
        opt.zero_grad(set_to_none=True)

        if step % tr.log_every == 0 or step == total_steps:
            last_loss, gn = float(dist.mean(loss_acc)), float(grad_norm)  # the one host sync of the step
            if not (math.isfinite(last_loss) and math.isfinite(gn)):
                raise TrainingDiverged(
                    f"loss became {last_loss} (grad norm {gn}) at step {step}; lower train.lr "
                    f"(now {tr.lr}) or raise warmup_steps, or use dtype fp32"
                )
            now = time.time()
            rate = (step - steps_at_start) / max(1e-9, now - t_loop)
            ranks = dist.rates(own_window, now - t_window) if dist.world > 1 else []  # per-rank throughput
            sink.log(
                step,
                {
                    "train/loss": last_loss,
                    "lr": sched.get_last_lr()[0],
                    "grad_norm": gn,
                    "tokens_per_s": tok_window / max(1e-9, now - t_window),
                    "tokens_seen": tokens_seen,
                    "pad_frac": 1.0 - own_window / max(1, slot_window),  # rank 0's micro-batches
                    "epoch": step / steps_per_epoch,
                    "elapsed_s": elapsed_before + now - t_start,
                    "eta_s": (total_steps - step) / max(rate, 1e-9),
                    "total_steps": total_steps,
                    "mem/peak_gb": peak_mem_gb(device, rss_base),
                    **{f"rank{r}/tokens_per_s": v for r, v in enumerate(ranks)},
                },
            )
            tok_window, own_window, slot_window, t_window = 0, 0, 0, now
        loss_acc.zero_()

        if prep.val and (step % tr.eval_every == 0 or step == total_steps):
            last_val = state.evaluate()
            best_val = last_val if best_val is None else min(best_val, last_val)
            sink.log(step, {"val/loss": last_val})
            for h in hooks:
                h.after_eval(state, last_val)
        if tr.save_every and step % tr.save_every == 0 and step < total_steps:
            ckpt = write_checkpoint()
            if dist.main:  # how the spectrum evolves, checkpoint by checkpoint
                log_spectra(sink, step, adapter_spectra(ckpt) if dist.fsdp else state.spectra())
            sink.log(step, {"checkpoint": step})
        if dist.any(state.stop_reason is not None):  # a hook ended the run (e.g. early stopping): saved below
            break

    # 7) adapter, spectra, summary ---------------------------------------------------------------------
    for h in hooks:
        h.on_end(state)
    ckpt = write_checkpoint()
    adapter_dir = state.save_adapter(R.ADAPTER_DIRNAME)
    elapsed = elapsed_before + time.time() - t_start
    extra = {
        **prep.stats(),
        "train_examples": len(prep.train),
        "val_examples": len(prep.val),
        "data_fingerprint": prep.fingerprint,
        "packing": packed,
        "chunked_loss": fast_head,
        **({"stopped": state.stop_reason} if state.stop_reason else {}),
        **state.summary,
    }
    if dist.main:  # FSDP: the live LoRA is sharded, so σ(ΔW) comes from the folder rank 0 just wrote
        log_spectra(sink, step, adapter_spectra(adapter_dir) if dist.fsdp else state.spectra())
    dist.barrier()  # the other ranks wait for rank 0's files before they leave the process group
    dist.end()
    result = TrainResult(
        status,
        step,
        total_steps,
        str(adapter_dir or ""),
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
        adapter_dir=str(adapter_dir or ""),
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


def log_spectra(sink: MetricsSink, step: int, spectra) -> None:
    sink.log_spectra(step, {k: v.sigma for k, v in spectra.items()}, {k: v.to_stats() for k, v in spectra.items()})


def estimate_memory(
    cfg: RunConfig, home: Path, device: torch.device, facts: DataFacts | None = None, world: int = 1
) -> float | None:
    """The calculator's estimate for this run (GiB per device), stored beside the measured peak (rank 0's); with
    `facts` (the prepared training split's token counts) sized on the micro-batches this run really builds.

    On CPU the measured figure is the growth of peak RSS over the process baseline, so the estimate's
    fixed runtime overhead (already in the baseline) is left out; on GPU it is max_memory_allocated,
    which does not see the CUDA context either.
    """
    from engine.core import estimate as E
    from engine.core.devices import per_device_bytes

    anatomy = M.inspect_model(cfg.model, home, trust_remote_code=cfg.trust_remote_code)
    est = E.estimate(anatomy, cfg, device=device.type, bf16_capable=M.bf16_capable(device), data=facts)
    layers = anatomy.get("num_layers")
    return E.gb(per_device_bytes(est, cfg.train.strategy, world, layers, base=est.allocated_bytes))


# ---- saving and resuming ------------------------------------------------------------------------
