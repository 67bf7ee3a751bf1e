"""Questions about models, data and this machine: `inspect`, `preview`, `doctor`, `estimate`."""

from __future__ import annotations

import json
import os

from engine.cli.common import fail, home_of, print_json
from engine.core.config import EMBEDDED_MODEL, ConfigError, RunConfig


def cmd_inspect(args) -> int:
    from engine.ml.model import inspect_model

    info = inspect_model(args.model, home_of(args), trust_remote_code=args.trust_remote_code)
    if args.json:
        print_json(info)
        return 0
    print(f"{info['model']}  ({info['architecture']}, {info['model_type']})")
    print(
        f"  parameters: {info['total_params']:,}   layers: {info['num_layers']}   hidden: {info['hidden_size']}   "
        f"heads: {info['num_attention_heads']} (kv {info['num_key_value_heads']})   vocab: {info['vocab_size']}"
    )
    print("  LoRA-able modules (kind, group, count, in → out):")
    for k in info["kinds"]:
        print(f"    {k['target']:<14} {k['group']:<10} ×{k['count']:<4} {k['in_features']:>6} → {k['out_features']:<6}")
    return 0


def cmd_preview(args) -> int:
    """Dataset preview: format, counts, token lengths and the rendered chat template of one example."""
    from engine.ml.data import preview
    from engine.ml.model import load_tokenizer, resolve_model

    try:
        cfg = RunConfig.from_dict(
            {
                "model": args.model,
                "dataset": args.dataset,
                "dataset_format": args.dataset_format,
                "train_on": args.train_on,
                "train": {"max_seq_len": args.max_seq_len},
            }
        )
        tok = load_tokenizer(resolve_model(cfg.model, home_of(args)))
        info = preview(cfg, tok)
    except (ConfigError, ValueError, OSError) as e:  # DatasetError and ModelError are among these
        if args.json:
            print(json.dumps({"error": str(e)}))
            return 2
        return fail(str(e))
    if args.json:
        print_json(info)
    else:
        for k, v in info.items():
            if k != "rendered_example":
                print(f"{k:>20}: {v}")
        print("\n--- first example as the model sees it ---\n" + info["rendered_example"])
    return 0


def cmd_doctor(args) -> int:
    """What this machine can do: device, GPU memory, bf16, which quantization modes work, versions."""
    import platform

    import torch

    from engine.ml.model import quant_support

    cuda = torch.cuda.is_available()
    info = {
        "device": "cuda" if cuda else "cpu",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_mem_gb": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "quant": {k: {"ok": ok, "reason": why} for k, (ok, why) in quant_support().items()},
    }
    if args.json:
        print_json(info)
    else:
        for k, v in info.items():
            print(f"{k:>10}: {v}")
    return 0


def cmd_estimate(args) -> int:
    """Parameter count and memory estimate of a run config (module shapes from inspect, no weights read)."""
    from engine.core import estimate as E
    from engine.ml.model import bf16_capable, inspect_model, pick_device

    try:
        cfg = RunConfig.from_file(args.config)
        here = pick_device()
        # the trainer's own rules (E.estimate → anatomy.resolve_dtype): fp16 on a CPU is refused by both
        device = args.device or here.type
        bf16 = bf16_capable(here) if device == here.type else True
        anatomy = inspect_model(cfg.model, home_of(args), trust_remote_code=cfg.trust_remote_code)
        est = E.estimate(anatomy, cfg, device=device, bf16_capable=bf16)
    except ConfigError as e:
        return fail(str(e))
    args.device = device
    fits = E.fits(est)
    tips = E.suggestions(anatomy, cfg, est, args.budget_gb) if args.budget_gb else []
    if args.json:
        print_json({**est.to_dict(), "fits": [{"gpu_gb": g, "fits": ok} for g, ok in fits], "suggestions": tips})
        return 0
    print(
        f"{cfg.model}: {est.trainable_params:,} trainable of {est.total_params:,} parameters "
        f"({est.trainable_pct:.3f}%), {est.n_modules} LoRA modules, adapter file ≈ {est.adapter_file_bytes / 2**20:.1f} MiB"
    )
    print(f"memory on {args.device} ({est.compute_dtype}, quant {est.quant}):")
    for label, n, note in est.table_rows():
        print(f"  {label:<40} {E.gb(n):8.3f} GB   {note}")
    print("  fits on: " + ", ".join(f"{g:g} GB {'yes' if ok else 'no'}" for g, ok in fits))
    for line in tips:
        print(f"  suggestion: {line}")
    return 0


def register(sub) -> None:
    i = sub.add_parser("inspect", help="architecture, parameters and LoRA-able modules of a model")
    i.add_argument("model", nargs="?", default=EMBEDDED_MODEL)
    i.add_argument("--json", action="store_true")
    i.add_argument("--trust-remote-code", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    pv = sub.add_parser("preview", help="dataset preview: format, counts, token lengths, rendered template")
    pv.add_argument("--model", default=EMBEDDED_MODEL, help="whose tokenizer and chat template to use")
    pv.add_argument("--dataset", default="builtin:persona")
    pv.add_argument("--dataset-format", default="auto")
    pv.add_argument("--train-on", default="responses")
    pv.add_argument("--max-seq-len", type=int, default=512)
    pv.add_argument("--json", action="store_true")
    pv.set_defaults(fn=cmd_preview)

    d = sub.add_parser("doctor", help="device, GPU memory, bf16 and quantization support of this machine")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=cmd_doctor)

    e = sub.add_parser("estimate", help="trainable parameters and memory estimate of a run config")
    e.add_argument("config", help="YAML or JSON run config")
    e.add_argument(
        "--device", choices=["cuda", "cpu"], default=None, help="estimate for this device (default: this machine's)"
    )
    e.add_argument("--budget-gb", type=float, help="suggest changes that fit this much memory")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_estimate)
