"""Parameter count and training-memory estimate for a LoRA run, from a model's anatomy; stdlib only.

    anatomy = inspect_model(cfg.model, home)      # or `python -m engine inspect MODEL --json`
    est = estimate(anatomy, cfg, device="cuda")   # pure, well under 1 ms
    est.trainable_params, gb(est.total_bytes)     # exact count; memory in GiB
    est.table_rows()                              # (label, bytes, note) for the UI
    fits(est), suggestions(anatomy, cfg, est, budget_gb=8)

Every memory term is kept separate so that it can be checked against a measurement
(bench/memory_accuracy.py). The terms follow what the trainer (engine/train.py with engine/model.py)
actually keeps in memory, traced on CPU with torch 2.13 / transformers 5.23 / peft 0.21 by walking the
autograd graph after a forward pass (tests/test_estimate.py repeats that check):

- Base weights: loaded in the compute dtype; 4/8-bit through bitsandbytes. With quantization,
  peft's prepare_model_for_kbit_training (called by attach_lora) upcasts every non-quantized
  parameter (embeddings, norms, biases, lm_head) to fp32, and so the residual stream and every
  activation become fp32 too.
- LoRA weights, their gradients and AdamW states are fp32 (peft's autocast_adapter_dtype).
- Without quantization and with a 16-bit dtype the trainer runs under torch.autocast: the
  activations are 16-bit and each LoRA layer keeps its own 16-bit copy of its input.
- A frozen base Linear keeps nothing for backward (its input gradient needs only W); the input
  is kept only by the LoRA path (and by bitsandbytes' 8-bit matmul on CUDA).
- Attention runs through SDPA's memory-efficient/flash kernels, O(T) memory per layer, on GPU and
  CPU alike; no (T × T) score matrix is kept. Models whose attention has dropout (GPT-2) fall back to
  the O(T²) math kernel on CPU, which is not modelled.
- Rows are full: batch_size rows of max_seq_len tokens (the worst micro-batch). With packing (the
  default, engine/data.py collate_packed) a row holds one or more examples with restarting position
  ids and no attention_mask; transformers then builds a block-diagonal (R, 1, L, L) boolean mask from
  the position ids as soon as one row holds a restart (two examples, or one example and a pad tail).
  With padding (packing off) any padded batch gets a (B, 1, T, T) mask. Either way, with batch_size > 1
  SDPA turns the mask into a float bias in every layer and keeps it for backward, and grouped-query
  attention runs on keys/values repeated to every head (repeat_kv); measured on packed rows exactly as
  on padded ones (tests/test_estimate.py). With batch_size 1 there is no mask (a single example has
  no restart) and keys/values stay at num_key_value_heads. Rows that each hold exactly one
  max_seq_len example have no mask either: the estimate keeps the mask, an upper bound.
- The loss: with packing the trainer runs the output head only on positions that have a target
  (engine/train.py token_losses), so the logits are N × vocab with N ≤ batch_size·(max_seq_len − 1)
  target tokens, not batch × seq × vocab. Every position is assumed to be a target (train_on all, or
  the worst case of train_on responses) unless estimate() gets a target_frac hint.
- At the start of a packed run the trainer checks, without gradients, that packing gives the padded
  losses on the first 4 examples (engine/train.py packing_agrees). Its logits can exceed the training
  step's when batch_size < 4 and the vocabulary is large; the estimate counts the excess.
- On CPU the trainer's measured peak is the growth of peak RSS over a baseline taken after torch is
  imported; the model's transformers code, peft and the tokenizer load after that baseline and count
  in the growth (framework_bytes), and so does memory glibc's malloc keeps after tensors are freed
  (allocator_bytes, see CPU_HEAP_KEPT_FRACTION) and, with quantization, the checkpoint's pages left
  mapped (mapped_file_bytes). tensor_bytes is the part max_memory_allocated would count.
  bench/memory_accuracy.py measures both levels.

"GB" in this module means GiB (2**30 bytes), as torch and nvidia-smi report memory.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

from engine.config import TARGET_PRESETS, ConfigError, LoraSpec, RunConfig

GIB = 1024**3

# Fixed costs outside the tensors we count. torch.cuda.max_memory_allocated() does not see them;
# nvidia-smi does. The CUDA context (driver, cuBLAS/cuDNN handles and kernels) takes 300 MiB–2 GiB
# depending on GPU and library versions (vram.asmirnov.xyz); 0.5 GiB is typical for a single H100/A100
# with torch 2.x. On CPU, a Python process with torch and the engine imported (the trainer's RSS
# baseline) is resident at 0.21 GiB (measured, torch 2.13).
CUDA_CONTEXT_BYTES = 512 * 1024**2
CPU_RUNTIME_BYTES = 220 * 1024**2
# On CPU, part of the process's memory arrives after engine/train.py takes its RSS baseline (right after
# `import torch`): transformers' model code, peft, the tokenizer and the tokenized data. Measured with
# torch 2.13 / transformers 5.23 / peft 0.21 on a Llama: +114 MiB for transformers' Llama modules,
# +54 MiB for peft, a few MiB for the tokenizer.
CPU_FRAMEWORK_BYTES = 170 * 1024**2
# On CPU, RSS does not fall when tensors are freed: torch allocates with glibc malloc, which serves
# requests under its mmap threshold (raised dynamically up to 32 MiB) from the heap, and the heap keeps
# freed chunks resident (it only returns its top, and freed holes between live tensors coalesce into
# regions that later requests, even (N × vocab) ones, are carved from). Activations, their gradients and
# the temporaries of each layer are such chunks. Measured by bench/memory_accuracy.py on 14 configs
# (4-layer Llama and SmolLM2-135M; LoRA, DoRA, LoRA-FA, 8/4-bit, checkpointing; torch 2.13, glibc 2.36):
# the peak RSS growth exceeded the live tensor bytes (counted exactly by a TorchDispatchMode) by
# CPU_FRAMEWORK_BYTES plus about one more copy of the activations as they are WITHOUT checkpointing;
# with checkpointing (blocks rebuilt one at a time in backward) three quarters of that copy fitted the
# three checkpointed configs. The CPU estimate then lands within −11 % … +5 % of the measured RSS growth
# on the bench's 10 configs (RSS itself varies ±5 % between identical runs). With
# MALLOC_MMAP_THRESHOLD_=131072 the extra roughly halves. CUDA's caching allocator is not affected:
# max_memory_allocated counts live tensors only.
CPU_HEAP_KEPT_FRACTION = 1.0
CPU_HEAP_KEPT_FRACTION_CHECKPOINTED = 0.75
# On CPU, from_pretrained memory-maps the checkpoint, and parameters loaded in the file's dtype alias that
# mapping (no copy). With quantization the unquantized parameters (embeddings, norms, head) still alias it,
# so the mapping stays alive for the whole run, and the linear layers' original bytes, read once to
# quantize them, stay resident beside their int8/NF4 copies (seen in /proc/self/smaps by the bench).
FILE_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# engine/train.py packing_agrees checks packing on prep.train[:4] before training (no gradients).
PACKING_CHECK_EXAMPLES = 4

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FP32 = 4
ADAM_STATES = 2  # AdamW keeps exp_avg and exp_avg_sq per trainable parameter, fp32 like the parameter

# bitsandbytes NF4 (QLoRA, Dettmers et al. 2023, §3): 4-bit codes packed two per byte, one absmax
# scale per block of 64 weights. Without double quantization the absmax is fp32: 32/64 = 0.5 bits per
# parameter. Double quantization stores the absmax as 8-bit with one fp32 scale per 256 blocks:
# 8/64 + 32/(64·256) = 0.127 bits per parameter ("reduces the memory footprint from 0.5 to 0.127
# bits per parameter", QLoRA §3). Each quantized layer also holds its own small tables: the 16-entry
# NF4 code (fp32), a 256-entry code for the second level (fp32) and an fp32 offset.
NF4_BLOCK = 64
NF4_BLOCK2 = 256
NF4_DOUBLE_QUANT = True  # engine/model.py always loads 4-bit with bnb_4bit_use_double_quant=True
NF4_CODE_BYTES = 16 * FP32
NF4_CODE2_BYTES = 256 * FP32
NF4_OFFSET_BYTES = FP32
# LLM.int8 (Dettmers et al. 2022): int8 weight (its CB attribute shares the same storage) plus one fp32
# scale per output row (SCB).

# safetensors file = 8-byte length + JSON header + data. The header has one entry per tensor,
# '"<key>":{"dtype":"F32","shape":[r,in],"data_offsets":[a,b]},' with a key like
# 'base_model.model.<module>.lora_A.weight'. We approximate each entry as the key's length plus a
# constant for the rest (the digits vary), and the file-level part as a constant.
SAFETENSORS_FILE_OVERHEAD = 8 + 40
SAFETENSORS_ENTRY_OVERHEAD = 62
ADAPTER_KEY_PREFIX = "base_model.model."
ADAPTER_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
DORA_SUFFIX = ".lora_magnitude_vector"

# Same regex as engine.model.Q_OR_V (copied: engine.model imports torch).
Q_OR_V = re.compile(r"^(q|v|q_proj|v_proj|query|value|wq|wv|c_attn|qkv_proj|Wqkv|query_key_value|in_proj)$")
# Output projections: their input is the attention output or the MLP intermediate, not the block's
# normalised hidden state that the other projections of the same group share.
OUT_PROJ = frozenset({"o_proj", "out_proj", "c_proj", "dense", "wo", "w2", "down_proj", "fc2",
                      "dense_4h_to_h", "proj"})
GATED_MLP = re.compile(r"gate|^w1$|^w3$|^wi_0$")
QUANTIZABLE = frozenset({"Linear", "Conv1D", "Linear4bit", "Linear8bitLt"})  # transformers 5 converts both


def gb(n_bytes: float) -> float:
    """Bytes → GiB."""
    return n_bytes / GIB


# ---- which modules get LoRA (the trainer's rule, without torch) -------------------------------------


def select_modules(anatomy: Mapping[str, Any], lora: LoraSpec) -> list[dict[str, Any]]:
    """The anatomy's module dicts that get LoRA: exactly engine.model.resolve_targets' choice and errors."""
    modules = anatomy["modules"]
    model_name = str(anatomy.get("model") or "the model")
    problems: list[str] = []

    def kinds() -> str:
        return ", ".join(dict.fromkeys(m["kind"] for m in modules))  # first-appearance order

    if lora.targets and lora.targets[0] in TARGET_PRESETS:
        preset = lora.targets[0]
        chosen = [m for m in modules if preset == "all-linear"
                  or (preset == "attention" and m["group"] == "attention")
                  or (preset == "mlp" and m["group"] == "mlp")
                  or (preset == "qv" and m["group"] == "attention" and Q_OR_V.match(m["kind"]))]
        if not chosen:
            problems.append(f"lora.targets = {preset!r}: this preset matches no module of {model_name}; "
                            f"its LoRA-able modules are {kinds()}")
    else:
        chosen, seen = [], set()
        for t in lora.targets:
            hit = [m for m in modules if m["name"] == t or m["name"].endswith("." + t)]
            if not hit:
                problems.append(f"lora.targets: {t!r} matches no module of {model_name}; LoRA-able modules "
                                f"are {kinds()} (or presets {', '.join(TARGET_PRESETS)})")
            for h in hit:
                if h["name"] not in seen:
                    seen.add(h["name"])
                    chosen.append(h)
    if lora.layers:
        have = sorted({m["layer"] for m in modules if m["layer"] is not None})
        missing = [i for i in lora.layers if i not in have]
        if missing:
            problems.append(f"lora.layers = {list(lora.layers)}: {model_name} has layers "
                            f"{have[0]}–{have[-1]}; no layer {', '.join(map(str, missing))}" if have else
                            f"lora.layers: {model_name} has no numbered layers")
        chosen = [m for m in chosen if m["layer"] in lora.layers]
    if problems:
        raise ConfigError(problems)
    return chosen


# ---- the result --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """Parameter counts and a per-term memory estimate (bytes) of one training configuration."""

    model: str
    device: str                  # cuda | cpu
    compute_dtype: str           # fp32 | bf16 | fp16 (after resolving auto)
    activation_dtype: str        # what the saved activations are stored in
    quant: str
    n_modules: int               # modules that get LoRA
    # parameters
    base_params: int             # the base model, tied weights once
    lora_params: int             # every adapter weight: A, B (and DoRA magnitudes)
    trainable_params: int        # lora_params minus A under LoRA-FA
    total_params: int            # base + LoRA, as peft's get_nb_trainable_parameters counts all
    trainable_pct: float
    adapter_file_bytes: int      # adapter_model.safetensors, fp32
    # memory, bytes
    base_linear_bytes: int       # the linear layers' weights as stored (full dtype, int8 + scales, NF4 + absmax)
    base_other_bytes: int        # embeddings, norms, lm_head, biases (buffers like RoPE tables not counted)
    lora_bytes: int              # LoRA weights (fp32)
    grad_bytes: int              # fp32 gradients of the trainable parameters
    optimizer_bytes: int         # AdamW states
    activation_bytes: int        # tensors autograd keeps for backward at the end of the forward pass
    recompute_bytes: int         # gradient checkpointing: the one block recomputed in backward (in activation_bytes)
    logits_bytes: int            # the loss's fp32 (N × vocab) tensors alive at its backward
    workspace_bytes: int         # transient buffers of one layer's backward (gradients, dequantised weight)
    startup_bytes: int           # what the start-up packing check needs beyond the training step (often 0)
    framework_bytes: int         # CPU: libraries and tokenizer loaded after the trainer's RSS baseline; 0 on CUDA
    allocator_bytes: int         # CPU: freed heap memory glibc keeps resident (see CPU_HEAP_KEPT_FRACTION); 0 on CUDA
    mapped_file_bytes: int       # CPU + quantization: the checkpoint's linear layers left mapped and resident
    overhead_bytes: int          # CUDA context or CPU runtime (outside the trainer's measured peak)
    n_targets: int               # N: positions the logits are computed for (worst case unless target_frac)
    activation_terms: tuple[tuple[str, int], ...]  # activation_bytes split by what keeps it
    assumptions: tuple[str, ...]

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
        return (self.weights_bytes + self.lora_bytes + self.optimizer_bytes
                + self.activation_bytes - self.recompute_bytes + max(self.logits_bytes, at_block)
                + self.startup_bytes + self.framework_bytes + self.allocator_bytes + self.mapped_file_bytes)

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
        d.update(weights_bytes=self.weights_bytes, allocated_bytes=self.allocated_bytes,
                 total_bytes=self.total_bytes, total_gb=round(self.total_gb, 3), peak_moment=self.peak_moment)
        return d

    def table_rows(self) -> list[tuple[str, int, str]]:
        """(label, bytes, note) per term, then the total, for the UI's breakdown table.

        The bytes are what is alive at the peak (peak_moment), so they add up to the total; a term that
        exists only at the other moment is listed with 0 bytes and its size in the note.
        """
        q = {"none": f"{self.compute_dtype}", "8bit": "int8 + fp32 row scales (LLM.int8)",
             "4bit": "NF4 + double-quantised absmax (QLoRA)"}[self.quant]
        other_dtype = "fp32 (peft upcasts them for k-bit training)" if self.quant != "none" else self.compute_dtype
        act = ", ".join(f"{k} {gb(v):.2f}" for k, v in self.activation_terms if v)
        rows = [
            ("base weights: linear layers", self.base_linear_bytes, q),
            ("base weights: embeddings, norms, head", self.base_other_bytes, other_dtype),
            ("LoRA weights", self.lora_bytes, f"{self.lora_params:,} params, fp32"),
            ("optimizer states", self.optimizer_bytes, "AdamW: exp_avg + exp_avg_sq, fp32"),
            ("activations", self.activation_bytes - self.recompute_bytes, f"{self.activation_dtype}; GB: {act}"
             + ("; without the recomputed block" if self.recompute_bytes else "")),
        ]
        at_loss = self.peak_moment == "loss"
        later = "not at the peak: made during backward after the loss's tensors are freed"
        moment = [
            ("logits + loss", self.logits_bytes, at_loss, f"N·vocab, N = {self.n_targets:,} target positions: "
             "log-probs and 2 gradients, fp32, at the loss's backward"),
            ("gradients", self.grad_bytes, not at_loss, f"{self.trainable_params:,} trainable params, fp32"),
            ("backward workspace", self.workspace_bytes, not at_loss, "transient gradients of one layer"
             + (" + one dequantised weight" if self.quant != "none" else "")),
        ]
        if self.recompute_bytes:
            moment.insert(1, ("recomputed block", self.recompute_bytes, not at_loss,
                              "gradient checkpointing: one block's activations, rebuilt in its backward"))
        for label, n, alive, note in moment:
            if alive:
                rows.append((label, n, note))
            else:
                rows.append((label, 0, f"{gb(n):.3f} GB, " + (later if at_loss else
                             "not at the peak: freed before the last block's backward")))
        if self.startup_bytes:
            rows.append(("start-up packing check (extra)", self.startup_bytes,
                         f"no-grad forward of {PACKING_CHECK_EXAMPLES} examples: its logits exceed the step's"))
        if self.framework_bytes:
            rows.append(("libraries loaded during the run", self.framework_bytes,
                         "transformers model code, peft, tokenizer: in the CPU RSS growth"))
        if self.mapped_file_bytes:
            rows.append(("checkpoint pages left mapped (CPU)", self.mapped_file_bytes,
                         "the linear layers as stored in the file, resident beside their quantized copies"))
        if self.allocator_bytes:
            rows.append(("freed memory malloc keeps (CPU)", self.allocator_bytes,
                         "glibc's heap keeps freed activations and temporaries resident: ≈ the activations "
                         "once more (measured)"))
        rows.append(("CUDA context" if self.device == "cuda" else "torch runtime", self.overhead_bytes,
                     "fixed; not in torch.cuda.max_memory_allocated" if self.device == "cuda"
                     else "fixed; already in the trainer's RSS baseline"))
        rows.append(("total", self.total_bytes, f"{self.total_gb:.2f} GB"))
        return rows


# ---- the estimate ------------------------------------------------------------------------------------


def resolve_dtype(dtype: str, device: str, bf16_capable: bool = True) -> str:
    """engine.model.compute_dtype without torch: auto = bf16 on a bf16-capable GPU, else fp32."""
    if dtype != "auto":
        return dtype
    return "bf16" if device == "cuda" and bf16_capable else "fp32"


def nf4_bytes(n: int, double_quant: bool = NF4_DOUBLE_QUANT) -> int:
    """Storage of one weight of n elements in bitsandbytes NF4, with its quantization state."""
    blocks = math.ceil(n / NF4_BLOCK)
    packed = (n + 1) // 2
    if double_quant:
        absmax = blocks + math.ceil(blocks / NF4_BLOCK2) * FP32 + NF4_CODE2_BYTES + NF4_OFFSET_BYTES
    else:
        absmax = blocks * FP32
    return packed + absmax + NF4_CODE_BYTES


def int8_bytes(n_in: int, n_out: int) -> int:
    """Storage of one LLM.int8 weight: int8 values + one fp32 scale per output row."""
    return n_in * n_out + n_out * FP32


def estimate(anatomy: Mapping[str, Any], cfg: RunConfig, device: str = "cuda", *,
             bf16_capable: bool = True, target_frac: float | None = None) -> Estimate:
    """Parameters and training memory of `cfg` on `anatomy` (engine.model.inspect_model's dict).

    target_frac: the fraction of token positions that carry a loss target (e.g. the response share of a
    chat dataset with train_on = responses, from the dataset preview). Default: every position, the
    worst case; ignored with train_on = all.
    """
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device = {device!r}: must be 'cuda' or 'cpu'")
    if target_frac is not None and not 0 < target_frac <= 1:
        raise ValueError(f"target_frac = {target_frac!r}: must be in (0, 1]")
    lo, tr = cfg.lora, cfg.train
    chosen = select_modules(anatomy, lo)
    r = lo.r
    dtype = resolve_dtype(cfg.dtype, device, bf16_capable)
    c = DTYPE_BYTES[dtype]
    quantized = cfg.quant != "none"
    # engine/train.py: autocast when the dtype is 16-bit and the base is not quantized.
    autocast = c != FP32 and not quantized
    a = FP32 if quantized else c  # activation bytes: fp32 residual stream after peft's k-bit upcast

    # 1) parameters: A is (r × in), B is (out × r), DoRA adds a magnitude vector of length out.
    lora_A = sum(r * m["in"] for m in chosen)
    lora_B = sum(r * m["out"] for m in chosen)
    magnitude = sum(m["out"] for m in chosen) if lo.use_dora else 0
    lora_params = lora_A + lora_B + magnitude
    trainable = lora_params - (lora_A if lo.freeze_A else 0)
    base_params = int(anatomy["total_params"])
    total = base_params + lora_params
    suffixes = ADAPTER_SUFFIXES + ((DORA_SUFFIX,) if lo.use_dora else ())
    header = SAFETENSORS_FILE_OVERHEAD + sum(len(ADAPTER_KEY_PREFIX) + len(m["name"]) + len(x) + SAFETENSORS_ENTRY_OVERHEAD
                                             for m in chosen for x in suffixes)
    adapter_file = lora_params * FP32 + header

    # 2) base weights
    linear_bytes, linear_params = _linear_weights(anatomy["modules"], cfg.quant, c)
    other_params = base_params - linear_params
    other_bytes = other_params * (FP32 if quantized else c)

    # 3) LoRA weights, gradients (set to None between steps, fp32 while they exist), AdamW states.
    #    LoRA-FA (freeze_A) trains only B: no gradient and no state for A.
    lora_bytes = lora_params * FP32
    grad_bytes = trainable * FP32
    optimizer_bytes = ADAM_STATES * trainable * FP32

    # 4) activations, logits, workspace
    shape = _Shape.of(anatomy, tr.batch_size, tr.max_seq_len)
    terms, recompute = _activations(anatomy, chosen, cfg, shape, device, a, autocast)
    activation_bytes = sum(v for _, v in terms)
    frac = 1.0 if cfg.train_on == "all" or target_frac is None else target_frac
    n_targets = max(1, math.ceil(frac * shape.B * (shape.T - 1)))
    logits_bytes = _logits(shape, a, n_targets, tr.packing)
    workspace = _workspace(anatomy, chosen, cfg, shape, a, c)
    # The step's peak above weights + LoRA (see Estimate.allocated_bytes): kept activations and AdamW
    # states, plus the larger of the loss's tensors and what the last block's backward holds.
    step = optimizer_bytes + activation_bytes - recompute + max(logits_bytes, recompute + grad_bytes + workspace)
    startup = max(0, _packing_check(shape, a, frac) - step) if tr.packing else 0
    framework = CPU_FRAMEWORK_BYTES if device == "cpu" else 0
    allocator = 0
    if device == "cpu":
        full = activation_bytes if not tr.gradient_checkpointing else sum(
            v for _, v in _activations(anatomy, chosen, cfg, shape, device, a, autocast, checkpointing=False)[0])
        kept = CPU_HEAP_KEPT_FRACTION_CHECKPOINTED if tr.gradient_checkpointing else CPU_HEAP_KEPT_FRACTION
        allocator = int(kept * full)
    # Only when the unquantized weights alias the file: loaded in its dtype, which peft's fp32 upcast keeps.
    stored = str(anatomy.get("torch_dtype") or "float32").removeprefix("torch.")
    aliased = device == "cpu" and quantized and FILE_DTYPE_BYTES.get(stored) == c == FP32
    mapped = linear_params * FP32 if aliased else 0
    overhead = CUDA_CONTEXT_BYTES if device == "cuda" else CPU_RUNTIME_BYTES

    layout = (f"packed rows of max_seq_len = {shape.T}, output head on {n_targets:,} target positions"
              if tr.packing else f"batches padded to max_seq_len = {shape.T}")
    assumptions = (
        f"{shape.B} full {layout}" + (" (attention mask kept)" if shape.padded else ""),
        "SDPA memory-efficient/flash attention: O(seq) memory, no seq×seq scores kept",
        "AdamW with fp32 states; gradients fp32",
        f"compute dtype {dtype}" + (" under autocast" if autocast else "")
        + (", activations fp32 (peft upcasts non-quantized weights for k-bit training)" if quantized else ""),
        "gradient checkpointing: one layer's activations + each layer's input" if tr.gradient_checkpointing
        else "no gradient checkpointing: every layer's activations kept",
        "peak at the start of backward (kept activations + the loss's tensors) or in the last block's backward "
        "(gradients, workspace, recomputed block), whichever is larger",
        "fixed overhead: CUDA context" if device == "cuda" else
        "CPU: measured as peak RSS growth; libraries loaded during the run and freed memory malloc keeps counted, "
        "torch runtime in the baseline",
    )
    return Estimate(
        model=str(anatomy.get("model", "")), device=device, compute_dtype=dtype,
        activation_dtype="fp32" if a == FP32 else dtype, quant=cfg.quant, n_modules=len(chosen),
        base_params=base_params, lora_params=lora_params, trainable_params=trainable, total_params=total,
        trainable_pct=100.0 * trainable / total if total else 0.0, adapter_file_bytes=adapter_file,
        base_linear_bytes=linear_bytes, base_other_bytes=other_bytes, lora_bytes=lora_bytes,
        grad_bytes=grad_bytes, optimizer_bytes=optimizer_bytes, activation_bytes=activation_bytes,
        recompute_bytes=recompute,
        logits_bytes=logits_bytes, workspace_bytes=workspace, startup_bytes=startup, framework_bytes=framework,
        allocator_bytes=allocator, mapped_file_bytes=mapped,
        overhead_bytes=overhead, n_targets=n_targets,
        activation_terms=tuple(terms), assumptions=assumptions)


def _linear_weights(modules: Sequence[Mapping[str, Any]], quant: str, c: int) -> tuple[int, int]:
    """(bytes, params) of the weights of the LoRA-able linear layers; biases belong to 'other'.

    bitsandbytes (through transformers' replace_with_bnb_linear) converts every nn.Linear and Conv1D
    except the output head, which the anatomy already leaves out. Biases stay unquantized.
    """
    n_bytes = n_params = 0
    for m in modules:
        n = m["in"] * m["out"]
        n_params += n
        if quant == "none" or m["type"] not in QUANTIZABLE:
            n_bytes += n * c
        elif quant == "8bit":
            n_bytes += int8_bytes(m["in"], m["out"])
        else:
            n_bytes += nf4_bytes(n)
    return n_bytes, n_params


@dataclass(frozen=True)
class _Shape:
    B: int
    T: int
    H: int
    I: int
    V: int
    heads: int
    kv_heads: int
    padded: bool  # a padding mask exists (batch_size > 1)

    @classmethod
    def of(cls, anatomy: Mapping[str, Any], batch_size: int, seq_len: int) -> _Shape:
        H = int(anatomy["hidden_size"])
        heads = int(anatomy.get("num_attention_heads") or 1)
        return cls(B=batch_size, T=seq_len, H=H, I=int(anatomy.get("intermediate_size") or 4 * H),
                   V=int(anatomy["vocab_size"]), heads=heads,
                   kv_heads=int(anatomy.get("num_key_value_heads") or heads), padded=batch_size > 1)


def _activations(anatomy: Mapping[str, Any], chosen: list[dict[str, Any]], cfg: RunConfig, s: _Shape,
                 device: str, a: int, autocast: bool, *, checkpointing: bool | None = None
                 ) -> tuple[list[tuple[str, int]], int]:
    """Bytes autograd keeps for backward, split by what keeps them; and, with gradient checkpointing,
    the bytes of the one block recomputed during its backward (included in the split).

    Only blocks at or above the lowest adapted block run backward; blocks below it keep nothing.
    Without checkpointing every such block keeps its tensors; with (non-reentrant) checkpointing each
    keeps only its input hidden state, and one block at a time is recomputed during backward.
    """
    lo = cfg.lora
    BT = s.B * s.T
    modules = anatomy["modules"]
    layers = sorted({m["layer"] for m in modules if m["layer"] is not None})
    if not chosen:
        return [], 0
    if any(m["layer"] is None for m in chosen):
        lowest = layers[0] if layers else 0
    else:
        lowest = min(m["layer"] for m in chosen)
    backward_layers = [i for i in layers if i >= lowest]
    by_layer: dict[Any, list[dict[str, Any]]] = {}
    for m in modules:
        by_layer.setdefault(m["layer"], []).append(m)
    chosen_by_layer: dict[Any, list[dict[str, Any]]] = {}
    for m in chosen:
        chosen_by_layer.setdefault(m["layer"], []).append(m)
    gated = any(GATED_MLP.search(m["kind"]) for m in modules if m["group"] == "mlp")
    int8_saves_inputs = cfg.quant == "8bit" and device == "cuda"

    def block(i: Any) -> dict[str, int]:
        # In the lowest backward block, a tensor is kept only if a gradient flows into it, i.e. if an
        # adapted module comes before it: its input norm never, attention only after adapted q/k/v, ...
        first = i == lowest and not any(m["layer"] is None for m in chosen)
        adapted = {_stage(m) for m in chosen_by_layer.get(i, [])} if first else {0}
        t: dict[str, int] = {}
        if i is not None:
            # RMSNorm upcasts its input to fp32 and keeps that copy and its fp32 1/rms per position
            # (LayerNorm: its input, mean and 1/std); 2 per block.
            t["norms"] = (2 if not first else int(min(adapted) <= 1)) * BT * (s.H + 1) * FP32
            # SDPA keeps q, k, v, its output and an fp32 logsumexp per head and position. With a padding
            # mask, transformers repeats k, v to every head (repeat_kv) before SDPA.
            kv = s.H if s.padded else s.H * s.kv_heads // s.heads
            attn = 0 in adapted
            t["attention"] = attn * (2 * BT * s.H * a + 2 * BT * kv * a + s.B * s.heads * s.T * FP32)
            # torch turns the boolean (B, 1, T, T) mask into a float bias at every SDPA call and keeps it.
            t["attention mask"] = attn * s.B * s.T * s.T * a if s.padded else 0
            # Gated MLP act(gate)·up keeps gate (activation input), act(gate) and up; a plain MLP keeps
            # the activation's input and output.
            t["mlp"] = (min(adapted) <= 2) * (3 if gated else 2) * BT * s.I * a
        t.update(_lora_block(by_layer.get(i, []), chosen_by_layer.get(i, []), lo, BT, a, autocast, device,
                             int8_saves_inputs, min(adapted) if first else -1))
        return t

    blocks = [block(i) for i in backward_layers]
    total: dict[str, int] = {}
    recompute = 0
    if cfg.train.gradient_checkpointing if checkpointing is None else checkpointing:
        # Each checkpointed block keeps its input (B, T, H); the bool mask is shared by all of them.
        total["checkpointed block inputs"] = len(backward_layers) * BT * s.H * a + (
            s.B * s.T * s.T if s.padded else 0)
        if blocks:
            biggest = max(blocks, key=lambda t: sum(t.values()))
            recompute = sum(biggest.values())
            for k, v in biggest.items():
                total[k] = total.get(k, 0) + v  # the one block recomputed during its backward
    else:
        for t in blocks:
            for k, v in t.items():
                total[k] = total.get(k, 0) + v
    if None in chosen_by_layer:  # adapted modules outside the numbered blocks
        for k, v in block(None).items():
            total[k] = total.get(k, 0) + v
    # The final norm keeps its fp32 input (and 1/rms) for the gradient into the last block.
    total["final norm"] = BT * (s.H + 1) * FP32
    return list(total.items()), recompute


def _stage(m: Mapping[str, Any]) -> int:
    """Order of a module inside its block: 0 attention input projections, 1 attention output, 2 MLP input
    projections, 3 MLP output (other groups count as 0)."""
    group = {"attention": 0, "mlp": 2}.get(m["group"], 0)
    return group + (m["kind"] in OUT_PROJ and m["group"] in ("attention", "mlp"))


def _lora_block(all_mods: list[dict[str, Any]], chosen: list[dict[str, Any]], lo: LoraSpec, BT: int, a: int,
                autocast: bool, device: str, int8_saves_inputs: bool, first_stage: int = -1) -> dict[str, int]:
    """What LoRA (and the 8-bit matmul) keeps in one block.

    lora_A needs its input for dA. Without autocast, with fp32 activations and no dropout, peft passes
    the layer's own input through, so projections that read the same tensor (q, k, v; gate, up) share
    it. Otherwise each LoRA layer keeps a private copy: autocast recasts it to 16-bit (B·T·in·2), or
    dropout makes a new fp32 tensor (B·T·in·4) and keeps its mask (bool on CUDA, fp32 noise on CPU).
    lora_B needs lora_A's output (B·T·r). LoRA-FA freezes A: its input is not kept at all.
    DoRA keeps the base output and the LoRA output (B·T·out each) for the magnitude's gradient.
    bitsandbytes' 8-bit matmul on CUDA keeps a reference to each quantized layer's input.
    In the lowest backward block (first_stage ≥ 0 is its first adapted stage), inputs that no
    gradient reaches keep no dropout mask and no 8-bit reference.
    """
    t = {"lora inputs": 0, "dropout masks": 0, "lora_A outputs": 0, "dora": 0, "shared linear inputs": 0}
    private = autocast or lo.dropout > 0 or a != FP32
    lora_dtype = a if autocast else FP32
    shared: set[tuple[str, str]] = set()

    def share(m: dict[str, Any]) -> None:
        role = "out" if m["kind"] in OUT_PROJ else "in"
        if (m["group"], role) == ("attention", "out"):
            return  # its input is SDPA's output, already counted under attention
        key = (m["group"], role if role == "out" or m["group"] != "other" else m["kind"])
        if key not in shared:
            shared.add(key)
            t["shared linear inputs"] += BT * m["in"] * a

    def grad_reaches(m: Mapping[str, Any]) -> bool:
        return first_stage < 0 or _stage(m) > first_stage

    if int8_saves_inputs:
        for m in all_mods:
            if m["type"] in QUANTIZABLE and grad_reaches(m):
                share(m)
    for m in chosen:
        if not lo.freeze_A:
            if private:
                t["lora inputs"] += BT * m["in"] * lora_dtype
            else:
                share(m)
        if lo.dropout > 0 and grad_reaches(m):
            t["dropout masks"] += BT * m["in"] * (1 if device == "cuda" else FP32)
        t["lora_A outputs"] += BT * lo.r * lora_dtype
        if lo.use_dora:
            # + the magnitude/norm scale and the weight norm (vectors of length out, fp32, kept ~4 times)
            t["dora"] += BT * m["out"] * (a + lora_dtype) + 4 * m["out"] * FP32
    if autocast:
        # autocast keeps a 16-bit copy of each fp32 LoRA weight for the matmuls' backward.
        t["autocast weight copies"] = sum(lo.r * (m["in"] + m["out"]) for m in chosen) * a
    return t


def _logits(s: _Shape, a: int, n_targets: int, packed: bool) -> int:
    """The loss's peak, at the start of backward (engine/train.py token_losses).

    cross_entropy(logits.float()) keeps its fp32 log-softmax output (N × V) for backward; the logits
    themselves and their fp32 upcast are freed after the forward (nothing keeps them). Backward then
    creates the fp32 gradient of the log-probabilities and, inside log_softmax's backward, the fp32
    gradient of the logits while the saved output is still alive: 3 fp32 (N × V) tensors.
    Packed: the head runs on the N target positions only, so that is all.
    Padded: the head runs on all B·T positions and logits[mask] picks the targets; its backward
    scatters the (N × V) gradient into a zero (B, T, V) tensor in the activation dtype (2 such tensors
    live at once), which is the peak when N is close to B·T in fp32.
    """
    if packed:
        return 3 * FP32 * n_targets * s.V
    return max(3 * FP32 * n_targets * s.V, (2 * s.B * s.T + n_targets) * s.V * a)


def _packing_check(s: _Shape, a: int, frac: float) -> int:
    """Transient peak of engine/train.py packing_agrees: no gradients, up to 4 examples of T tokens.

    Its padded reference computes (C, T, V) logits and gathers the targets' rows from them ((C·T + N)·V
    in the activation dtype), then the loss holds the gathered logits, their fp32 upcast and the fp32
    log-probs (N·V·(a + 4 + 4), the upcast being a no-op in fp32); the last hidden states (C, T, H)
    are alive too. Only its excess over the training step counts.
    """
    C = PACKING_CHECK_EXAMPLES
    n = max(1, math.ceil(frac * C * (s.T - 1)))
    upcast = FP32 if a != FP32 else 0
    return s.V * max((C * s.T + n) * a, n * (a + upcast + FP32)) + 2 * C * s.T * s.H * a


def _workspace(anatomy: Mapping[str, Any], chosen: list[dict[str, Any]], cfg: RunConfig, s: _Shape,
               a: int, c: int) -> int:
    """Transient buffers while one block runs backward (not kept, but present at the peak).

    ~3 tensors of B·T·max(H, I) for the incoming and outgoing gradients of the MLP; with quantization,
    bitsandbytes dequantizes the largest weight (compute dtype, then cast to the activation dtype);
    DoRA builds W + s·B·A of its largest module in fp32 to take the column norms.
    """
    work = 3 * s.B * s.T * max(s.H, s.I) * a
    if cfg.quant != "none":
        work += max((m["in"] * m["out"] for m in anatomy["modules"] if m["type"] in QUANTIZABLE), default=0) * (c + a)
    if cfg.lora.use_dora and chosen:
        work += 2 * max(m["in"] * m["out"] for m in chosen) * FP32
    return work


# ---- verdicts ----------------------------------------------------------------------------------------


def fits(est: Estimate, gpus: Sequence[float] = (16, 24, 40, 48, 80), *,
         usable: float = 0.95) -> list[tuple[float, bool]]:
    """(GPU size in GB, whether the estimate fits) per size.

    A card sold as N GB has about N GiB; we keep 5 % for the allocator's fragmentation and the
    driver's reservation, which the estimate does not model.
    """
    return [(g, est.total_bytes <= g * GIB * usable) for g in gpus]


def suggestions(anatomy: Mapping[str, Any], cfg: RunConfig, est: Estimate, budget_gb: float) -> list[str]:
    """Changes that lower memory, each re-estimated, biggest saving first; [] when it already fits.

    Each line gives the new total and the saving; '(fits)' marks those that alone reach the budget.
    A last line combines the biggest savers until the budget is met.
    """
    if est.total_bytes <= budget_gb * GIB:
        return []
    tr = cfg.train
    # est was made on a GPU without bf16 when auto resolved to fp32 on CUDA; keep that for the re-estimates.
    bf16 = not (cfg.dtype == "auto" and est.device == "cuda" and est.compute_dtype == "fp32")
    options: list[tuple[str, dict[str, Any]]] = []
    if cfg.quant != "4bit":
        options.append(("4-bit quantization", {"quant": "4bit"}))
    if cfg.quant == "none" and not cfg.lora.use_dora:
        options.append(("8-bit quantization", {"quant": "8bit"}))
    if tr.batch_size > 1:
        options.append((f"batch_size {tr.batch_size} → 1 with grad_accum ×{tr.batch_size}",
                        {"train": {"batch_size": 1, "grad_accum": tr.grad_accum * tr.batch_size}}))
    if not tr.gradient_checkpointing:
        options.append(("gradient checkpointing", {"train": {"gradient_checkpointing": True}}))
    if tr.max_seq_len >= 256:
        options.append((f"max_seq_len {tr.max_seq_len} → {tr.max_seq_len // 2}",
                        {"train": {"max_seq_len": tr.max_seq_len // 2}}))
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
        new = estimate(anatomy, new_cfg, est.device, bf16_capable=bf16)
        saved = est.total_bytes - new.total_bytes
        if saved > 0.005 * GIB:
            scored.append((saved, label, change, new))
    scored.sort(key=lambda x: -x[0])
    lines = [f"{label}: {new.total_gb:.1f} GB (saves {gb(saved):.1f} GB)"
             + (" (fits)" if new.total_bytes <= budget_gb * GIB else "") for saved, label, _, new in scored]

    # Greedy combination: apply the biggest savers, in order, until the budget is met.
    combo_cfg, used, combo = cfg, [], est
    for _, label, change, _ in scored:
        try:
            trial = combo_cfg.replace(**change)
        except ConfigError:
            continue
        combo_cfg, combo = trial, estimate(anatomy, trial, est.device, bf16_capable=bf16)
        used.append(label)
        if combo.total_bytes <= budget_gb * GIB:
            break
    if len(used) > 1:
        verdict = "fits" if combo.total_bytes <= budget_gb * GIB else f"still over {budget_gb:g} GB"
        lines.append(f"together ({' + '.join(used)}): {combo.total_gb:.1f} GB ({verdict})")
    return lines
