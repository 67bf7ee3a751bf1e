"""What llama.cpp expects of each architecture we export, and nothing for the ones we have not verified.

    arch = arch_of(config)                      # ExportError naming the supported ones otherwise
    arch.tensor_name("model.layers.0.self_attn.q_proj.weight")   # → "blk.0.attn_q.weight"
    rows = arch.row_order("model.layers.0.self_attn.q_proj.weight")  # llama: Q/K rows reordered, else None

Tensor names come from gguf's own TensorNameMap (the table llama.cpp's converter uses). The one thing
each family adds is how llama.cpp lays out Q and K: for the llama family its converter permutes their
rows (llama.cpp applies rotary embeddings to interleaved pairs, Hugging Face to the two halves of each
head), so a weight W becomes W[rows] and a LoRA product B·A becomes B[rows]·A. Qwen2 is converted
without a permutation (NEOX rotary in llama.cpp). transformers' GGUF loader undoes the same
permutation when it reads a file back, which is what the round-trip tests check.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import gguf
import numpy as np

from engine.core.export import ExportError

CONVERTER_HINT = (
    "Export the merged model as a folder (--merged DIR) and convert it with llama.cpp's convert_hf_to_gguf.py"
)


@dataclass(frozen=True)
class Arch:
    """One verified architecture, bound to a model's config."""

    model_type: str
    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool
    config: Any

    @property
    def name(self) -> str:
        """llama.cpp's name for it (general.architecture)."""
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def n_head(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def n_head_kv(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.n_head)

    @property
    def head_dim(self) -> int:
        return int(self.config.hidden_size) // self.n_head

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def tensor_name(self, hf_name: str) -> str | None:
        """The GGUF name of a Hugging Face parameter (`….weight` / `….bias`), or None if llama.cpp has none."""
        return _name_map(self.gguf_arch, self.n_layers).get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def row_order(self, hf_name: str) -> np.ndarray | None:
        """The row permutation llama.cpp's converter applies to this tensor (llama Q and K), else None.

        For a (out, …) tensor of n heads: rows (head, half, i) are reordered to (head, i, half), i.e.
        convert_hf_to_gguf's `w.reshape(n, 2, out // n // 2, …).swapaxes(1, 2).reshape(w.shape)`.
        """
        if not self.permute_qk:
            return None
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = self.n_head
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = self.n_head_kv
        else:
            return None
        out = heads * self.head_dim
        return np.arange(out).reshape(heads, 2, out // heads // 2).swapaxes(1, 2).reshape(-1)

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        """The model hyper-parameters llama.cpp reads for this architecture (what its converter writes)."""
        c = self.config
        w.add_context_length(int(c.max_position_embeddings))
        w.add_embedding_length(int(c.hidden_size))
        w.add_block_count(self.n_layers)
        w.add_feed_forward_length(int(c.intermediate_size))
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_rope_freq_base(float(rope_theta(c)))
        w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
        w.add_vocab_size(int(c.vocab_size))
        if self.gguf_arch == gguf.MODEL_ARCH.LLAMA:
            w.add_rope_dimension_count(self.head_dim)


@lru_cache(maxsize=8)
def _name_map(arch: gguf.MODEL_ARCH, n_layers: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(arch, n_layers)  # ~50 ms to build: once per architecture and depth


# model_type → (llama.cpp architecture, Q/K row permutation), each checked against llama.cpp's converter
# (LlamaModel / Qwen2Model in convert_hf_to_gguf.py) and by loading the written file back with transformers.
VERIFIED = {
    "llama": (gguf.MODEL_ARCH.LLAMA, True),
    "qwen2": (gguf.MODEL_ARCH.QWEN2, False),
}
VERIFIED_TEXT = "llama (SmolLM, SmolLM2, Llama without rope scaling ...) and qwen2 (Qwen2, Qwen2.5)"


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def arch_of(config) -> Arch:
    """The verified architecture of a transformers config, or ExportError saying why not and what to do."""
    mt = getattr(config, "model_type", None)
    if mt not in VERIFIED:
        raise ExportError(
            f"GGUF export is verified for {VERIFIED_TEXT}; this model is {mt!r}, whose llama.cpp tensor "
            f"layout we have not checked. {CONVERTER_HINT}."
        )
    problems = _unverified_settings(config)
    if problems:
        raise ExportError(
            f"this {mt} model has {'; '.join(problems)}, which GGUF export does not write. {CONVERTER_HINT}."
        )
    gguf_arch, permute = VERIFIED[mt]
    return Arch(mt, gguf_arch, permute, config)


def _unverified_settings(config) -> list[str]:
    """Settings of a supported family that need GGUF keys or tensors we do not write (or verify)."""
    out = []
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type") or (getattr(config, "rope_scaling", None) or {}).get("rope_type")
    if rope_type not in (None, "default"):
        out.append(f"rope scaling {rope_type!r} (llama.cpp needs extra rope keys or a rope_freqs tensor)")
    head_dim = getattr(config, "head_dim", None)
    if head_dim and int(head_dim) != int(config.hidden_size) // int(config.num_attention_heads):
        out.append(f"head_dim {head_dim} ≠ hidden_size / heads")
    if config.model_type == "llama" and (
        getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)
    ):
        out.append("attention or MLP biases")
    if getattr(config, "model_type", None) == "qwen2" and getattr(config, "use_sliding_window", False):
        out.append("sliding-window attention")
    return out
