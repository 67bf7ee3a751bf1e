"""Merge an adapter into its base: W' = W + scaling·B·A in every adapted layer (peft's merge_and_unload),
saved with the tokenizer like any model.

    merge("embedded:SmolLM2-135M-Instruct", "runs/3/adapter", "out/merged")

A non-empty target folder is refused unless overwrite=True. The merged model is written to a temporary
folder and renamed into place at the end, so a crash leaves no half-written model behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from engine.core.export import ExportError
from engine.core.home import data_home


def merge(
    base: str,
    adapter: str | Path,
    out_dir: str | Path,
    *,
    quant: str = "none",
    dtype: str = "fp32",
    home: Path | None = None,
    card: str | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Merge `adapter` into `base` on the CPU in `dtype` (fp32 default: no rounding of ΔW); returns out_dir.

    A 4-bit or 8-bit base is refused: ΔW would be rounded into the quantized grid and a bitsandbytes model
    does not save as a plain checkpoint. A QLoRA run merges into the full-precision base, which is what
    `export` does.
    """
    if quant != "none":
        raise ExportError(
            f"cannot merge into a {quant} base: adding ΔW to quantized weights rounds most of it away "
            "and the result does not save as a plain checkpoint. Merge into the full-precision base "
            "(quant none) instead; a QLoRA adapter applies to it unchanged."
        )
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from engine.ml import model as M
    from engine.ml.generate import adapter_base_model, same_base

    home = home or data_home()
    adapter, out = Path(adapter), Path(out_dir)
    trained_on = adapter_base_model(adapter)
    if trained_on and not same_base(trained_on, base, home):
        raise ExportError(
            f"adapter {adapter} was trained on {trained_on!r}, not on {base!r}; merge it into its own base"
        )
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; choose a new folder (or pass --force to replace it)")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": "auto"}[dtype]
    ref = M.resolve_model(base, home)
    tok_src = str(adapter) if (adapter / "tokenizer_config.json").is_file() else ref
    tok = M.load_tokenizer(tok_src, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if card is not None:
        (tmp / "README.md").write_text(card, encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out
