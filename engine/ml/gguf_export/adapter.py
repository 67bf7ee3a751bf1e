"""A PEFT LoRA adapter as a llama.cpp LoRA GGUF (`llama-cli -m base.gguf --lora adapter.gguf`, Ollama ADAPTER).

    info = write_adapter_gguf(adapter_dir, base_config, Path("pirate-lora.gguf"), reference=base_reader)

The format (llama.cpp's src/llama-adapter.cpp): general.type = "adapter", general.architecture of the
base, adapter.type = "lora", adapter.lora.alpha (float32), and for each adapted weight W of the base
two tensors named after W's GGUF tensor, `<name>.lora_a` with numpy shape (r, in) and `<name>.lora_b`
with (out, r). The loader requires ne[0] of W = ne[0] of lora_a, ne[1] of W = ne[1] of lora_b and
ne[1] of lora_a = ne[0] of lora_b; at run time it adds scale·B·(A·x) with scale = alpha / r, r read per
tensor from lora_b. So one alpha must serve every module: alpha = scaling·r, the same for all of them
(plain LoRA: alpha; rsLoRA: alpha·√r). What the format cannot say is refused, never approximated.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from engine.core.export import ExportError
from engine.ml.gguf_export.arch import Arch, arch_of
from engine.ml.gguf_export.common import (
    Every,
    Progress,
    architecture,
    atomic_target,
    encode,
    qtype_for,
    stderr_progress,
    tensor_shapes,
    write_file,
)

MERGED_INSTEAD = "export the merged model with --gguf OUT.gguf instead, which folds it into the weights exactly"
ADAPTER_TYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass
class LoraPair:
    """One adapted weight: its GGUF name, A (r, in), B (out, r) in llama.cpp's row order, peft's scaling."""

    module: str  # e.g. model.layers.0.self_attn.q_proj
    gguf_name: str  # e.g. blk.0.attn_q.weight
    A: np.ndarray
    B: np.ndarray
    scaling: float

    @property
    def r(self) -> int:
        return int(self.A.shape[0])


def refuse_unsupported(cfg) -> None:
    """Adapter settings llama.cpp's LoRA format cannot express."""
    if getattr(cfg, "peft_type", None) != "LORA":
        raise ExportError(f"the adapter is {cfg.peft_type}, not LoRA; llama.cpp's adapter GGUF holds LoRA only")
    why = []
    if getattr(cfg, "use_dora", False):
        why.append("DoRA (a per-column magnitude llama.cpp has no tensor for)")
    if getattr(cfg, "bias", "none") != "none" or getattr(cfg, "lora_bias", False):
        why.append(f"trained biases (bias={cfg.bias!r})")
    if getattr(cfg, "modules_to_save", None):
        why.append(f"fully trained modules {list(cfg.modules_to_save)}")
    for attr, what in (
        ("trainable_token_indices", "trained token embeddings"),
        ("layer_replication", "layer replication"),
        ("target_parameters", "LoRA on parameters (MoE experts)"),
        ("alora_invocation_tokens", "activated LoRA (aLoRA)"),
        ("use_qalora", "QA-LoRA"),
    ):
        if getattr(cfg, attr, None):
            why.append(what)
    if why:
        raise ExportError(f"the adapter uses {', '.join(why)}, which a GGUF LoRA adapter cannot hold; {MERGED_INSTEAD}")


def lora_layers(cfg, base_config) -> dict[str, tuple[float, str]]:
    """module name → (peft's scaling, layer class), from peft itself on a weightless (meta) copy of the base.

    peft resolves rank_pattern / alpha_pattern / rsLoRA into `scaling`; we read it rather than redo it.
    """
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    structural = copy.deepcopy(cfg)
    structural.init_lora_weights = True  # PiSSA/OLoRA/LoftQ init would need the real weights; we need shapes only
    structural.inference_mode = True
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(base_config)
        pm = get_peft_model(base, structural)
    out = {}
    for name, m in pm.base_model.model.named_modules():
        if isinstance(m, LoraLayer) and "default" in getattr(m, "scaling", {}):
            out[name] = (float(m.scaling["default"]), type(m).__name__)
    return out


