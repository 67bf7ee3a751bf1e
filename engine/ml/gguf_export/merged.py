"""A whole model (base + adapter merged) as a GGUF llama.cpp, Ollama and LM Studio load.

    how = write_model_gguf(model, tok, Path("pirate.gguf"), "q8_0", name="pirate")

The tensors are the model's state dict under llama.cpp's names (arch.Arch), Q/K rows permuted for the
llama family, 1-D tensors and norms in F32 and the rest in the requested type (f32, f16, bf16, q8_0 —
gguf.quants does the encoding). The metadata: general.* (type model, name, file type), the
architecture's hyper-parameters, and the tokenizer with its chat template (vocab.write_vocab).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch

from engine.core.export import ExportError
from engine.ml.gguf_export.arch import CONVERTER_HINT, Arch, arch_of
from engine.ml.gguf_export.common import (
    FILE_TYPES,
    Every,
    Progress,
    atomic_target,
    encode,
    qtype_for,
    stderr_progress,
    write_file,
)
from engine.ml.gguf_export.vocab import write_vocab


def model_tensors(model: torch.nn.Module, arch: Arch) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in llama.cpp's layout) for every tensor llama.cpp reads."""
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and arch.tied:
            continue  # llama.cpp uses token_embd for the output when there is no output.weight
        gname = arch.tensor_name(hf_name)
        if gname is None:
            raise ExportError(
                f"tensor {hf_name!r} has no llama.cpp name in architecture {arch.name}. {CONVERTER_HINT}."
            )
        data = t.detach().to(torch.float32).cpu().numpy()
        rows = arch.row_order(hf_name)
        yield gname, (data[rows] if rows is not None else data)


def write_model_gguf(
    model: torch.nn.Module,
    tok,
    out: Path,
    kind: str = "f16",
    *,
    name: str,
    reference: gguf.GGUFReader | None = None,
    progress: Progress = stderr_progress,
) -> str:
    """Write `model` (a plain transformers model, LoRA already merged) to `out`; returns how the vocabulary
    was written. The caller checks that `out` may be written (common.check_outputs)."""
    if kind not in FILE_TYPES:
        raise ExportError(f"GGUF type {kind!r}: choose one of {', '.join(FILE_TYPES)}")
    arch = arch_of(model.config)
    w = gguf.GGUFWriter(path=None, arch=arch.name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(FILE_TYPES[kind])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    arch.write_hparams(w)
    n_vocab = int(model.get_input_embeddings().weight.shape[0])
    with tempfile.TemporaryDirectory(prefix="loralab-vocab-") as tmp:
        how = write_vocab(w, tok, n_vocab, Path(tmp), reference)
    names = [n for n in model.state_dict() if not (n == "lm_head.weight" and arch.tied)]
    tick = Every(len(names), f"{kind} tensors", progress)
    for i, (gname, data) in enumerate(model_tensors(model, arch), start=1):
        encoded, qtype = encode(data, qtype_for(gname, data, kind))
        w.add_tensor(gname, encoded, raw_dtype=qtype)
        tick(i)
    with atomic_target(out) as tmp:
        write_file(w, tmp, progress)
    return how
