"""The memory terms of a LoRA training step, each from a model's anatomy and a config; stdlib only.
engine.core.estimate adds them up into an Estimate.

Every term is kept separate so that it can be checked against a measurement (bench/memory_accuracy.py).
The terms follow what the trainer (engine/ml/train.py with engine/ml/model.py)
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
  default, engine/ml/data.py collate_packed) a row holds one or more examples with restarting position
  ids and no attention_mask; transformers then builds a block-diagonal (R, 1, L, L) boolean mask from
  the position ids as soon as one row holds a restart (two examples, or one example and a pad tail).
  With padding (packing off) any padded batch gets a (B, 1, T, T) mask. Either way, with batch_size > 1
  SDPA turns the mask into a float bias in every layer and keeps it for backward, and grouped-query
  attention runs on keys/values repeated to every head (repeat_kv); measured on packed rows exactly as
  on padded ones (tests/test_estimate.py). With batch_size 1 there is no mask (a single example has
  no restart) and keys/values stay at num_key_value_heads. Rows that each hold exactly one
  max_seq_len example have no mask either: the estimate keeps the mask, an upper bound.
- The loss: the trainer runs the output head only on positions that have a target, and over them in
  chunks of train.loss_chunk positions (engine/ml/steps.py chunked_head_loss), so at most one chunk's
  logits (chunk × vocab) are alive, never N × vocab; N ≤ batch_size·(max_seq_len − 1) target tokens.
  Every position is assumed to be a target (train_on all, or the worst case of train_on responses)
  unless estimate() gets a target_frac hint. A model whose head fails the start-up check (more than a
  linear layer) computes its full logits instead, which is not modelled.
- At the start of a run the trainer checks, without gradients, that the chunked head and packing give the
  model's own losses on the first 4 examples cut to half a chunk of targets each (engine/ml/steps.py
  fast_paths), so the check stays under the training step; the estimate counts any excess.
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.core.config import LoraSpec, RunConfig

GIB = 1024**3

# Fixed costs outside the tensors we count. torch.cuda.max_memory_allocated() does not see them;
# nvidia-smi does. The CUDA context (driver, cuBLAS/cuDNN handles and kernels) takes 300 MiB–2 GiB
# depending on GPU and library versions (vram.asmirnov.xyz); 0.5 GiB is typical for a single H100/A100
# with torch 2.x. On CPU, a Python process with torch and the engine imported (the trainer's RSS
# baseline) is resident at 0.21 GiB (measured, torch 2.13).
CUDA_CONTEXT_BYTES = 512 * 1024**2
CPU_RUNTIME_BYTES = 220 * 1024**2
# On CPU, part of the process's memory arrives after engine/ml/train.py takes its RSS baseline (right after
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
# engine/ml/steps.py fast_paths checks the chunked head and packing on prep.train[:4] before training.
PACKING_CHECK_EXAMPLES = 4
PACKING_CHECK_TARGETS = 32  # ... each cut to this many targets, the head run this many positions at a time

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
NF4_DOUBLE_QUANT = True  # engine/ml/model.py always loads 4-bit with bnb_4bit_use_double_quant=True
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
# The per-module key suffixes of each method live in engine.core.variants.counts.

# Output projections: their input is the attention output or the MLP intermediate, not the block's
# normalised hidden state that the other projections of the same group share.
OUT_PROJ = frozenset({"o_proj", "out_proj", "c_proj", "dense", "wo", "w2", "down_proj", "fc2", "dense_4h_to_h", "proj"})
GATED_MLP = re.compile(r"gate|^w1$|^w3$|^wi_0$")
QUANTIZABLE = frozenset({"Linear", "Conv1D", "Linear4bit", "Linear8bitLt"})  # transformers 5 converts both


def gb(n_bytes: float) -> float:
    """Bytes → GiB."""
    return n_bytes / GIB


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


def linear_weights(modules: Sequence[Mapping[str, Any]], quant: str, c: int) -> tuple[int, int]:
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
class Shape:
    B: int
    T: int
    H: int
    I: int
    V: int
    heads: int
    kv_heads: int
    padded: bool  # an attention mask exists (worst case: batch_size > 1)

    @classmethod
    def of(cls, anatomy: Mapping[str, Any], batch_size: int, seq_len: int, *, masked: bool | None = None) -> Shape:
        """batch_size rows of seq_len; masked: whether transformers builds an attention mask (default: with
        more than one row, the worst case; engine.core.batching.batch_shape knows it for real micro-batches)."""
        H = int(anatomy["hidden_size"])
        heads = int(anatomy.get("num_attention_heads") or 1)
        return cls(
            B=batch_size,
            T=seq_len,
            H=H,
            I=int(anatomy.get("intermediate_size") or 4 * H),
            V=int(anatomy["vocab_size"]),
            heads=heads,
            kv_heads=int(anatomy.get("num_key_value_heads") or heads),
            padded=batch_size > 1 if masked is None else masked,
        )


def activations(
    anatomy: Mapping[str, Any],
    chosen: list[dict[str, Any]],
    cfg: RunConfig,
    s: Shape,
    device: str,
    a: int,
    autocast: bool,
    *,
    checkpointing: bool | None = None,
) -> tuple[list[tuple[str, int]], int]:
    """Bytes autograd keeps for backward, split by what keeps them; and, with gradient checkpointing,
    the bytes of the one block recomputed during its backward (included in the split).

    Only blocks at or above the lowest adapted block run backward; blocks below it keep nothing.
    Without checkpointing every such block keeps its tensors; with (non-reentrant) checkpointing each
    keeps only its input hidden state, and one block at a time is recomputed during backward.
    """
    if not chosen:
        return [], 0
    modules = anatomy["modules"]
    layers = sorted({m["layer"] for m in modules if m["layer"] is not None})
    outside = any(m["layer"] is None for m in chosen)
    lowest = (layers[0] if layers else 0) if outside else min(m["layer"] for m in chosen)
    by_layer: dict[Any, list[dict[str, Any]]] = {}
    for m in modules:
        by_layer.setdefault(m["layer"], []).append(m)
    chosen_by_layer: dict[Any, list[dict[str, Any]]] = {}
    for m in chosen:
        chosen_by_layer.setdefault(m["layer"], []).append(m)
    ctx = _Block(
        s=s,
        lo=cfg.lora,
        a=a,
        autocast=autocast,
        device=device,
        lowest=None if outside else lowest,
        gated=any(GATED_MLP.search(m["kind"]) for m in modules if m["group"] == "mlp"),
        int8_saves_inputs=cfg.quant == "8bit" and device == "cuda",
    )
    backward_layers = [i for i in layers if i >= lowest]
    blocks = [ctx.terms(i, by_layer.get(i, []), chosen_by_layer.get(i, [])) for i in backward_layers]
    total: dict[str, int] = {}
    recompute = 0
    if cfg.train.gradient_checkpointing if checkpointing is None else checkpointing:
        # Each checkpointed block keeps its input (B, T, H); the bool mask is shared by all of them.
        BT = s.B * s.T
        total["checkpointed block inputs"] = len(backward_layers) * BT * s.H * a + (s.B * s.T * s.T if s.padded else 0)
        if blocks:
            biggest = max(blocks, key=lambda t: sum(t.values()))
            recompute = sum(biggest.values())
            _add(total, biggest)  # the one block recomputed during its backward
    else:
        for t in blocks:
            _add(total, t)
    if None in chosen_by_layer:  # adapted modules outside the numbered blocks
        _add(total, ctx.terms(None, by_layer.get(None, []), chosen_by_layer[None]))
    # The final norm keeps its fp32 input (and 1/rms) for the gradient into the last block.
    total["final norm"] = s.B * s.T * (s.H + 1) * FP32
    return list(total.items()), recompute


def _add(total: dict[str, int], terms: Mapping[str, int]) -> None:
    for k, v in terms.items():
        total[k] = total.get(k, 0) + v


@dataclass(frozen=True)
class _Block:
    """What one transformer block keeps for backward, given the run's shape and settings."""

    s: Shape
    lo: LoraSpec
    a: int  # activation bytes
    autocast: bool
    device: str
    lowest: int | None  # the lowest adapted block (None: some adapted module is outside the blocks)
    gated: bool  # gated MLP (act(gate)·up)
    int8_saves_inputs: bool

    def terms(self, i: Any, mods: list[dict[str, Any]], chosen: list[dict[str, Any]]) -> dict[str, int]:
        s, a, BT = self.s, self.a, self.s.B * self.s.T
        # In the lowest backward block, a tensor is kept only if a gradient flows into it, i.e. if an
        # adapted module comes before it: its input norm never, attention only after adapted q/k/v, ...
        first = i is not None and i == self.lowest
        adapted = {_stage(m) for m in chosen} if first else {0}
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
            t["mlp"] = (min(adapted) <= 2) * (3 if self.gated else 2) * BT * s.I * a
        t.update(
            _lora_block(
                mods,
                chosen,
                self.lo,
                BT,
                a,
                self.autocast,
                self.device,
                self.int8_saves_inputs,
                min(adapted) if first else -1,
            )
        )
        return t


