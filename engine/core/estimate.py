"""Parameter count and training-memory estimate for a LoRA run, from a model's anatomy; stdlib only.

    anatomy = inspect_model(cfg.model, home)      # or `python -m engine inspect MODEL --json`
    est = estimate(anatomy, cfg, device="cuda")   # pure, well under 1 ms
    est.trainable_params, gb(est.total_bytes)     # exact count; memory in GiB
    est.table_rows()                              # (label, bytes, note) for the UI
    fits(est), suggestions(anatomy, cfg, est, budget_gb=8)

Every memory term is kept separate so that it can be checked against a measurement
(bench/memory_accuracy.py); engine.core.memory computes each one and says what in the trainer it follows.
"GB" here means GiB (2**30 bytes), as torch and nvidia-smi report memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

from engine.core import variants as V
from engine.core.anatomy import resolve_dtype, resolve_targets
from engine.core.batching import DataFacts, packing_check_shape, run_batch_shapes
from engine.core.config import ConfigError, RunConfig, TrainSpec
from engine.core.memory import (
    ADAM_STATES,
    ADAPTER_KEY_PREFIX,
    CPU_FRAMEWORK_BYTES,
    CPU_HEAP_KEPT_FRACTION,
    CPU_HEAP_KEPT_FRACTION_CHECKPOINTED,
    CPU_RUNTIME_BYTES,
    CUDA_CONTEXT_BYTES,
    DTYPE_BYTES,
    FILE_DTYPE_BYTES,
    FP32,
    GIB,
    PACKING_CHECK_EXAMPLES,
    PACKING_CHECK_TARGETS,
    SAFETENSORS_ENTRY_OVERHEAD,
    SAFETENSORS_FILE_OVERHEAD,
    Shape,
    activations,
    gb,
    int8_bytes,
    linear_weights,
    logits,
    loss_chunk_rows,
    nf4_bytes,
    packing_check,
    workspace,
)

__all__ = [
    "CPU_FRAMEWORK_BYTES",
    "CPU_HEAP_KEPT_FRACTION_CHECKPOINTED",
    "CPU_RUNTIME_BYTES",
    "CUDA_CONTEXT_BYTES",
    "GIB",
    "Estimate",
    "estimate",
    "fits",
    "gb",
    "int8_bytes",
    "nf4_bytes",
    "suggestions",
]


# ---- the result --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """Parameter counts and a per-term memory estimate (bytes) of one training configuration."""

    model: str
    device: str  # cuda | cpu
    compute_dtype: str  # fp32 | bf16 | fp16 (after resolving auto)
    activation_dtype: str  # what the saved activations are stored in
    quant: str
    n_modules: int  # modules that get LoRA
    # parameters
    base_params: int  # the base model, tied weights once
    lora_params: int  # every adapter weight: A, B (and DoRA magnitudes)
    trainable_params: int  # lora_params minus A under LoRA-FA
    total_params: int  # base + LoRA, as peft's get_nb_trainable_parameters counts all
    trainable_pct: float
    adapter_file_bytes: int  # adapter_model.safetensors, fp32
    # memory, bytes
    base_linear_bytes: int  # the linear layers' weights as stored (full dtype, int8 + scales, NF4 + absmax)
    base_other_bytes: int  # embeddings, norms, lm_head, biases (buffers like RoPE tables not counted)
    lora_bytes: int  # LoRA weights (fp32)
    grad_bytes: int  # fp32 gradients of the trainable parameters
    optimizer_bytes: int  # AdamW states
    activation_bytes: int  # tensors autograd keeps for backward at the end of the forward pass
    recompute_bytes: int  # gradient checkpointing: the one block recomputed in backward (in activation_bytes)
    logits_bytes: int  # the loss's peak: one chunk of (chunk × vocab) logits + the targets' hidden states
    workspace_bytes: int  # transient buffers of one layer's backward (gradients, dequantised weight)
    startup_bytes: int  # what the start-up packing check needs beyond the training step (often 0)
    framework_bytes: int  # CPU: libraries and tokenizer loaded after the trainer's RSS baseline; 0 on CUDA
    allocator_bytes: int  # CPU: freed heap memory glibc keeps resident (see CPU_HEAP_KEPT_FRACTION); 0 on CUDA
    mapped_file_bytes: int  # CPU + quantization: the checkpoint's linear layers left mapped and resident
    overhead_bytes: int  # CUDA context or CPU runtime (outside the trainer's measured peak)
    n_targets: int  # N: positions the logits are computed for (worst case unless target_frac or data)
    activation_terms: tuple[tuple[str, int], ...]  # activation_bytes split by what keeps it
    assumptions: tuple[str, ...]
    basis: str = "worst case"  # 'dataset': sized on the largest micro-batch of the data; 'worst case': B × T
    batch_note: str = ""  # the micro-batch the estimate is for, in words
    loss_chunk: int = 0  # positions whose logits are computed at once (engine.core.memory.loss_chunk_rows)

    @property
    def weights_bytes(self) -> int:
        return self.base_linear_bytes + self.base_other_bytes

    @property
    def peak_moment(self) -> str:
        """When a training step peaks: 'loss' (start of backward: every kept activation plus the loss's
        N × vocab tensors) or 'block' (the last block's backward: the loss's tensors are freed, the
        gradients, the backward workspace and, with checkpointing, the recomputed block are alive)."""
        at_block = self.recompute_bytes + self.grad_bytes + self.workspace_bytes
        return "loss" if self.logits_bytes >= at_block else "block"

    @property
    def allocated_bytes(self) -> int:
        """What the trainer records as its peak (peak_mem_gb): everything but the fixed overhead.

        On CUDA that is torch.cuda.max_memory_allocated(); on CPU the growth of peak RSS over the
        baseline the trainer takes after importing torch, which also holds framework_bytes.
        The terms of the two moments of peak_moment are not added: only the larger moment counts.
        """
        at_block = self.recompute_bytes + self.grad_bytes + self.workspace_bytes
        return (
            self.weights_bytes
            + self.lora_bytes
            + self.optimizer_bytes
            + self.activation_bytes
            - self.recompute_bytes
            + max(self.logits_bytes, at_block)
            + self.startup_bytes
            + self.framework_bytes
            + self.allocator_bytes
            + self.mapped_file_bytes
        )

    @property
    def tensor_bytes(self) -> int:
        """The peak of live tensor bytes alone (what max_memory_allocated counts, on any device)."""
        return self.allocated_bytes - self.framework_bytes - self.allocator_bytes - self.mapped_file_bytes

    @property
    def total_bytes(self) -> int:
        return self.allocated_bytes + self.overhead_bytes

    @property
    def total_gb(self) -> float:
        return gb(self.total_bytes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["activation_terms"] = dict(self.activation_terms)
        d["assumptions"] = list(self.assumptions)
        d.update(
            weights_bytes=self.weights_bytes,
            allocated_bytes=self.allocated_bytes,
            total_bytes=self.total_bytes,
            total_gb=round(self.total_gb, 3),
            peak_moment=self.peak_moment,
        )
        return d

    def table_rows(self) -> list[tuple[str, int, str]]:
        """(label, bytes, note) per term, then the total, for the UI's breakdown table.

        The bytes are what is alive at the peak (peak_moment), so they add up to the total; a term that
        exists only at the other moment is listed with 0 bytes and its size in the note.
        """
        q = {
            "none": f"{self.compute_dtype}",
            "8bit": "int8 + fp32 row scales (LLM.int8)",
            "4bit": "NF4 + double-quantised absmax (QLoRA)",
        }[self.quant]
        other_dtype = "fp32 (peft upcasts them for k-bit training)" if self.quant != "none" else self.compute_dtype
        act = ", ".join(f"{k} {gb(v):.2f}" for k, v in self.activation_terms if v)
        recomputed = "; without the recomputed block" if self.recompute_bytes else ""
        rows = [
            ("base weights: linear layers", self.base_linear_bytes, q),
            ("base weights: embeddings, norms, head", self.base_other_bytes, other_dtype),
            ("LoRA weights", self.lora_bytes, f"{self.lora_params:,} params, fp32"),
            ("optimizer states", self.optimizer_bytes, "AdamW: exp_avg + exp_avg_sq, fp32"),
            (
                "activations",
                self.activation_bytes - self.recompute_bytes,
                f"{self.activation_dtype}; GB: {act}{recomputed}",
            ),
            *self._moment_rows(),
        ]
        extras = [
            (
                "start-up packing check (extra)",
                self.startup_bytes,
                f"no-grad forward of {PACKING_CHECK_EXAMPLES} examples cut to {PACKING_CHECK_TARGETS} targets: above the step",
            ),
            (
                "libraries loaded during the run",
                self.framework_bytes,
                "transformers model code, peft, tokenizer: in the CPU RSS growth",
            ),
            (
                "checkpoint pages left mapped (CPU)",
                self.mapped_file_bytes,
                "the linear layers as stored in the file, resident beside their quantized copies",
            ),
            (
                "freed memory malloc keeps (CPU)",
                self.allocator_bytes,
                "glibc's heap keeps freed activations and temporaries resident: ≈ the activations once more (measured)",
            ),
        ]
        rows += [row for row in extras if row[1]]
        cuda = self.device == "cuda"
        rows.append(
            (
                "CUDA context" if cuda else "torch runtime",
                self.overhead_bytes,
                "fixed; not in torch.cuda.max_memory_allocated"
                if cuda
                else "fixed; already in the trainer's RSS baseline",
            )
        )
        rows.append(("total", self.total_bytes, f"{self.total_gb:.2f} GB"))
        return rows

    def _moment_rows(self) -> list[tuple[str, int, str]]:
        """The terms of the two candidate peak moments: those of the other moment are listed with 0 bytes."""
        at_loss = self.peak_moment == "loss"
        moment = [
            (
                "logits + loss",
                self.logits_bytes,
                at_loss,
                f"one chunk of logits (≤ {self.loss_chunk:,} of N = {self.n_targets:,} target positions) × vocab, "
                "fp32, + the targets' hidden states and their gradient",
            ),
            ("gradients", self.grad_bytes, not at_loss, f"{self.trainable_params:,} trainable params, fp32"),
            (
                "backward workspace",
                self.workspace_bytes,
                not at_loss,
                "transient gradients of one layer" + (" + one dequantised weight" if self.quant != "none" else ""),
            ),
        ]
        if self.recompute_bytes:
            moment.insert(
                1,
                (
                    "recomputed block",
                    self.recompute_bytes,
                    not at_loss,
                    "gradient checkpointing: one block's activations, rebuilt in its backward",
                ),
            )
        elsewhere = (
            "not at the peak: made during backward after the loss's tensors are freed"
            if at_loss
            else "not at the peak: freed before the last block's backward"
        )
        return [
            (label, n, note) if alive else (label, 0, f"{gb(n):.3f} GB, {elsewhere}")
            for label, n, alive, note in moment
        ]


def estimate(
    anatomy: Mapping[str, Any],
    cfg: RunConfig,
    device: str = "cuda",
    *,
    bf16_capable: bool | None = None,
    target_frac: float | None = None,
    data: DataFacts | None = None,
) -> Estimate:
    """Parameters and training memory of `cfg` on `anatomy` (engine.ml.model.inspect_model's dict).

    data: the prepared dataset's token counts (engine `preview --facts`, `check`): the estimate is then
    that of the largest micro-batch the run will build (engine.core.batching, the trainer's own batching),
    basis 'dataset'. Without it every micro-batch is batch_size full rows of max_seq_len, basis 'worst case'.
    target_frac: without data, the fraction of token positions that carry a loss target (e.g. the response
    share of a chat dataset with train_on = responses). Default: every position; ignored with train_on = all.
    """
    if target_frac is not None and not 0 < target_frac <= 1:
        raise ValueError(f"target_frac = {target_frac!r}: must be in (0, 1]")
    tr = cfg.train
    if data is not None:
        shapes, scanned = _batch_shapes(data, tr)
        k, longest, check_targets = packing_check_shape(data, PACKING_CHECK_EXAMPLES)
        candidates = [
            _estimate_at(
                anatomy,
                cfg,
                device,
                bf16_capable,
                Shape.of(anatomy, b.rows, b.length, masked=b.masked),
                b.targets,
                (k, longest, check_targets),
                "dataset",
                f"the largest micro-batch of the data: {b.rows} row{'s' if b.rows != 1 else ''} × {b.length} "
                f"tokens ({b.tokens:,} tokens, {b.targets:,} targets; of {scanned:,} micro-batches)",
            )
            for b in shapes
        ]
        return max(candidates, key=lambda e: e.allocated_bytes)
    shape = Shape.of(anatomy, tr.batch_size, tr.max_seq_len)
    frac = 1.0 if cfg.train_on == "all" or target_frac is None else target_frac
    n_targets = max(1, math.ceil(frac * shape.B * (shape.T - 1)))
    check = (PACKING_CHECK_EXAMPLES, shape.T, max(1, math.ceil(frac * PACKING_CHECK_EXAMPLES * (shape.T - 1))))
    note = f"{shape.B} full rows of max_seq_len = {shape.T}"
    return _estimate_at(anatomy, cfg, device, bf16_capable, shape, n_targets, check, "worst case", note)


@lru_cache(maxsize=64)
def _batch_shapes(data: DataFacts, tr: TrainSpec):
    return run_batch_shapes(data, tr)


def _estimate_at(
    anatomy: Mapping[str, Any],
    cfg: RunConfig,
    device: str,
    bf16_capable: bool | None,
    shape: Shape,
    n_targets: int,
    check: tuple[int, int, int],
    basis: str,
    note: str,
) -> Estimate:
    """The estimate for micro-batches of this shape (rows × length, n_targets loss positions)."""
    lo, tr = cfg.lora, cfg.train
    chosen = resolve_targets(lo, anatomy["modules"], str(anatomy.get("model") or "the model"))
    dtype = resolve_dtype(cfg.dtype, device, bf16_capable, cfg.quant)
    c = DTYPE_BYTES[dtype]
    quantized = cfg.quant != "none"
    # engine/ml/train.py: autocast when the dtype is 16-bit and the base is not quantized.
    autocast = c != FP32 and not quantized
    a = FP32 if quantized else c  # activation bytes: fp32 residual stream after peft's k-bit upcast
    params = _parameters(anatomy, chosen, cfg)

    # base weights; LoRA weights, gradients (set to None between steps, fp32 while they exist), AdamW
    # states. LoRA-FA (freeze_A) trains only B: no gradient and no state for A.
    linear_bytes, linear_params = linear_weights(anatomy["modules"], cfg.quant, c)
    other_bytes = (params["base_params"] - linear_params) * (FP32 if quantized else c)
    grad_bytes = params["trainable_params"] * FP32
    optimizer_bytes = ADAM_STATES * params["trainable_params"] * FP32

    # activations, logits, workspace
    terms, recompute = activations(anatomy, chosen, cfg, shape, device, a, autocast)
    activation_bytes = sum(v for _, v in terms)
    chunk = loss_chunk_rows(tr.loss_chunk, shape.V)
    logits_bytes = logits(shape, a, n_targets, chunk)
    work = workspace(anatomy, chosen, cfg, shape, a, c)
    # The step's peak above weights + LoRA (see Estimate.allocated_bytes): kept activations and AdamW
    # states, plus the larger of the loss's tensors and what the last block's backward holds.
    step = optimizer_bytes + activation_bytes - recompute + max(logits_bytes, recompute + grad_bytes + work)
    allocator = _cpu_heap_kept(anatomy, chosen, cfg, shape, device, a, autocast, activation_bytes)
    # Only when the unquantized weights alias the file: loaded in its dtype, which peft's fp32 upcast keeps.
    stored = str(anatomy.get("torch_dtype") or "float32").removeprefix("torch.")
    aliased = device == "cpu" and quantized and FILE_DTYPE_BYTES.get(stored) == c == FP32
    return Estimate(
        model=str(anatomy.get("model", "")),
        device=device,
        compute_dtype=dtype,
        activation_dtype="fp32" if a == FP32 else dtype,
        quant=cfg.quant,
        n_modules=len(chosen),
        **params,
        base_linear_bytes=linear_bytes,
        base_other_bytes=other_bytes,
        lora_bytes=params["lora_params"] * FP32,
        grad_bytes=grad_bytes,
        optimizer_bytes=optimizer_bytes,
        activation_bytes=activation_bytes,
        recompute_bytes=recompute,
        logits_bytes=logits_bytes,
        workspace_bytes=work,
        startup_bytes=max(0, packing_check(shape, a, *check) - step),
        framework_bytes=CPU_FRAMEWORK_BYTES if device == "cpu" else 0,
        allocator_bytes=allocator,
        mapped_file_bytes=linear_params * FP32 if aliased else 0,
        overhead_bytes=CUDA_CONTEXT_BYTES if device == "cuda" else CPU_RUNTIME_BYTES,
        n_targets=n_targets,
        activation_terms=tuple(terms),
        assumptions=_assumptions(cfg, shape, n_targets, device, dtype, autocast, note),
        basis=basis,
        batch_note=note,
        loss_chunk=chunk,
    )


def _cpu_heap_kept(
    anatomy, chosen, cfg: RunConfig, shape: Shape, device: str, a: int, autocast: bool, activation_bytes: int
) -> int:
    """CPU only: freed heap memory glibc keeps resident, ≈ the activations as they are without checkpointing
    (see engine.core.memory.CPU_HEAP_KEPT_FRACTION)."""
    if device != "cpu":
        return 0
    tr = cfg.train
    full = activation_bytes
    if tr.gradient_checkpointing:
        full = sum(v for _, v in activations(anatomy, chosen, cfg, shape, device, a, autocast, checkpointing=False)[0])
    kept = CPU_HEAP_KEPT_FRACTION_CHECKPOINTED if tr.gradient_checkpointing else CPU_HEAP_KEPT_FRACTION
    return int(kept * full)


def _parameters(anatomy: Mapping[str, Any], chosen: Sequence[Mapping[str, Any]], cfg: RunConfig) -> dict[str, Any]:
    """Exact counts per method (engine.core.variants.counts: LoRA's A (r × in) and B (out × r), DoRA's magnitude,
    AdaLoRA's P, Λ, Q at the initial rank, VeRA's scaling vectors); the adapter file is its numbers in fp32 plus
    the safetensors header."""
    c = V.counts(chosen, cfg.lora)
    lora_params, trainable = c["adapter_params"], c["trainable"]
    base_params = int(anatomy["total_params"])
    total = base_params + lora_params + c["frozen"]
    header = SAFETENSORS_FILE_OVERHEAD + sum(
        len(ADAPTER_KEY_PREFIX) + len(m["name"]) + len(x) + SAFETENSORS_ENTRY_OVERHEAD
        for m in chosen
        for x in c["suffixes"]
    )
    header += sum(len(k) + SAFETENSORS_ENTRY_OVERHEAD for k in c["shared"])
    return dict(
        base_params=base_params,
        lora_params=lora_params,
        trainable_params=trainable,
        total_params=total,
        trainable_pct=100.0 * trainable / total if total else 0.0,
        adapter_file_bytes=c["file_params"] * FP32 + header,
    )


def _assumptions(
    cfg: RunConfig, shape: Shape, n_targets: int, device: str, dtype: str, autocast: bool, note: str
) -> tuple[str, ...]:
    tr, quantized = cfg.train, cfg.quant != "none"
    layout = (
        f"packed rows, output head on {n_targets:,} target positions"
        if tr.packing
        else f"rows padded to the longest, output head on {n_targets:,} target positions"
    ) + f", its logits {loss_chunk_rows(tr.loss_chunk, shape.V):,} positions at a time"
    return (
        f"{note}; {layout}" + (" (attention mask kept)" if shape.padded else ""),
        "SDPA memory-efficient/flash attention: O(seq) memory, no seq×seq scores kept",
        "AdamW with fp32 states; gradients fp32",
        f"compute dtype {dtype}"
        + (" under autocast" if autocast else "")
        + (", activations fp32 (peft upcasts non-quantized weights for k-bit training)" if quantized else ""),
        "gradient checkpointing: one layer's activations + each layer's input"
        if tr.gradient_checkpointing
        else "no gradient checkpointing: every layer's activations kept",
        "peak at the start of backward (kept activations + the loss's tensors) or in the last block's backward "
        "(gradients, workspace, recomputed block), whichever is larger",
        "fixed overhead: CUDA context"
        if device == "cuda"
        else "CPU: measured as peak RSS growth; libraries loaded during the run and freed memory malloc keeps counted, "
        "torch runtime in the baseline",
    )


# ---- verdicts ----------------------------------------------------------------------------------------


def fits(
    est: Estimate, gpus: Sequence[float] = (16, 24, 40, 48, 80), *, usable: float = 0.95
) -> list[tuple[float, bool]]:
    """(GPU size in GB, whether the estimate fits) per size.

    A card sold as N GB has about N GiB; we keep 5 % for the allocator's fragmentation and the
    driver's reservation, which the estimate does not model.
    """
    return [(g, est.total_bytes <= g * GIB * usable) for g in gpus]


def suggestions(
    anatomy: Mapping[str, Any], cfg: RunConfig, est: Estimate, budget_gb: float, data: DataFacts | None = None
) -> list[str]:
    """Changes that lower memory, each re-estimated, biggest saving first; [] when it already fits.

    Each line gives the new total and the saving; '(fits)' marks those that alone reach the budget.
    A last line combines the biggest savers until the budget is met. With `data` the re-estimates use the
    dataset's lengths too (a shorter max_seq_len clips them: DataFacts.clipped).
    """
    if est.total_bytes <= budget_gb * GIB:
        return []
    tr = cfg.train
    # what auto resolved to for est (a device with or without fast bf16) holds for the re-estimates too
    bf16 = est.compute_dtype == "bf16" if cfg.dtype == "auto" and cfg.quant == "none" else None
    options: list[tuple[str, dict[str, Any]]] = []
    if cfg.quant != "4bit":
        options.append(("4-bit quantization", {"quant": "4bit"}))
    if cfg.quant == "none" and not cfg.lora.use_dora:
        options.append(("8-bit quantization", {"quant": "8bit"}))
    if tr.batch_size > 1:
        options.append(
            (
                f"batch_size {tr.batch_size} → 1 with grad_accum ×{tr.batch_size}",
                {"train": {"batch_size": 1, "grad_accum": tr.grad_accum * tr.batch_size}},
            )
        )
    if not tr.gradient_checkpointing:
        options.append(("gradient checkpointing", {"train": {"gradient_checkpointing": True}}))
    if tr.max_seq_len >= 256:
        options.append(
            (f"max_seq_len {tr.max_seq_len} → {tr.max_seq_len // 2}", {"train": {"max_seq_len": tr.max_seq_len // 2}})
        )
    if cfg.lora.r >= 16:
        options.append((f"lora.r {cfg.lora.r} → {cfg.lora.r // 2}", {"lora": {"r": cfg.lora.r // 2}}))
    if not cfg.lora.freeze_A and cfg.lora.init == "gaussian":
        options.append(("LoRA-FA (freeze_A)", {"lora": {"freeze_A": True}}))

    scored = []
    for label, change in options:
        try:
            new_cfg = cfg.replace(**change)
        except ConfigError:
            continue  # a change this config cannot take (e.g. PiSSA with quantization)
        new = _re_estimate(anatomy, new_cfg, est.device, bf16, data)
        saved = est.total_bytes - new.total_bytes
        if saved > 0.005 * GIB:
            scored.append((saved, label, change, new))
    scored.sort(key=lambda x: -x[0])
    lines = [
        f"{label}: {new.total_gb:.1f} GB (saves {gb(saved):.1f} GB)"
        + (" (fits)" if new.total_bytes <= budget_gb * GIB else "")
        for saved, label, _, new in scored
    ]

    # Greedy combination: apply the biggest savers, in order, until the budget is met.
    combo_cfg, used, combo = cfg, [], est
    for _, label, change, _ in scored:
        try:
            trial = combo_cfg.replace(**change)
        except ConfigError:
            continue
        combo_cfg, combo = trial, _re_estimate(anatomy, trial, est.device, bf16, data)
        used.append(label)
        if combo.total_bytes <= budget_gb * GIB:
            break
    if len(used) > 1:
        verdict = "fits" if combo.total_bytes <= budget_gb * GIB else f"still over {budget_gb:g} GB"
        lines.append(f"together ({' + '.join(used)}): {combo.total_gb:.1f} GB ({verdict})")
    return lines


def _re_estimate(anatomy, cfg: RunConfig, device: str, bf16: bool | None, data: DataFacts | None) -> Estimate:
    return estimate(anatomy, cfg, device, bf16_capable=bf16, data=data.clipped(cfg.train.max_seq_len) if data else None)