def read_pairs(adapter_dir: Path, cfg, arch: Arch) -> list[LoraPair]:
    """Every lora_A/lora_B pair of the adapter file, checked against what peft says the adapter is."""
    from safetensors.torch import load_file

    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    layers = lora_layers(cfg, arch.config)
    if not layers:
        raise ExportError(f"{adapter_dir}: peft finds no LoRA layer of this adapter in the base model")
    pairs, used = [], set()
    for module, (scaling, kind) in sorted(layers.items()):
        if kind != "Linear":
            raise ExportError(
                f"LoRA on {module} is a {kind} layer; GGUF adapters are written for linear layers only; {MERGED_INSTEAD}"
            )
        key_a, key_b = (f"base_model.model.{module}.lora_{x}.weight" for x in ("A", "B"))
        if key_a not in weights or key_b not in weights:
            raise ExportError(f"{adapter_dir}: {module} has no {key_a.rsplit('.', 2)[-2]} tensor in the adapter file")
        used |= {key_a, key_b}
        gname = arch.tensor_name(f"{module}.weight")
        if gname is None or (module.endswith("lm_head") and arch.tied):
            raise ExportError(
                f"LoRA on {module}: llama.cpp's {arch.name} has no separate tensor for it"
                f"{' (the output head is tied to the embeddings)' if arch.tied else ''}; {MERGED_INSTEAD}"
            )
        A = weights[key_a].to(torch.float32).numpy()
        B = weights[key_b].to(torch.float32).numpy()
        rows = arch.row_order(f"{module}.weight")
        pairs.append(LoraPair(module, gname, A, B[rows] if rows is not None else B, scaling))
    extra = sorted(set(weights) - used)
    if extra:
        raise ExportError(
            f"the adapter file has tensors a GGUF LoRA cannot hold: {', '.join(extra[:4])}; {MERGED_INSTEAD}"
        )
    return pairs


def single_alpha(pairs: list[LoraPair]) -> float:
    """The one adapter.lora.alpha with alpha / r = peft's scaling for every module, or ExportError."""
    alphas = {p.module: p.scaling * p.r for p in pairs}
    first = next(iter(alphas.values()))
    off = {m: a for m, a in alphas.items() if not math.isclose(a, first, rel_tol=1e-6)}
    if off:
        shown = ", ".join(f"{m} {a:g}" for m, a in list(off.items())[:3])
        raise ExportError(
            f"the modules need different alphas (scaling·r: {next(iter(alphas))} {first:g}, {shown}) — a "
            f"per-module rank/alpha pattern or rsLoRA with mixed ranks — but a GGUF LoRA has one alpha per file; "
            f"{MERGED_INSTEAD}"
        )
    return first


def check_against_base(pairs: list[LoraPair], base: gguf.GGUFReader, arch: Arch) -> None:
    """llama.cpp's load-time checks (llama-adapter.cpp), against the base GGUF the adapter will run on."""
    if architecture(base) != arch.name:
        raise ExportError(f"the base GGUF is {architecture(base)!r} but the adapter's base model is {arch.name!r}")
    shapes = tensor_shapes(base)
    for p in pairs:
        ne = shapes.get(p.gguf_name)
        if ne is None:
            raise ExportError(f"{p.gguf_name} (for {p.module}) is not a tensor of the base GGUF; wrong base model?")
        # numpy (r, in) is ggml ne = (in, r); numpy (out, r) is ne = (r, out)
        if len(ne) != 2 or ne[0] != p.A.shape[1] or ne[1] != p.B.shape[0] or p.A.shape[0] != p.B.shape[1]:
            raise ExportError(
                f"{p.gguf_name}: base shape (ne) {ne} does not take lora_a {p.A.shape[::-1]} / lora_b "
                f"{p.B.shape[::-1]}; wrong base model?"
            )


def write_adapter_gguf(
    adapter_dir: Path,
    base_config,
    out: Path,
    kind: str = "f32",
    *,
    name: str,
    reference: gguf.GGUFReader | None = None,
    progress: Progress = stderr_progress,
) -> dict:
    """Write the adapter at `adapter_dir` (trained on a model with `base_config`) to `out`; returns a summary.

    The caller checks that `out` may be written (common.check_outputs)."""
    from peft import PeftConfig

    if kind not in ADAPTER_TYPES:
        raise ExportError(f"GGUF adapter type {kind!r}: choose one of {', '.join(ADAPTER_TYPES)}")
    adapter_dir = Path(adapter_dir)
    cfg = PeftConfig.from_pretrained(str(adapter_dir))
    refuse_unsupported(cfg)
    arch = arch_of(base_config)
    pairs = read_pairs(adapter_dir, cfg, arch)
    alpha = single_alpha(pairs)
    if reference is not None:
        check_against_base(pairs, reference, arch)
    w = gguf.GGUFWriter(path=None, arch=arch.name)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    w.add_name(name)
    tick = Every(len(pairs), "LoRA pairs", progress)
    for i, p in enumerate(pairs, start=1):
        for suffix, data in ((".lora_a", p.A), (".lora_b", p.B)):
            encoded, qtype = encode(data, qtype_for(p.gguf_name + suffix, data, kind))
            w.add_tensor(p.gguf_name + suffix, encoded, raw_dtype=qtype)
        tick(i)
    with atomic_target(out) as tmp:
        write_file(w, tmp, progress)
    return {"alpha": alpha, "modules": len(pairs), "ranks": sorted({p.r for p in pairs}), "architecture": arch.name}
