"""`importance`: where an adapter acts on the data (LoRA-drop's output importance ‖ΔW x‖² per module).

    python -m engine importance 7 --json                           # run 7's adapter on its own dataset
    python -m engine importance runs/7/adapter --dataset data.jsonl --examples 64

The JSON has `modules` {full module name: mean ‖ΔW x‖² per token}, `layers` {layer: share of the total},
`keep` (the layers carrying --keep of it, LoRA-drop's selection), the sample (examples, tokens) and `cached`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.cli.common import fail, home_of, key_error, open_store, print_json
from engine.core import importance as I
from engine.core.config import RunConfig
from engine.core.runs import ADAPTER_CONFIG, adapter_dir, is_adapter_folder

DATA_FIELDS = ("dataset_format", "columns", "dataset_split", "dataset_subset", "text_split", "max_examples")


def source_config(args) -> tuple[Path, dict[str, Any]]:
    """(adapter folder, the config dict it was trained with): a run's, the folder's loralab.json, or its base."""
    ref = args.adapter
    if ref.isdigit() and not Path(ref).exists():
        run = open_store(args).get_run(int(ref))
        return adapter_dir(run, args.home), dict(run.config)
    folder = Path(ref).expanduser()
    if not is_adapter_folder(folder):
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder (no {ADAPTER_CONFIG}) nor a run id")
    ours = folder / "loralab.json"
    if ours.is_file():
        return folder, dict(json.loads(ours.read_text(encoding="utf-8"))["run_config"])
    base = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{folder / ADAPTER_CONFIG} names no base_model_name_or_path; give the adapter of a run")
    return folder, {"model": base}


def run_config(trained: dict[str, Any], dataset: str | None, max_seq_len: int | None) -> RunConfig:
    """The trained config with the dataset to measure on; another dataset's data fields start from defaults."""
    d = {k: v for k, v in trained.items() if k not in ("name",)}
    if dataset and dataset != d.get("dataset"):
        d = {k: v for k, v in d.items() if k not in DATA_FIELDS}
        d["dataset"] = dataset
    if not d.get("dataset"):
        raise ValueError("this adapter has no dataset on record; give --dataset FILE_OR_ID")
    if max_seq_len:
        d["train"] = {**d.get("train", {}), "max_seq_len": max_seq_len}
    return RunConfig.from_dict(d)


def cmd_importance(args) -> int:
    if not 0 < args.keep <= 1:
        return fail(f"--keep {args.keep}: give a share in (0, 1], e.g. 0.9 (LoRA-drop's threshold)")
    if args.examples < 1:
        return fail(f"--examples {args.examples}: give at least 1")
    try:
        folder, trained = source_config(args)
        cfg = run_config(trained, args.dataset, args.max_seq_len)
    except KeyError as e:
        return fail(key_error(e))
    except ValueError as e:  # ConfigError included: every problem of the config, one line each
        return fail(str(e))
    if not is_adapter_folder(folder):
        return fail(f"{folder} has no saved adapter yet (runs save it at the end)")
    from engine.ml.importance import importance_report

    report = importance_report(folder, cfg, home_of(args), args.examples, use_cache=not args.no_cache)
    report["keep"] = {"fraction": args.keep, "layers": I.keep_layers(report["modules"], args.keep)}
    if args.json:
        print_json(report)
        return 0
    print(
        f"{folder}: {len(report['modules'])} modules, {report['examples']} examples ({report['tokens']:,} tokens) "
        f"of {cfg.dataset}{' (cached)' if report['cached'] else ''}"
    )
    print(f"  {'layer':>5} {'share':>7} {'cumulative':>10}")
    for layer, share, acc in I.ranked_layers(report["modules"]):
        print(f"  {layer:>5} {share:7.1%} {acc:10.1%}")
    print(f"layers carrying {args.keep:.0%} of the importance: {report['keep']['layers']}")
    return 0


def register(sub) -> None:
    sp = sub.add_parser("importance", help="LoRA-drop's output importance ‖ΔW x‖² of every adapted module on data")
    sp.add_argument("adapter", help="a run id or a PEFT adapter folder (LoRA, AdaLoRA, VeRA)")
    sp.add_argument("--dataset", help="data to measure on (default: the run's own dataset)")
    sp.add_argument("--examples", type=int, default=32, help="examples in the sample (default 32)")
    sp.add_argument("--max-seq-len", type=int, help="truncate examples to this many tokens (default: the run's)")
    sp.add_argument("--keep", type=float, default=I.DEFAULT_KEEP, help="report the layers carrying this share (0.9)")
    sp.add_argument("--no-cache", action="store_true", help="recompute even if this sample was measured before")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_importance)
