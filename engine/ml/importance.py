"""Output importance (LoRA-drop): how much each adapted module changes its layer's output on real data.

    modules = output_importance(peft_model, examples, pad_id, device)   # {module: mean ‖ΔW x‖² per token}
    report = importance_report(adapter_dir, cfg, home, n_examples=32)   # cached per (adapter, data sample)

For every adapter layer the forward hook takes the layer's input x and output y and measures the adapter's
contribution y − base(x) (the frozen base layer run again on the same x), so that it is ‖s·B·A·x‖² for LoRA
(the paper's ‖ΔWᵢxᵢ‖²), and the whole effect of the adapter for the other forms (AdaLoRA's P·Λ·Q·x, VeRA's
Λ_b·B·Λ_d·A·x, DoRA's rescaled output). The squared norm is summed over the output features and averaged over
every non-padding token of the sample, in fp32, dropout off.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from engine.core import importance as I
from engine.core.config import RunConfig
from engine.ml import data as D

PREFIX = "base_model.model."
CACHE_VERSION = 1


@torch.no_grad()
def output_importance(model, examples: list, pad_id: int, device, batch_size: int = 8) -> tuple[dict[str, float], int]:
    """({module name: mean over tokens of ‖adapter output‖²}, tokens measured) over `examples`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    sums: dict[str, torch.Tensor] = {}
    valid: dict[str, torch.Tensor] = {"mask": torch.ones(0)}

    def hook(name: str):
        def record(module, args, output):
            x = args[0]
            delta = (output - module.get_base_layer()(x)).float()  # (B, T, out): what the adapter adds
            sq = delta.pow(2).sum(-1)  # (B, T)
            sums[name] = sums.get(name, 0) + (sq * valid["mask"]).sum()

        return record

    handles = [
        m.register_forward_hook(hook(n.removeprefix(PREFIX)))
        for n, m in model.named_modules()
        if isinstance(m, BaseTunerLayer) and hasattr(m, "get_base_layer")
    ]
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        for i in range(0, len(examples), batch_size):
            batch = D.collate(examples[i : i + batch_size], pad_id)
            mask = batch["attention_mask"].to(device)
            valid["mask"] = mask.float()
            model(input_ids=batch["input_ids"].to(device), attention_mask=mask, use_cache=False)
            tokens += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: float(v) / max(1, tokens) for n, v in sums.items()}, tokens


def sample(prep, n: int) -> list:
    """The first n examples of the (seeded) training split, then of the validation split."""
    return (list(prep.train) + list(prep.val))[: max(1, n)]


def adapter_key(adapter_dir: Path) -> list:
    files = sorted(p for p in adapter_dir.iterdir() if p.name.startswith("adapter_"))
    return [str(adapter_dir.resolve()), *((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)]


def cache_path(home: Path, adapter_dir: Path, fingerprint: str, n: int, max_seq_len: int) -> Path:
    key = json.dumps([CACHE_VERSION, adapter_key(adapter_dir), fingerprint, n, max_seq_len])
    return Path(home) / "cache" / "importance" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def importance_report(
    adapter_dir: Path, cfg: RunConfig, home: Path, n_examples: int = 32, *, use_cache: bool = True
) -> dict[str, Any]:
    """Importance of every adapted module of `adapter_dir` (on cfg's base model) over n examples of cfg's dataset.

    The result is cached under <home>/cache/importance/, keyed by the adapter files (path, size, time), the
    data's fingerprint (file versions, tokenizer and settings), the sample size and max_seq_len.
    """
    from peft import PeftModel

    from engine.ml import model as M

    adapter_dir = Path(adapter_dir)
    ref = M.resolve_model(cfg.model, home)
    tok = M.load_tokenizer(str(adapter_dir) if (adapter_dir / "tokenizer_config.json").is_file() else ref)
    prep = D.prepare(cfg, tok, cache_dir=Path(home) / "cache" / "datasets")
    path = cache_path(home, adapter_dir, prep.fingerprint, n_examples, cfg.train.max_seq_len)
    if use_cache and path.is_file():
        return {**json.loads(path.read_text(encoding="utf-8")), "cached": True}
    device = M.pick_device()
    base = M.load_base_model(ref, cfg, device, for_training=False)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    examples = sample(prep, n_examples)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    modules, tokens = output_importance(model, examples, pad_id, device)
    report = {
        "adapter": str(adapter_dir.resolve()),
        "model": cfg.model,
        "dataset": cfg.dataset,
        "fingerprint": prep.fingerprint,
        "examples": len(examples),
        "tokens": tokens,
        "modules": modules,
        "layers": {str(k): v for k, v in I.layer_shares(modules).items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report), encoding="utf-8")
    tmp.replace(path)
    return {**report, "cached": False}
