"""The calculator against real models: exact parameter counts, the trainer's module choice, real
bitsandbytes storage, and the bytes autograd really keeps for backward (walked on CPU)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from engine.core.config import RunConfig
from engine.core.estimate import (
    CPU_RUNTIME_BYTES,
    CUDA_CONTEXT_BYTES,
    GIB,
    Estimate,
    estimate,
    fits,
    gb,
    nf4_bytes,
    suggestions,
)
from tests.tiny import build_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_llama_bias_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-bias"), attention_bias=True, mlp_bias=True)


@pytest.fixture(scope="session")
def wide_llama_dir(tmp_path_factory):
    """Big enough that every weight is a whole number of 64-element NF4 blocks and 256-block groups."""
    return build_tiny_llama(
        tmp_path_factory.mktemp("wide-llama"),
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


@pytest.fixture(scope="session")
def act_llama_dir(tmp_path_factory):
    """hidden ≠ intermediate so that the activation terms can be told apart."""
    return build_tiny_llama(
        tmp_path_factory.mktemp("act-llama"),
        hidden_size=64,
        intermediate_size=160,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


@pytest.fixture
def model_dirs(tiny_llama_dir, tiny_gpt2_dir, tiny_llama_bias_dir):
    return {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir, "llama-bias": tiny_llama_bias_dir}


def make_cfg(path: Path, lora: dict | None = None, train: dict | None = None, **top) -> RunConfig:
    return RunConfig.from_dict({"model": str(path), "lora": lora or {}, "train": train or {}, **top})


def build_peft(path: Path, cfg: RunConfig):
    """The trainer's path: load_base_model → attach_lora (→ LoRA-FA's optimizer freezes A)."""
    from engine.ml.model import attach_lora, load_base_model, pick_device

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_base_model(str(path), cfg, pick_device())
        peft_model = attach_lora(model, cfg)
    if cfg.lora.freeze_A:
        from peft.optimizers import create_lorafa_optimizer

        create_lorafa_optimizer(peft_model, r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lr=1e-4)
    return peft_model


# ---- 2. exact parameter counts ------------------------------------------------------------------

COUNT_CASES = [
    ("llama", {"targets": ["qv"], "r": 1}),
    ("llama", {"targets": ["attention"], "r": 4}),
    ("llama", {"targets": ["mlp"], "r": 8}),
    ("llama", {"targets": ["all-linear"], "r": 8}),
    ("llama", {"targets": ["all-linear"], "r": 4, "layers": [0]}),
    ("llama", {"targets": ["k_proj", "down_proj"], "r": 8, "layers": [1]}),
    ("llama", {"targets": ["all-linear"], "r": 4, "use_dora": True}),
    ("llama", {"targets": ["all-linear"], "r": 8, "freeze_A": True}),
    ("llama-bias", {"targets": ["all-linear"], "r": 8}),
    ("llama-bias", {"targets": ["qv"], "r": 4, "use_dora": True, "layers": [1]}),
    ("gpt2", {"targets": ["qv"], "r": 1}),
    ("gpt2", {"targets": ["all-linear"], "r": 8}),
    ("gpt2", {"targets": ["mlp"], "r": 4, "layers": [1]}),
    ("gpt2", {"targets": ["c_proj"], "r": 4}),
    ("gpt2", {"targets": ["all-linear"], "r": 4, "use_dora": True}),
    ("gpt2", {"targets": ["attention"], "r": 8, "freeze_A": True, "layers": [0]}),
]


@pytest.mark.parametrize("name,lora", COUNT_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(COUNT_CASES)])
def test_parameter_counts_are_exact(name, lora, model_dirs, anatomy_of):
    path = model_dirs[name]
    cfg = make_cfg(path, lora)
    est = estimate(anatomy_of(path), cfg, device="cpu")
    peft_model = build_peft(path, cfg)
    params = list(peft_model.parameters())
    assert est.trainable_params == sum(p.numel() for p in params if p.requires_grad)
    assert est.lora_params == sum(p.numel() for n, p in peft_model.named_parameters() if ".lora_" in n)
    assert est.total_params == sum(p.numel() for p in params)
    assert (est.trainable_params, est.total_params) == peft_model.get_nb_trainable_parameters()
    assert est.n_modules == sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))
    assert est.trainable_pct == pytest.approx(100 * est.trainable_params / est.total_params)
    if cfg.lora.freeze_A:  # LoRA-FA: only B trains, and A is still in the adapter
        assert est.trainable_params < est.lora_params


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama-bias"])
def test_total_params_of_anatomy_equals_loaded_model(name, model_dirs, anatomy_of):
    from engine.ml.model import load_base_model, pick_device

    path = model_dirs[name]
    model = load_base_model(str(path), make_cfg(path), pick_device())
    assert anatomy_of(path)["total_params"] == sum(p.numel() for p in model.parameters())
    assert estimate(anatomy_of(path), make_cfg(path)).base_params == anatomy_of(path)["total_params"]


@pytest.mark.parametrize(
    "name,lora", [("llama", {"r": 8}), ("gpt2", {"targets": ["qv"], "r": 2}), ("llama", {"r": 4, "use_dora": True})]
)
def test_adapter_file_size(name, lora, model_dirs, anatomy_of, tmp_path):
    path = model_dirs[name]
    cfg = make_cfg(path, lora)
    build_peft(path, cfg).save_pretrained(tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    size = f.stat().st_size
    est = estimate(anatomy_of(path), cfg, device="cpu")
    header = struct.unpack("<Q", f.read_bytes()[:8])[0]
    assert size - header - 8 == est.lora_params * 4  # the data part is exact: fp32 LoRA weights
    assert est.adapter_file_bytes == pytest.approx(size, rel=0.03)  # the header is approximated


# ---- 3. quantized storage against bitsandbytes ------------------------------------------------------


def stored_bytes(model) -> int:
    """Every byte the loaded model holds: parameters, their int8 scales, 4-bit quant states, buffers."""
    import torch

    seen: dict[int, int] = {}

    def add(t) -> None:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()

    for p in model.parameters():
        add(p)
        for v in vars(p).values():  # Int8Params: CB (shares the weight's storage), SCB
            add(v)
        qs = getattr(p, "quant_state", None)
        while qs is not None:  # Params4bit: absmax, code, offset; nested state2 for double quantization
            for k in ("absmax", "code", "offset"):
                add(getattr(qs, k, None))
            qs = getattr(qs, "state2", None)
    for b in model.buffers():
        add(b)
    return sum(seen.values())


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
@pytest.mark.parametrize("which", ["wide-llama", "gpt2"])
def test_quantized_weights_match_bitsandbytes_storage(quant, which, wide_llama_dir, tiny_gpt2_dir, anatomy_of):
    pytest.importorskip("bitsandbytes")
    import torch

    from engine.ml.model import load_base_model

    path = wide_llama_dir if which == "wide-llama" else tiny_gpt2_dir
    cfg = make_cfg(path, quant=quant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_base_model(str(path), cfg, torch.device("cpu"))
    real = stored_bytes(model)
    est = estimate(anatomy_of(path), cfg, device="cpu")
    assert est.weights_bytes == pytest.approx(real, rel=0.05)
    # and the quantized part alone, from the layers themselves
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    assert len(layers) == len(anatomy_of(path)["modules"])  # GPT-2's Conv1D layers are quantized too
    real_linear = stored_bytes(torch.nn.ModuleList(layers)) - sum(
        m.bias.numel() * m.bias.element_size() for m in layers if m.bias is not None
    )
    assert est.base_linear_bytes == pytest.approx(real_linear, rel=0.01)


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_kbit_training_keeps_unquantized_weights_in_fp32(quant, wide_llama_dir, anatomy_of):
    """attach_lora → prepare_model_for_kbit_training upcasts embeddings, norms and lm_head from bf16."""
    pytest.importorskip("bitsandbytes")
    cfg = make_cfg(wide_llama_dir, quant=quant, dtype="bf16")
    peft_model = build_peft(wide_llama_dir, cfg)
    lora = sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters() if ".lora_" in n)
    est = estimate(anatomy_of(wide_llama_dir), cfg, device="cpu")
    assert est.lora_bytes == lora
    assert est.weights_bytes == pytest.approx(stored_bytes(peft_model) - lora, rel=0.05)


def test_nf4_bits_per_parameter_match_qlora():
    n = 4096 * 4096
    extra_bits = (nf4_bytes(n) - n // 2) * 8 / n  # QLoRA §3: 8/64 + 32/(64·256) = 0.127 bits
    assert extra_bits == pytest.approx(0.127, abs=0.002)
    assert (nf4_bytes(n, double_quant=False) - n // 2) * 8 / n == pytest.approx(0.5, abs=0.002)


# ---- 4. activations against what autograd keeps ------------------------------------------------------


def saved_for_backward(loss, model) -> int:
    """Bytes of the distinct tensors the autograd graph keeps for backward (parameters excluded)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for attr in dir(node):
            if attr.startswith("_saved_"):
                try:
                    value = getattr(node, attr)
                except RuntimeError:
                    continue
                for t in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
                        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(n for n, _ in node.next_functions)
    return sum(storages.values())