def _stage(m: Mapping[str, Any]) -> int:
    """Order of a module inside its block: 0 attention input projections, 1 attention output, 2 MLP input
    projections, 3 MLP output (other groups count as 0)."""
    group = {"attention": 0, "mlp": 2}.get(m["group"], 0)
    return group + (m["kind"] in OUT_PROJ and m["group"] in ("attention", "mlp"))


def _lora_block(
    all_mods: list[dict[str, Any]],
    chosen: list[dict[str, Any]],
    lo: LoraSpec,
    BT: int,
    a: int,
    autocast: bool,
    device: str,
    int8_saves_inputs: bool,
    first_stage: int = -1,
) -> dict[str, int]:
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


LOSS_CHUNK_BYTES = 64 * 1024**2  # train.loss_chunk = 0: one fp32 chunk of logits at most this big
LOSS_CHUNK_MIN_ROWS = 128  # ... but never fewer positions than this (small matmuls waste the head's speed)


def loss_chunk_rows(setting: int, vocab: int) -> int:
    """Positions whose logits the loss computes at once (train.loss_chunk; 0 = auto from the vocabulary)."""
    if setting > 0:
        return setting
    return max(LOSS_CHUNK_MIN_ROWS, LOSS_CHUNK_BYTES // (FP32 * max(1, vocab)))


def logits(s: Shape, a: int, n_targets: int, chunk: int) -> int:
    """The loss's peak, at the end of the forward (engine/ml/steps.py chunked_head_loss).

    The head runs on the N target positions only, `chunk` rows at a time (c = min(N, chunk)): one chunk's
    logits in the activation dtype, upcast to one fp32 (c × V) buffer that log-sum-exp and the softmax
    gradient reuse in place, and (16-bit) its cast back for the gradient matmul. Alive beside it for the
    whole loss: the N target hidden states and their gradient, made in the forward chunk by chunk
    ((softmax − one-hot)·W, c × H at a time) and kept for backward, which only scales it. Nothing
    N × vocab is alive.
    """
    c = max(1, min(n_targets, chunk))
    return c * s.V * (FP32 + (a if a != FP32 else 0)) + (2 * n_targets + c) * s.H * a


def packing_check(s: Shape, a: int, C: int, T: int, n: int) -> int:
    """Transient peak of engine/ml/steps.py fast_paths: no gradients, C (≤ 4) examples cut to at most
    PACKING_CHECK_TARGETS targets each, the longest of T tokens, n targets in all (before the cut).

    Its reference runs the model one example at a time with the head on that example's targets only
    (logits_to_keep): their logits, the fp32 upcast and the log-probs (m·V·(a + 4 + 4), the upcast a
    no-op in fp32) beside the example's last hidden states; then the chunked head on all of them.
    Only its excess over the training step counts (in practice none: the step keeps every activation).
    """
    limit = PACKING_CHECK_TARGETS
    m = max(1, min(n, limit))
    upcast = FP32 if a != FP32 else 0
    reference = m * s.V * (a + upcast + FP32) + 2 * min(T, s.T) * s.H * a
    return max(reference, logits(s, a, min(n, C * limit), limit))


def workspace(
    anatomy: Mapping[str, Any], chosen: list[dict[str, Any]], cfg: RunConfig, s: Shape, a: int, c: int
) -> int:
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
