"""LoftQ initialisation for QLoRA runs: start LoRA from the low-rank part of the 4-bit quantization error.

    peft_model = get_peft_model(model_loaded_in_4bit, LoraConfig(...))
    loftq_initialise(peft_model)          # A, B such that Q(W) + s·B·A ≈ W (rank r)

For every 4-bit LoRA layer, W is read from the model's own safetensors file, Q(W) is the NF4 weight the base
was loaded with, and the best rank-r approximation of the error W − Q(W) (SVD, peft's
`_low_rank_decomposition`) becomes s·B·A. This is one step of LoftQ's alternation, the step peft's
`replace_lora_weights_loftq` does: the base stays the standard NF4 quantization of W, so the saved adapter
works on any plain 4-bit load of the base (LoftQ's further steps re-quantize W − s·B·A and would need a
changed base checkpoint).

On an accelerator this is peft's own `replace_lora_weights_loftq`; on a CPU it cannot run (peft 0.21 moves the
weights to "cuda" or "xpu" unconditionally), so the same decomposition (peft's `_low_rank_decomposition`, its
`_SafetensorLoader`) runs on the weights' own device. peft sets B·A to the error without the scaling s = α/r
(peft issue #1982), so s·B·A would be the error only when α = r: both paths divide A and B by √s each. The
accelerator path is written but not exercised by the CPU test suite.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

PEFT_PREFIX = "base_model.model."


@torch.no_grad()
def loftq_initialise(peft_model, model_path: str | None = None, adapter_name: str = "default") -> int:
    """Set A, B of every 4-bit LoRA layer from the SVD of its quantization error; returns the number of layers.

    model_path: the folder (or model.safetensors file) with the full-precision weights; default the folder the
    base model was loaded from, or its hub cache entry.
    """
    import bitsandbytes as bnb
    from peft.tuners.lora import Linear4bit
    from peft.utils.loftq_utils import _low_rank_decomposition, _SafetensorLoader

    if model_path is None:
        source = getattr(peft_model.get_base_model().config, "_name_or_path", None)
        model_path = source if source and Path(source).is_dir() else None
    if next(peft_model.parameters()).device.type in ("cuda", "xpu"):  # peft's own function runs there
        return _peft_loftq(peft_model, model_path, adapter_name)
    loader = _SafetensorLoader(peft_model, model_path)
    done = 0
    for name, module in peft_model.named_modules():
        if not isinstance(module, Linear4bit) or adapter_name not in module.lora_A:
            continue
        W = loader.get_tensor(name.removeprefix(PEFT_PREFIX) + ".weight")  # (out, in), full precision
        q = module.get_base_layer().weight
        Wq = bnb.functional.dequantize_4bit(q.data, q.quant_state)  # what the base computes with
        error = W.to(Wq.device, torch.float32) - Wq.float()
        low = _low_rank_decomposition(error, reduced_rank=module.r[adapter_name])  # error ≈ L·R, rank r
        root = math.sqrt(module.scaling[adapter_name])
        lora_A, lora_B = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        lora_A.copy_((low["R"] / root).to(lora_A.dtype))  # (r, in)
        lora_B.copy_((low["L"] / root).to(lora_B.dtype))  # (out, r): s·B·A = L·R
        done += 1
    if not done:
        raise ValueError("LoftQ found no 4-bit LoRA layer; lora.init = 'loftq' needs quant = '4bit'")
    return done


@torch.no_grad()
def _peft_loftq(peft_model, model_path: str | None, adapter_name: str) -> int:
    """On an accelerator: peft's replace_lora_weights_loftq (B·A = the rank-r error), then A, B divided by √s so
    that s·B·A is the error for any α (peft issue #1982). Not run by the CPU test suite."""
    from peft.tuners.lora import Linear4bit
    from peft.utils.loftq_utils import replace_lora_weights_loftq

    replace_lora_weights_loftq(peft_model, model_path, adapter_name)
    done = 0
    for module in peft_model.modules():
        if isinstance(module, Linear4bit) and adapter_name in module.lora_A:
            root = math.sqrt(module.scaling[adapter_name])
            module.lora_A[adapter_name].weight.div_(root)
            module.lora_B[adapter_name].weight.div_(root)
            done += 1
    if not done:
        raise ValueError("LoftQ found no 4-bit LoRA layer; lora.init = 'loftq' needs quant = '4bit'")
    return done