ACT_CASES = [
    ({"dtype": "fp32"}, {}),
    ({"dtype": "bf16"}, {}),  # autocast: 16-bit private LoRA inputs
    ({"dtype": "fp32"}, {"dropout": 0.1}),
    ({"dtype": "bf16"}, {"dropout": 0.1}),
    ({"dtype": "fp32"}, {"targets": ["qv"]}),
    ({"dtype": "bf16"}, {"targets": ["mlp"]}),  # the lowest block keeps no attention
    ({"dtype": "fp32"}, {"layers": [1]}),  # block 0 keeps nothing
    ({"dtype": "fp32"}, {"use_dora": True}),
    ({"dtype": "bf16"}, {"freeze_A": True}),
    ({"dtype": "bf16", "quant": "4bit"}, {}),  # fp32 activations after k-bit preparation
    ({"dtype": "fp32", "train": {"batch_size": 1}}, {}),  # no padding mask, k/v at kv heads
]


@pytest.mark.parametrize("top,lora", ACT_CASES, ids=[str(i) for i in range(len(ACT_CASES))])
def test_activation_bytes_match_autograd_saved_tensors(top, lora, act_llama_dir, anatomy_of):
    """On CPU, SDPA's flash kernel keeps the same O(T) tensors as the GPU's memory-efficient one."""
    import torch

    from engine.ml.model import attach_lora, load_base_model

    if top.get("quant"):
        pytest.importorskip("bitsandbytes")
    top = dict(top)
    train = {"batch_size": 2, "max_seq_len": 32, **top.pop("train", {})}
    cfg = make_cfg(act_llama_dir, {"r": 3, "dropout": 0.0, **lora}, train, **top)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = attach_lora(load_base_model(str(act_llama_dir), cfg, torch.device("cpu")), cfg)
    if cfg.lora.freeze_A:
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.requires_grad_(False)
    model.train()
    B, T = cfg.train.batch_size, cfg.train.max_seq_len
    torch.manual_seed(0)
    ids = torch.randint(12, 100, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    if B > 1:
        mask[0, -5:] = 0  # padding, as in a real batch
    # as engine/ml/train.py runs a micro-batch
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bf16" and cfg.quant == "none"):
        logits = model(input_ids=ids, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    V = logits.shape[-1]
    measured = saved_for_backward(loss, model) - B * (T - 1) * V * 4  # log-softmax output: the logits term's
    est = estimate(anatomy_of(act_llama_dir), cfg, device="cpu")
    # What is left out: RoPE's cos/sin tables, scalars and the int64 targets (about 1 % here, far less
    # at real sizes).
    assert est.activation_bytes == pytest.approx(measured, rel=0.03)


# ---- 5. directions --------------------------------------------------------------------------------


def test_memory_grows_with_rank_batch_and_sequence(tiny_llama_dir, anatomy_of):
    anatomy = anatomy_of(tiny_llama_dir)

    def total(lora=None, train=None) -> int:
        return estimate(anatomy, make_cfg(tiny_llama_dir, lora, train)).total_bytes

    assert total({"r": 4}) < total({"r": 8}) < total({"r": 16})
    assert total(train={"batch_size": 1}) < total(train={"batch_size": 2}) < total(train={"batch_size": 8})
    assert total(train={"max_seq_len": 128}) < total(train={"max_seq_len": 256}) < total(train={"max_seq_len": 1024})
    e8, e16 = (estimate(anatomy, make_cfg(tiny_llama_dir, {"r": r})) for r in (8, 16))
    assert e16.lora_bytes == 2 * e8.lora_bytes and e16.optimizer_bytes == 2 * e8.optimizer_bytes


def test_quantization_shrinks_the_weights(wide_llama_dir, anatomy_of):
    anatomy = anatomy_of(wide_llama_dir)
    w = {
        q: estimate(anatomy, make_cfg(wide_llama_dir, quant=q, dtype="bf16")).base_linear_bytes
        for q in ("none", "8bit", "4bit")
    }
    assert w["4bit"] < w["8bit"] < w["none"]
    assert w["8bit"] / w["none"] == pytest.approx(0.5, rel=0.05)  # int8 vs bf16
    assert w["4bit"] / w["none"] == pytest.approx(0.266, rel=0.05)  # (4 + 0.127 + tables) / 16 bits


def test_checkpointing_and_lora_fa_lower_memory(tiny_llama_dir, anatomy_of):
    anatomy = anatomy_of(tiny_llama_dir)
    train = {"batch_size": 4, "max_seq_len": 512}
    plain = estimate(anatomy, make_cfg(tiny_llama_dir, train=train))
    ckpt = estimate(anatomy, make_cfg(tiny_llama_dir, train={**train, "gradient_checkpointing": True}))
    assert ckpt.activation_bytes < plain.activation_bytes
    assert dict(ckpt.activation_terms)["checkpointed block inputs"] > 0
    fa = estimate(anatomy, make_cfg(tiny_llama_dir, {"freeze_A": True}, train))
    assert fa.grad_bytes < plain.grad_bytes and fa.optimizer_bytes < plain.optimizer_bytes
    assert fa.activation_bytes < plain.activation_bytes and fa.lora_bytes == plain.lora_bytes


def test_dtype_and_device(tiny_llama_dir, anatomy_of):
    anatomy = anatomy_of(tiny_llama_dir)
    cfg = make_cfg(tiny_llama_dir)  # dtype auto
    gpu, cpu = estimate(anatomy, cfg, "cuda"), estimate(anatomy, cfg, "cpu")
    assert (gpu.compute_dtype, cpu.compute_dtype) == ("bf16", "fp32")
    assert estimate(anatomy, cfg, "cuda", bf16_capable=False).compute_dtype == "fp32"
    assert gpu.weights_bytes == anatomy["total_params"] * 2 and cpu.weights_bytes == anatomy["total_params"] * 4
    assert (gpu.overhead_bytes, cpu.overhead_bytes) == (CUDA_CONTEXT_BYTES, CPU_RUNTIME_BYTES)
    with pytest.raises(ValueError, match="cuda"):
        estimate(anatomy, cfg, "tpu")


def test_cpu_counts_libraries_and_the_heap_malloc_keeps(tiny_llama_dir, anatomy_of):
    """The trainer measures CPU peaks as RSS growth: framework + glibc's kept heap (the uncheckpointed
    activations once more, measured by bench/memory_accuracy.py); CUDA's max_memory_allocated sees tensors only."""
    from engine.core.estimate import CPU_FRAMEWORK_BYTES, CPU_HEAP_KEPT_FRACTION_CHECKPOINTED

    anatomy = anatomy_of(tiny_llama_dir)
    cfg = make_cfg(tiny_llama_dir, {"dropout": 0.0}, {"batch_size": 4, "max_seq_len": 256})  # (CPU masks are fp32)
    cpu, gpu = estimate(anatomy, cfg, "cpu"), estimate(anatomy, cfg.replace(dtype="fp32"), "cuda")
    assert (gpu.framework_bytes, gpu.allocator_bytes) == (0, 0) and gpu.tensor_bytes == gpu.allocated_bytes
    assert cpu.framework_bytes == CPU_FRAMEWORK_BYTES and cpu.allocator_bytes == cpu.activation_bytes
    assert cpu.allocated_bytes == cpu.tensor_bytes + cpu.framework_bytes + cpu.allocator_bytes
    assert cpu.tensor_bytes == gpu.tensor_bytes  # the same fp32 tensors on both devices
    ckpt = estimate(anatomy, cfg.replace(train={"gradient_checkpointing": True}), "cpu")
    assert ckpt.activation_bytes < cpu.activation_bytes
    assert ckpt.allocator_bytes == int(CPU_HEAP_KEPT_FRACTION_CHECKPOINTED * cpu.activation_bytes)
    labels = [label for label, _, _ in cpu.table_rows()]
    assert "freed memory malloc keeps (CPU)" in labels and "libraries loaded during the run" in labels
    # Quantized on CPU from an fp32 checkpoint: the file stays mapped, its linear layers resident.
    assert anatomy["torch_dtype"] == "float32" and cpu.mapped_file_bytes == 0
    q = estimate(anatomy, cfg.replace(quant="4bit"), "cpu")
    assert q.mapped_file_bytes == 4 * sum(m["in"] * m["out"] for m in anatomy["modules"])
    assert estimate(anatomy, cfg.replace(quant="4bit"), "cuda").mapped_file_bytes == 0
    assert estimate({**anatomy, "torch_dtype": "bfloat16"}, cfg.replace(quant="4bit"), "cpu").mapped_file_bytes == 0


def test_weight_bytes_of_a_bf16_peft_model(tiny_llama_dir, anatomy_of):
    """Base weights in the compute dtype, LoRA weights in fp32 (peft's autocast_adapter_dtype)."""
    cfg = make_cfg(tiny_llama_dir, {"use_dora": True}, dtype="bf16")
    peft_model = build_peft(tiny_llama_dir, cfg)
    est = estimate(anatomy_of(tiny_llama_dir), cfg, device="cpu")
    named = list(peft_model.named_parameters())
    assert est.lora_bytes == sum(p.numel() * p.element_size() for n, p in named if ".lora_" in n)
    assert est.weights_bytes == sum(p.numel() * p.element_size() for n, p in named if ".lora_" not in n)


def live_tensor_tracker():
    """A TorchDispatchMode adding up the bytes of every distinct live tensor storage that an op creates:
    `current` and `peak` are the CPU counterpart of torch.cuda.memory_allocated / max_memory_allocated.
    Tensors made before it was entered (the model's weights) are added with track()."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveTensorBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live, self.current, self.peak = {}, 0, 0

        def _free(self, key):
            n = self.live.pop(key, (0, None))[0]
            self.current -= n

        def track(self, t):
            if not isinstance(t, torch.Tensor):
                return
            st = t.untyped_storage()
            key, n = st.data_ptr(), st.nbytes()
            if n and key not in self.live:
                self.live[key] = (n, weakref.ref(st, lambda _r, k=key: self._free(k)))
                self.current += n
                self.peak = max(self.peak, self.current)

        def sizes(self):
            return sorted((n for n, _ in self.live.values()), reverse=True)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                self.track(t)
            return out

    return LiveTensorBytes()


def make_examples(lengths: list[int], seed: int = 0):
    """Examples of these token lengths, every token a target (train_on all)."""
    import random

    from engine.ml.data import Example

    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = tuple(rng.randrange(12, 100) for _ in range(n))
        out.append(Example(ids, ids))
    return out


def peft_on_cpu(path: Path, cfg: RunConfig):
    import torch

    from engine.ml.model import attach_lora, load_base_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = attach_lora(load_base_model(str(path), cfg, torch.device("cpu")), cfg)
    model.train()
    return model


@pytest.fixture(scope="session")
def vocab_llama_dir(tmp_path_factory):
    """A vocabulary big enough that the loss's N × vocab tensors stand out."""
    return build_tiny_llama(
        tmp_path_factory.mktemp("vocab-llama"),
        hidden_size=64,
        intermediate_size=160,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=3000,
    )


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_logits_term_is_one_chunk_of_logits(dtype, vocab_llama_dir, anatomy_of):
    """engine/ml/steps.py chunked_head_loss: the loss's peak is one chunk's logits (fp32, plus the 16-bit
    logits / their cast back under bf16) beside the targets' hidden states and their gradient, counted
    tensor by tensor; nothing N × vocab is ever alive."""
    import torch

    from engine.ml import data as D
    from engine.ml.steps import chunked_head_loss

    B, T, chunk = 2, 48, 40
    cfg = make_cfg(
        vocab_llama_dir,
        {"dropout": 0.0},
        {"batch_size": B, "max_seq_len": T, "loss_chunk": chunk},
        dtype=dtype,
        train_on="all",
    )
    model = peft_on_cpu(vocab_llama_dir, cfg)
    batch = D.collate_packed(make_examples([T, T]), 0, T)
    mask = batch["targets"] != D.IGNORE
    tracker = live_tensor_tracker()
    for t in [*model.parameters(), *model.buffers()]:
        tracker.track(t)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        base = model.get_base_model()
        hidden = base.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
        before = tracker.current
        with tracker:
            losses = chunked_head_loss(hidden[mask], base.get_output_embeddings(), batch["targets"][mask], chunk)
    losses.sum().backward()
    est = estimate(anatomy_of(vocab_llama_dir), cfg, device="cpu")
    V, N = anatomy_of(vocab_llama_dir)["vocab_size"], B * (T - 1)
    assert est.n_targets == N == len(losses) and est.loss_chunk == chunk
    assert tracker.peak - before == pytest.approx(est.logits_bytes, rel=0.02)
    assert tracker.peak - before < N * V * 4 and est.logits_bytes < N * V * 4  # under one fp32 full logits


PACKED_CASES = [
    ({"dtype": "fp32"}, [32, 30]),  # a pad tail in row 2: block-diagonal mask, repeated k/v
    ({"dtype": "bf16"}, [32, 31, 30, 32]),
    ({"dtype": "fp32"}, [32, 12, 18]),  # two examples share a row (R = 2 rows for B = 3)
    ({"dtype": "fp32", "train": {"batch_size": 1}}, [32]),
]


@pytest.mark.parametrize("top,lengths", PACKED_CASES, ids=[str(i) for i in range(len(PACKED_CASES))])
def test_packed_rows_keep_what_the_estimate_says(top, lengths, act_llama_dir, anatomy_of):
    """Packed micro-batches through token_losses' fast path: transformers builds the (R, 1, L, L) mask from
    the restarting position ids; activations match the estimate of full rows, or stay below it."""
    import torch

    from engine.ml import data as D
    from engine.ml.steps import token_losses

    top = dict(top)
    T = 32
    train = {"batch_size": len(lengths), "max_seq_len": T, **top.pop("train", {})}
    cfg = make_cfg(act_llama_dir, {"r": 3, "dropout": 0.0}, train, train_on="all", **top)
    model = peft_on_cpu(act_llama_dir, cfg)
    batch = D.collate_packed(make_examples(lengths), 0, T)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bf16"):
        losses = token_losses(model, batch, fast=True)
    loss = losses.sum() / len(losses)
    measured = saved_for_backward(loss, model)  # the chunked loss keeps no N × vocab tensor
    est = estimate(anatomy_of(act_llama_dir), cfg, device="cpu")
    R, L = batch["input_ids"].shape
    if len(lengths) == R and L == T:  # full rows: the estimate's case
        assert est.activation_bytes == pytest.approx(measured, rel=0.03)
    else:  # fewer or shorter rows: an upper bound
        assert measured < est.activation_bytes


@pytest.mark.parametrize(
    "train", [{}, {"gradient_checkpointing": True}, {"batch_size": 1}], ids=["plain", "checkpointing", "b1"]
)
@pytest.mark.parametrize("lora", [{}, {"use_dora": True}], ids=["lora", "dora"])
def test_peak_of_a_training_step_matches_live_tensor_bytes(train, lora, vocab_llama_dir, anatomy_of):
    """One micro-batch as engine/ml/train.py runs it (packed rows, token_losses, backward), counting every
    live tensor: the peak equals weights + LoRA + kept activations + the larger moment (the loss's
    tensors, or the last block's gradients, workspace and recomputed block). No optimizer step yet."""
    from engine.ml import data as D
    from engine.ml.steps import token_losses

    T = 64
    train = {"batch_size": 3, "max_seq_len": T, **train}
    cfg = make_cfg(vocab_llama_dir, {"r": 8, "dropout": 0.05, **lora}, train, dtype="fp32", train_on="all")
    model = peft_on_cpu(vocab_llama_dir, cfg)  # attach_lora turns checkpointing on as the trainer does
    B = cfg.train.batch_size
    batch = D.collate_packed(make_examples([T, T - 2, T - 1][:B]), 0, T)
    tracker = live_tensor_tracker()
    for t in [*model.parameters(), *model.buffers()]:
        tracker.track(t)
    with tracker:
        (token_losses(model, batch, fast=True).sum() / (B * T)).backward()
    est = estimate(anatomy_of(vocab_llama_dir), cfg, device="cpu")
    expected = est.tensor_bytes - est.optimizer_bytes - est.startup_bytes
    # checkpointing: the last block's moment is the peak now (the chunked loss is small), ~2 % above the
    # estimate's count of it (the head's incoming gradients in flight)
    assert tracker.peak == pytest.approx(expected, rel=0.03 if cfg.train.gradient_checkpointing else 0.02)


def test_start_up_check_is_never_the_peak(vocab_llama_dir, anatomy_of):
    """engine/ml/steps.py fast_paths runs 4 examples without gradients before training, cut to 32 targets
    each: even with batch_size 1 (where the old full-logits check was the run's peak) it
    stays under the training step, and the estimate says so."""
    import torch

    from engine.ml import data as D
    from engine.ml.steps import fast_paths, token_losses

    T = 64
    cfg = make_cfg(
        vocab_llama_dir, {"r": 8, "dropout": 0.0}, {"batch_size": 1, "max_seq_len": T}, dtype="fp32", train_on="all"
    )
    model = peft_on_cpu(vocab_llama_dir, cfg)
    check, step = live_tensor_tracker(), live_tensor_tracker()
    for t in [*model.parameters(), *model.buffers()]:
        check.track(t)
        step.track(t)
    with check:
        paths = fast_paths(
            model, make_examples([T, T, T - 1, T]), 0, T, torch.device("cpu"), torch.autocast("cpu", enabled=False)
        )
    assert paths.head and paths.packed
    with step:
        (token_losses(model, D.collate_packed(make_examples([T]), 0, T), fast=True).sum() / T).backward()
    assert check.peak < step.peak
    est = estimate(anatomy_of(vocab_llama_dir), cfg, device="cpu")
    assert est.startup_bytes == 0
    assert step.peak == pytest.approx(est.tensor_bytes - est.optimizer_bytes, rel=0.02)


def test_target_fraction_hint(tiny_llama_dir, anatomy_of):
    anatomy = anatomy_of(tiny_llama_dir)
    cfg = make_cfg(tiny_llama_dir, train={"batch_size": 4, "max_seq_len": 101})
    worst = estimate(anatomy, cfg)
    assert worst.n_targets == 4 * 100  # responses: the worst case by default
    quarter = estimate(anatomy, cfg, target_frac=0.25)
    assert quarter.n_targets == 100 and quarter.logits_bytes < worst.logits_bytes
    everything = cfg.replace(train_on="all")
    assert estimate(anatomy, everything, target_frac=0.25).n_targets == 400  # train_on all: every token
    with pytest.raises(ValueError, match="target_frac"):
        estimate(anatomy, cfg, target_frac=1.5)


# ---- 6. a 7B-shaped anatomy: speed, verdicts, suggestions, output formats ---------------------------


def llama_anatomy(H=4096, I=11008, L=32, heads=32, kv=32, V=32000) -> dict:
    """What inspect_model returns for a Llama-2-7B config, built by hand (no 13 GB download)."""
    hd = H // heads
    shapes = [
        ("q_proj", "attention", H, H),
        ("k_proj", "attention", H, kv * hd),
        ("v_proj", "attention", H, kv * hd),
        ("o_proj", "attention", H, H),
        ("gate_proj", "mlp", H, I),
        ("up_proj", "mlp", H, I),
        ("down_proj", "mlp", I, H),
    ]
    modules = [
        {
            "name": f"model.layers.{i}.{'self_attn' if g == 'attention' else 'mlp'}.{k}",
            "kind": k,
            "group": g,
            "layer": i,
            "in": n_in,
            "out": n_out,
            "bias": False,
            "type": "Linear",
        }
        for i in range(L)
        for k, g, n_in, n_out in shapes
    ]
    total = sum(m["in"] * m["out"] for m in modules) + 2 * V * H + (2 * L + 1) * H
    return {
        "model": "llama-2-7b-shaped",
        "num_layers": L,
        "hidden_size": H,
        "intermediate_size": I,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": V,
        "tie_word_embeddings": False,
        "total_params": total,
        "modules": modules,
    }


def test_7b_shape_counts():
    anatomy = llama_anatomy()
    assert anatomy["total_params"] == 6_738_415_616  # Llama-2-7B's published count
    cfg = RunConfig.from_dict({"lora": {"r": 8, "targets": ["qv"]}})
    est = estimate(anatomy, cfg)
    assert est.trainable_params == 4_194_304  # 32 layers × 2 × 8 × (4096 + 4096), the LoRA paper's setting


def test_fits_and_suggestions_give_re_estimated_numbers():
    anatomy = llama_anatomy()
    cfg = RunConfig.from_dict({"train": {"batch_size": 4, "max_seq_len": 2048}})
    est = estimate(anatomy, cfg)
    verdicts = fits(est)
    assert [g for g, _ in verdicts] == [16, 24, 40, 48, 80]
    oks = [ok for _, ok in verdicts]
    assert oks == sorted(oks)  # once it fits, it fits every bigger card
    assert suggestions(anatomy, cfg, est, budget_gb=est.total_gb + 1) == []
    import dataclasses

    twenty = dataclasses.replace(est, overhead_bytes=est.overhead_bytes + 20 * GIB - est.total_bytes)
    assert fits(twenty) == [(16, False), (24, True), (40, True), (48, True), (80, True)]
    assert fits(twenty, gpus=(21, 22)) == [(21, False), (22, True)]  # 5 % kept free
    lines = suggestions(anatomy, cfg, est, budget_gb=16)
    assert lines and lines[-1].startswith("together (")
    by_label = {line.split(":")[0]: line for line in lines}
    ckpt = estimate(anatomy, cfg.replace(train={"gradient_checkpointing": True}))
    line = by_label["gradient checkpointing"]
    assert f"{ckpt.total_gb:.1f} GB (saves {gb(est.total_bytes - ckpt.total_bytes):.1f} GB)" in line
    smaller = estimate(anatomy, cfg.replace(train={"batch_size": 1, "grad_accum": 4}))
    assert f"{smaller.total_gb:.1f} GB" in by_label["batch_size 4 → 1 with grad_accum ×4"]
    assert "max_seq_len 2048 → 1024" in by_label
    savings = [float(line.split("saves ")[1].split(" GB")[0]) for line in lines[:-1]]
    assert savings == sorted(savings, reverse=True)


def test_suggestions_include_quantization_when_weights_dominate():
    anatomy = llama_anatomy()
    cfg = RunConfig.from_dict({"train": {"batch_size": 1, "max_seq_len": 256, "gradient_checkpointing": True}})
    est = estimate(anatomy, cfg)
    lines = suggestions(anatomy, cfg, est, budget_gb=8)
    q4 = estimate(anatomy, cfg.replace(quant="4bit"))
    assert any(line.startswith(f"4-bit quantization: {q4.total_gb:.1f} GB") for line in lines)
    assert q4.total_bytes < est.total_bytes


def test_to_dict_and_table_rows(tiny_llama_dir, anatomy_of):
    est = estimate(anatomy_of(tiny_llama_dir), make_cfg(tiny_llama_dir, {"dropout": 0.1}))
    d = json.loads(json.dumps(est.to_dict()))
    assert d["total_bytes"] == est.total_bytes and d["trainable_params"] == est.trainable_params
    assert sum(d["activation_terms"].values()) == est.activation_bytes
    rows = est.table_rows()
    assert rows[-1][0] == "total" and rows[-1][1] == est.total_bytes
    assert sum(b for _, b, _ in rows[:-1]) == est.total_bytes
    assert all(isinstance(label, str) and isinstance(note, str) for label, _, note in rows)
    assert est.total_bytes - est.allocated_bytes == est.overhead_bytes
    assert isinstance(est, Estimate) and GIB == 2**30


def test_estimate_module_is_stdlib_only():
    code = (
        "import sys, engine.core.estimate; "
        "bad = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
