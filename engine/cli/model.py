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


def preview_config(args) -> RunConfig:
    """The run config a preview is for: the flags, everything else at its default."""
    return RunConfig.from_dict(
        {
            "model": args.model,
            "dataset": args.dataset,
            "dataset_format": args.dataset_format,
            "columns": args.columns or "",
            "dataset_split": args.split,
            "dataset_subset": args.subset,
            "text_split": args.text_split,
            "train_on": args.train_on,
            "max_examples": args.max_examples,
            "train": {"max_seq_len": args.max_seq_len, "val_split": args.val_split, "seed": args.seed},
        }
    )


def cmd_preview(args) -> int:
    """Dataset preview: format, counts (rows, dropped by reason, tokens kept and cut), token lengths and the
    first example as the model sees it."""
    from engine.core.data_fields import truncation_warning
    from engine.ml.data import preview
    from engine.ml.model import load_tokenizer, resolve_model

    try:
        cfg = preview_config(args)
        tok = load_tokenizer(resolve_model(cfg.model, home_of(args)))
        info = preview(cfg, tok, home_of(args) / "cache" / "datasets", facts=args.facts)
    except (ConfigError, ValueError, OSError) as e:  # DatasetError and ModelError are among these
        if args.json:
            print(json.dumps({"error": str(e)}))
            return 2
        return fail(str(e))
    info["warning"] = truncation_warning(info, cfg.train.max_seq_len)
    if args.json:
        print_json(info)
        return 0
    for k, v in info.items():
        if k not in ("rendered_example", "trained_example", "facts", "warning", "notes"):
            print(f"{k:>20}: {v}")
    for note in info["notes"]:
        print(f"{'note':>20}: {note}")
    if info["warning"]:
        print(f"\nwarning: {info['warning']}")
    print("\n--- first example as the model sees it ---\n" + info["rendered_example"])
    print("\n--- what the loss is taken on ---\n" + info["trained_example"])
    return 0


def cmd_doctor(args) -> int:
    """What this machine can do: device, GPU memory, bf16, which quantization modes work, versions."""
    import platform

    import torch

    from engine.ml.distributed import local_gpus
    from engine.ml.model import pick_device, quant_support
    from engine.ml.resources import bf16_choice, choose_threads

    cuda = torch.cuda.is_available()
    fast, why = bf16_choice(pick_device(), home_of(args))
    threads = choose_threads(0)
    info = {
        "device": "cuda" if cuda else "cpu",
        "gpus": local_gpus(),  # every GPU: index, name, total_gb, free_gb (the queue places runs on them)
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_mem_gb": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        "bf16": fast,  # bf16 is fast here: what dtype auto resolves with
        "auto_dtype": "bf16" if fast else "fp32",
        "auto_dtype_why": why,
        "threads": threads.threads,
        "threads_why": threads.why,
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
        bf16 = bf16_capable(here) if device == here.type else None
        anatomy = inspect_model(cfg.model, home_of(args), trust_remote_code=cfg.trust_remote_code)
        facts = None if args.worst_case else data_facts(cfg, home_of(args))
        est = E.estimate(anatomy, cfg, device=device, bf16_capable=bf16, data=facts)
    except ConfigError as e:
        return fail(str(e))
    except ValueError as e:  # DatasetError: the data could not be read
        return fail(f"{e} (or estimate without the data: --worst-case)")
    args.device = device
    worst = E.estimate(anatomy, cfg, device=device, bf16_capable=bf16) if facts is not None else est
    fits = E.fits(est)
    tips = E.suggestions(anatomy, cfg, est, args.budget_gb, data=facts) if args.budget_gb else []
    if args.json:
        print_json(
            {
                **est.to_dict(),
                "worst_case_gb": round(worst.total_gb, 4),
                "fits": [{"gpu_gb": g, "fits": ok} for g, ok in fits],
                "suggestions": tips,
            }
        )
        return 0
    print(
        f"{cfg.model}: {est.trainable_params:,} trainable of {est.total_params:,} parameters "
        f"({est.trainable_pct:.3f}%), {est.n_modules} LoRA modules, adapter file ≈ {est.adapter_file_bytes / 2**20:.1f} MiB"
    )
    print(f"memory on {args.device} ({est.compute_dtype}, quant {est.quant}), basis: {est.basis}: {est.batch_note}")
    if est is not worst:
        print(f"  (worst case, every micro-batch {worst.batch_note}: {worst.total_gb:.2f} GB)")
    for label, n, note in est.table_rows():
        print(f"  {label:<40} {E.gb(n):8.3f} GB   {note}")
    print("  fits on: " + ", ".join(f"{g:g} GB {'yes' if ok else 'no'}" for g, ok in fits))
    for line in tips:
        print(f"  suggestion: {line}")
    return 0


def data_facts(cfg: RunConfig, home):
    """The training split's token counts of cfg's dataset (tokenized once, cached like a run's)."""
    from engine.ml.data import prepare
    from engine.ml.model import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(cfg.model, home), cfg.trust_remote_code)
    return prepare(cfg, tok, home / "cache" / "datasets").facts(cfg)


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
    pv.add_argument("--columns", help="column mapping, e.g. 'prompt=question,response=answer'")
    pv.add_argument("--split", default="", help="split of a hub dataset or folder (default: train)")
    pv.add_argument("--subset", default="", help="subset (configuration) of a hub dataset")
    pv.add_argument("--text-split", default="auto", help="plain text: auto, paragraph, line or file")
    pv.add_argument("--train-on", default="responses")
    pv.add_argument("--max-seq-len", type=int, default=512)
    pv.add_argument("--max-examples", type=int, default=0)
    pv.add_argument("--val-split", type=float, default=0.1, help="as the run's train.val_split")
    pv.add_argument("--seed", type=int, default=42, help="as the run's train.seed (the split depends on it)")
    pv.add_argument("--facts", action="store_true", help="add the training split's token counts (for estimates)")
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
    e.add_argument(
        "--worst-case", action="store_true", help="do not read the dataset: every micro-batch batch_size × max_seq_len"
    )
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_estimate)
