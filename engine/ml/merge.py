"""Merge an adapter into its base: W' = W + scaling·B·A in every adapted layer (peft's merge_and_unload),
saved with the tokenizer like any model.

    merge("embedded:SmolLM2-135M-Instruct", "runs/3/adapter", "out/merged")

A non-empty target folder is refused, and with overwrite=True it is replaced only if it is an earlier merged
export of ours (engine.core.export.check_merge_target: never what we did not write, never the data home).
The merged model is written to a fresh temporary folder and renamed into place at the end, so a crash
leaves no half-written model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from engine.core.export import ExportError, check_merge_target, mark_export
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
    refuse_quantized(quant)
    adapter, out = Path(adapter), Path(out_dir)
    home = home or data_home()
    check_merge_target(out, home, overwrite)
    merged, tok = load_merged(base, adapter, dtype=dtype, home=home, trust_remote_code=trust_remote_code)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))  # new: only ours to delete
    try:
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        mark_export(tmp, base=base, adapter=str(adapter))
        check_merge_target(out, home, overwrite)  # again: the folder may have changed while we merged
        if out.exists():  # empty, or an earlier export of ours: set aside, then removed once the new one is in
            aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, aside)
            os.replace(tmp, out)
            shutil.rmtree(aside)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def refuse_quantized(quant: str) -> None:
    if quant != "none":
        raise ExportError(
            f"cannot merge into a {quant} base: adding ΔW to quantized weights rounds most of it away "
            "and the result does not save as a plain checkpoint. Merge into the full-precision base "
            "(quant none) instead; a QLoRA adapter applies to it unchanged."
        )


def load_merged(
    base: str,
    adapter: str | Path,
    *,
    dtype: str = "fp32",
    home: Path | None = None,
    trust_remote_code: bool = False,
):
    """(merged model, tokenizer) in memory: `base` + `adapter` through peft's merge_and_unload, on the CPU.

    The inputs are checked first (merge_source); the tokenizer is merged_tokenizer's.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ref = merge_source(base, adapter, home or data_home())
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": "auto"}[dtype]
    tok = merged_tokenizer(ref, adapter, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload(), tok


def merge_source(base: str, adapter: str | Path, home: Path) -> str:
    """The base's from_pretrained reference, after refusing an adapter trained on another base and a base
    stored quantized (a quantization_config in its config.json: bitsandbytes, GPTQ, AWQ ...)."""
    from engine.ml import model as M

    check_trained_on(base, adapter, home)
    ref = M.resolve_model(base, home)
    stored_quant = _stored_quantization(ref)
    if stored_quant:
        raise ExportError(
            f"base {base!r} is stored quantized ({stored_quant}): adding ΔW to its rounded weights would not "
            "give the model the adapter was trained against. Merge into the full-precision checkpoint of the "
            "same model, or export the adapter alone (--gguf-adapter) and apply it at run time."
        )
    return ref


def check_trained_on(base: str, adapter: str | Path, home: Path) -> None:
    """ExportError if the adapter says it was trained on another base model than `base`."""
    from engine.ml.generate import adapter_base_model, same_base

    trained_on = adapter_base_model(adapter)
    if trained_on and not same_base(trained_on, base, home):
        raise ExportError(
            f"adapter {adapter} was trained on {trained_on!r}, not on {base!r}; merge it into its own base"
        )


def merged_tokenizer(base_ref: str, adapter: str | Path, trust_remote_code: bool = False):
    """The adapter folder's tokenizer when it has one (what the run trained with), else the base's."""
    from engine.ml import model as M

    adapter = Path(adapter)
    src = str(adapter) if (adapter / "tokenizer_config.json").is_file() else base_ref
    return M.load_tokenizer(src, trust_remote_code=trust_remote_code)


def _stored_quantization(ref: str) -> str | None:
    """The quant_method of a local folder saved quantized, else None (hub ids are checked when they load)."""
    cfg = Path(ref) / "config.json"
    if not cfg.is_file():
        return None
    q = json.loads(cfg.read_text(encoding="utf-8")).get("quantization_config")
    return str(q.get("quant_method", "quantized")) if isinstance(q, dict) else None
