"""`compare`: the outcomes of the base and chosen adapters on the same evaluation prompts, side by side.

    python -m engine compare --runs 3 best:3 4 --base --val --limit 20      # held-out rows of run 3
    python -m engine compare --runs 3 4 --prompts eval.jsonl --csv out.csv --json

One process holds one base copy with every adapter attached (engine.ml.compare over the chat worker's
ChatModel), generates greedily, scores against each row's response (exact match, ROUGE-L, chrF) and
measures the held-out perplexity on response tokens. The result is written to every compared run's
folder (engine.core.runs.compare_path) and, with --csv, as one row per prompt × model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.cli.common import fail, home_of, key_error, open_store, print_json
from engine.cli.importance import run_config
from engine.core import compare as C
from engine.core.chat import GenParams
from engine.core.runs import chosen_adapter, compare_path, is_adapter_folder


def selected(args, store, home: Path) -> tuple[list[str], dict[str, Any], dict[str, Path], dict[str, str]]:
    """(model keys, {run id: run}, {key: adapter folder}, {key: label}) of --runs and --base."""
    keys = C.parse_models(args.runs or [], base=args.base)
    runs, folders, labels = {}, {}, {C.BASE: "base"}
    for key in keys:
        if key == C.BASE:
            continue
        kind, rid = C.parse_model(key)
        run = runs.get(rid) or store.get_run(rid)
        runs[rid] = run
        folder = chosen_adapter(run, "best" if kind == "best" else "last", home)
        if not is_adapter_folder(folder):
            raise ValueError(f"run {rid} has no saved adapter yet (runs save it at the end); pick a finished run")
        folders[key] = folder
        labels[key] = f"#{rid} {run.name}{' (best)' if kind == 'best' else ''}"
    if not runs:
        raise ValueError("give at least one run with --runs ID (its base model is the one compared)")
    return keys, runs, folders, labels


def cmd_compare(args) -> int:
    if args.max_new_tokens < 1 or args.limit < 0 or args.repetition_penalty <= 0:
        return fail("--max-new-tokens must be ≥ 1, --limit ≥ 0 (0 = all rows), --repetition-penalty > 0 (1 = none)")
    if bool(args.prompts) == bool(args.val):
        return fail(
            "give the evaluation prompts: --prompts FILE (any dataset file or id) or --val (the run's held-out rows)"
        )
    home, store = home_of(args), open_store(args)
    try:
        keys, runs, folders, labels = selected(args, store, home)
        first = next(iter(runs.values()))
        cfg = run_config(dict(first.config), args.prompts, None).replace(train_on="responses")
        if args.prompts:
            cfg = cfg.replace(train={"val_split": 0.0})
    except KeyError as e:
        return fail(key_error(e))
    except ValueError as e:  # ConfigError included
        return fail(str(e))
    from engine.ml import compare as MC
    from engine.ml.generate import ChatModel
    from engine.ml.model import load_tokenizer, resolve_model

    names = {k: (None if k == C.BASE else k.replace(":", "_")) for k in keys}
    chat = ChatModel.load(
        cfg.model, {names[k]: str(f) for k, f in folders.items()}, quant=cfg.quant, home=home, device=args.device
    )
    tok = load_tokenizer(resolve_model(cfg.model, home))
    examples, source = MC.prompt_examples(cfg, tok, home, val=bool(args.val), limit=args.limit)
    if args.val:
        source += f" (run {first.id}'s held-out split)"
    params = GenParams(max_new_tokens=args.max_new_tokens, temperature=0.0, repetition_penalty=args.repetition_penalty)
    result = MC.compare(chat, examples, {k: names[k] for k in keys}, params, labels, source)
    result["stored"] = [str(p) for p in C.save_result(result, [compare_path(r, home) for r in runs.values()])]
    if args.csv:
        result["csv"] = str(C.write_csv(result, args.csv))
    if args.json:
        print_json(result)
    else:
        print_text(result)
    return 0


def print_text(result: dict[str, Any]) -> None:
    labels = result["labels"]
    print(f"{result['base_model']}: {len(result['prompts'])} prompts ({result['source']})")
    for i, p in enumerate(result["prompts"], 1):
        print(f"\n── prompt {i}: {p['prompt'][-300:]}")
        if p.get("reference") is not None:
            print(f"   reference: {p['reference']}")
        for key in result["models"]:
            print(f"   [{labels[key]}] {p['outputs'][key]['text']}")
    print(f"\n{'model':<32} {'exact':>6} {'ROUGE-L':>8} {'chrF':>6} {'ppl':>9}")
    fmt = lambda x, f: "—" if x is None else format(x, f)
    for key, s in result["scores"].items():
        print(
            f"{labels[key]:<32} {fmt(s['exact_match'], '6.2f')} {fmt(s['rouge_l'], '8.3f')} "
            f"{fmt(s['chrf'], '6.1f')} {fmt(s['perplexity'], '9.3f')}"
        )
    for path in result["stored"]:
        print(f"stored: {path}")
    if result.get("csv"):
        print(f"csv: {result['csv']}")


def register(sub) -> None:
    sp = sub.add_parser("compare", help="outputs and scores of the base and chosen adapters on the same prompts")
    sp.add_argument("--runs", nargs="+", metavar="ID", help="runs to compare: ID or run:ID (last adapter), best:ID")
    sp.add_argument("--base", action="store_true", help="include the base model (adapters disabled)")
    sp.add_argument("--prompts", metavar="FILE", help="evaluation rows: any dataset the trainer reads (JSONL, CSV, …)")
    sp.add_argument("--val", action="store_true", help="the first run's held-out validation rows")
    sp.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    sp.add_argument(
        "--repetition-penalty",
        type=float,
        default=GenParams.repetition_penalty,
        help=f"greedy decoding's repetition penalty (default {GenParams.repetition_penalty}, the Chat tab's; 1 = none)",
    )
    sp.add_argument("--limit", type=int, default=0, help="compare on the first N rows only (default 0 = all)")
    sp.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    sp.add_argument("--csv", metavar="OUT.csv", help="also write one row per prompt × model")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_compare)
