"""The engine's command line: everything the UI does, the CLI does too (the UI launches these commands).

    python -m engine train examples/quickstart.yaml        # foreground, progress bar, prints the run id
    python -m engine runs [--json]                         # list runs
    python -m engine show ID [--json]                      # one run: config, status, losses, paths
    python -m engine generate --run ID --prompt "Who are you?"
    python -m engine generate --base embedded:SmolLM2-135M-Instruct --prompt "Who are you?"
    python -m engine inspect MODEL [--json]                # architecture and LoRA-able modules

Global flags: --home DIR (data home, default $LORALAB_HOME or ~/.loralab), --db-url URL (another
database, default $LORALAB_DB_URL or SQLite in the data home). Heavy imports (torch) happen inside the
subcommands that need them, so `runs` and `show` answer instantly.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from engine.config import EMBEDDED_MODEL, ConfigError, RunConfig
from engine.home import data_home, run_dir

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def open_store(args):
    from storage import Store

    return Store(args.db_url) if args.db_url else Store.for_home(data_home(args.home))


# ---- train ------------------------------------------------------------------------------------


class ProgressSink:
    """A tqdm bar on a terminal, plain lines in a log file (the background job's train.log)."""

    def __init__(self) -> None:
        from engine.events import PrintSink

        self.bar = None
        self.lines = PrintSink(sys.stderr) if not sys.stderr.isatty() else None

    def log(self, step: int, metrics) -> None:
        if self.lines is not None:
            if "train/loss" in metrics or "val/loss" in metrics:
                self.lines.log(step, metrics)
            return
        from tqdm import tqdm

        if self.bar is None and "total_steps" in metrics:
            self.bar = tqdm(total=int(metrics["total_steps"]), initial=step, unit="step", dynamic_ncols=True)
        if self.bar is not None and "train/loss" in metrics:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", tok_s=f"{metrics.get('tokens_per_s', 0):.0f}")
        if self.bar is not None and "val/loss" in metrics:
            self.bar.write(f"step {step}: val loss {metrics['val/loss']:.4f}")

    def log_spectra(self, step, spectra, extra=None) -> None:
        pass

    def set_summary(self, **fields: Any) -> None:
        if self.bar is not None and "steps_done" in fields:
            self.bar.n = fields["steps_done"]
            self.bar.close()


def explain_failure(e: BaseException) -> str:
    """Known failures → the cause and the fix (torchtune/h2o style); anything else → type and message."""
    from engine.data import DatasetError
    from engine.model import ModelError

    name = type(e).__name__
    if isinstance(e, (ConfigError, DatasetError, ModelError, FileNotFoundError)):
        return str(e)
    if name == "OutOfMemoryError" or isinstance(e, MemoryError) or "out of memory" in str(e).lower():
        return (f"out of memory ({name}): lower train.batch_size or train.max_seq_len, raise train.grad_accum to "
                "keep the effective batch, turn on train.gradient_checkpointing, or use quant: 4bit")
    if name == "TrainingDiverged":
        return str(e)
    return f"{name}: {e}"


def cmd_train(args) -> int:
    try:
        cfg = RunConfig.from_file(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    store = open_store(args)
    home = data_home(args.home)
    from storage import RunStatus, StoreSink

    run_id = args.run_id
    if run_id is None:  # foreground run: it records itself, born running so no queue worker claims it
        run_id = store.create_run(cfg.name or Path(args.config).stem, cfg.to_dict(), "", model=cfg.model,
                                  status=RunStatus.RUNNING)
        out = run_dir(home, run_id)
        store.set_out_dir(run_id, str(out))
        (out / "config.json").write_text(cfg.to_json())
    else:
        out = Path(store.get_run(run_id).out_dir or run_dir(home, run_id))
    resume = args.resume or store.get_run(run_id).resume_from
    if not store.mark_running(run_id, os.getpid()):  # cancelled (or ended) while this process was starting
        print(f"run {run_id} is already {store.get_run(run_id).status.value}; not training", file=sys.stderr)
        return 1

    stop = {"flag": False}

    def on_term(signum, frame):  # cancel: finish the step, save a checkpoint and the adapter, exit cleanly
        stop["flag"] = True
        print(f"received {signal.Signals(signum).name}: saving a checkpoint and stopping", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    from engine.events import TeeSink

    sink = TeeSink(StoreSink(store, run_id), ProgressSink())
    print(f"run {run_id}: {cfg.model} on {cfg.dataset} → {out}", file=sys.stderr, flush=True)
    try:
        from engine.train import train

        result = train(cfg, out, sink, lambda: stop["flag"], resume_from=resume, home=home)
    except BaseException as e:  # record every ending, then let the exit code speak
        msg = explain_failure(e)
        if not isinstance(e, (ConfigError, ValueError, KeyboardInterrupt)):
            traceback.print_exc()
        print(f"error: {msg}", file=sys.stderr, flush=True)
        store.finish(run_id, RunStatus.FAILED, error=msg, exit_code=1)
        return 1
    status = RunStatus.CANCELLED if result.status == "cancelled" else RunStatus.SUCCEEDED
    store.finish(run_id, status, exit_code=0)
    val = f", val loss {result.final_val_loss:.4f}" if result.final_val_loss is not None else ""
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    print(f"run {run_id} {status.value}: {result.steps_done}/{result.total_steps} steps, loss {loss}{val}, "
          f"{result.duration_s:.0f} s; adapter: {result.adapter_dir}", file=sys.stderr, flush=True)
    print(run_id)
    return 0


# ---- runs / show ------------------------------------------------------------------------------------


def run_to_dict(r) -> dict[str, Any]:
    import dataclasses

    d = dataclasses.asdict(r)
    for k, v in d.items():
        if hasattr(v, "isoformat"):
            d[k] = v.isoformat()
    d["status"] = str(r.status.value if hasattr(r.status, "value") else r.status)
    return d


def cmd_runs(args) -> int:
    runs = open_store(args).list_runs(status=args.status)
    if args.json:
        print(json.dumps([run_to_dict(r) for r in runs], indent=2))
        return 0
    print(f"{'id':>4}  {'status':<10} {'model':<34} {'r':>3} {'alpha':>5} {'loss':>8} {'val':>8}  name")
    for r in runs:
        lo = r.config.get("lora", {})
        fmt = lambda x: f"{x:8.4f}" if x is not None else f"{'-':>8}"  # noqa: E731
        print(f"{r.id:>4}  {r.status.value:<10} {r.model[-34:]:<34} {lo.get('r', ''):>3} {lo.get('alpha', ''):>5} "
              f"{fmt(r.final_loss)} {fmt(r.final_val_loss)}  {r.name}")
    return 0


def cmd_show(args) -> int:
    store = open_store(args)
    try:
        r = store.get_run(args.id)
    except KeyError as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    d = run_to_dict(r)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    for k in ("id", "name", "status", "model", "created_at", "started_at", "finished_at", "steps_done", "total_steps",
              "final_loss", "best_val_loss", "final_val_loss", "duration_s", "peak_mem_gb", "trainable_params",
              "total_params", "device", "out_dir", "adapter_dir", "error"):
        if d.get(k) is not None:
            print(f"{k:>16}: {d[k]}")
    print("          config:")
    print("\n".join("    " + line for line in json.dumps(r.config, indent=2).splitlines()))
    return 0


# ---- generate / inspect -------------------------------------------------------------------------------


def cmd_generate(args) -> int:
    from engine.generate import ChatModel, GenParams, adapter_base_model

    adapter = args.adapter
    base = args.base
    if args.run is not None:
        r = open_store(args).get_run(args.run)
        adapter = r.adapter_dir or str(Path(r.out_dir) / "adapter")
        base = base or r.config.get("model", EMBEDDED_MODEL)
    if adapter and not base:
        base = adapter_base_model(adapter) or EMBEDDED_MODEL
    base = base or EMBEDDED_MODEL
    chat = ChatModel.load(base, {"adapter": adapter} if adapter else None, home=data_home(args.home))
    params = GenParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    for piece in chat.stream(messages, "adapter" if adapter else None, params):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_inspect(args) -> int:
    from engine.model import inspect_model

    info = inspect_model(args.model, data_home(args.home), trust_remote_code=args.trust_remote_code)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{info['model']}  ({info['architecture']}, {info['model_type']})")
    print(f"  parameters: {info['total_params']:,}   layers: {info['num_layers']}   hidden: {info['hidden_size']}   "
          f"heads: {info['num_attention_heads']} (kv {info['num_key_value_heads']})   vocab: {info['vocab_size']}")
    print("  LoRA-able modules (kind, group, count, in → out):")
    for k in info["kinds"]:
        print(f"    {k['target']:<14} {k['group']:<10} ×{k['count']:<4} {k['in_features']:>6} → {k['out_features']:<6}")
    return 0


def cmd_preview(args) -> int:
    """Dataset preview: format, counts, token lengths and the rendered chat template of one example."""
    from engine.data import preview
    from engine.model import load_tokenizer, resolve_model

    try:
        cfg = RunConfig.from_dict({"model": args.model, "dataset": args.dataset, "dataset_format": args.dataset_format,
                                   "train_on": args.train_on, "train": {"max_seq_len": args.max_seq_len}})
        tok = load_tokenizer(resolve_model(cfg.model, data_home(args.home)))
        info = preview(cfg, tok)
    except (ConfigError, ValueError, OSError) as e:  # DatasetError and ModelError are among these
        if args.json:
            print(json.dumps({"error": str(e)}))
        else:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=1))
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

    from engine.model import quant_support

    cuda = torch.cuda.is_available()
    info = {"device": "cuda" if cuda else "cpu", "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(),
            "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
            "gpu_mem_gb": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
            "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
            "quant": {k: {"ok": ok, "reason": why} for k, (ok, why) in quant_support().items()}}
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        for k, v in info.items():
            print(f"{k:>10}: {v}")
    return 0


def cmd_estimate(args) -> int:
    """Parameter count and memory estimate of a run config (module shapes from inspect, no weights read)."""
    from engine import estimate as E
    from engine.model import inspect_model

    try:
        cfg = RunConfig.from_file(args.config)
        anatomy = inspect_model(cfg.model, data_home(args.home), trust_remote_code=cfg.trust_remote_code)
        est = E.estimate(anatomy, cfg, device=args.device)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fits = E.fits(est)
    if args.json:
        print(json.dumps({**est.to_dict(), "fits": [{"gpu_gb": g, "fits": ok} for g, ok in fits],
                          "suggestions": E.suggestions(anatomy, cfg, est, args.budget_gb) if args.budget_gb else []},
                         indent=1))
        return 0
    print(f"{cfg.model}: {est.trainable_params:,} trainable of {est.total_params:,} parameters "
          f"({est.trainable_pct:.3f}%), {est.n_modules} LoRA modules, adapter file ≈ {est.adapter_file_bytes / 2**20:.1f} MiB")
    print(f"memory on {args.device} ({est.compute_dtype}, quant {est.quant}):")
    for label, n, note in est.table_rows():
        print(f"  {label:<40} {E.gb(n):8.3f} GB   {note}")
    print("  fits on: " + ", ".join(f"{g:g} GB {'yes' if ok else 'no'}" for g, ok in fits))
    for line in E.suggestions(anatomy, cfg, est, args.budget_gb) if args.budget_gb else []:
        print(f"  suggestion: {line}")
    return 0


def cmd_spectra(args) -> int:
    """σ(ΔW) of every adapted module, with effective rank, energy and per-layer heatmaps."""
    from engine import spectra as S

    if args.run is not None:
        r = open_store(args).get_run(args.run)
        target = r.adapter_dir or str(Path(r.out_dir) / "adapter")
    elif args.adapter:
        target = args.adapter
    else:
        print("error: give an adapter folder or --run ID", file=sys.stderr)
        return 2
    if not (Path(target) / "adapter_config.json").is_file():
        print(f"error: {target} is not a PEFT adapter folder (no adapter_config.json)", file=sys.stderr)
        return 2
    spectra = S.adapter_spectra(target)
    if args.json:
        print(json.dumps(S.to_json(spectra), indent=1))
        return 0
    print(f"{target}: {len(spectra)} modules")
    print(f"  {'module':<48} {'r':>3} {'‖ΔW‖_F':>9} {'σ1':>9} {'eff.rank':>8} {'top-1 energy':>12}")
    for name, m in spectra.items():
        print(f"  {name[-48:]:<48} {m.r:>3} {m.fro_norm:9.4f} {m.spectral_norm:9.4f} {m.effective_rank:8.2f} "
              f"{m.energy_topk.get(1, 0):12.1%}")
    return 0


# ---- wiring ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine", description="LoRA Lab engine")
    p.add_argument("--home", help="data home (default $LORALAB_HOME or ~/.loralab)")
    p.add_argument("--db-url", default=os.environ.get("LORALAB_DB_URL"), help="SQLAlchemy URL of another database")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train in the foreground; prints the run id")
    t.add_argument("config", help="YAML or JSON run config")
    t.add_argument("--run-id", type=int, help="an existing queued run to execute (used by the job queue)")
    t.add_argument("--resume", help="a checkpoint folder to continue from")
    t.set_defaults(fn=cmd_train)

    r = sub.add_parser("runs", help="list runs")
    r.add_argument("--json", action="store_true")
    r.add_argument("--status", help="only runs with this status")
    r.set_defaults(fn=cmd_runs)

    s = sub.add_parser("show", help="one run in detail")
    s.add_argument("id", type=int)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_show)

    g = sub.add_parser("generate", help="one chat reply from a base model, an adapter or a run")
    g.add_argument("--run", type=int, help="use this run's adapter (and its base model)")
    g.add_argument("--adapter", help="a PEFT adapter folder")
    g.add_argument("--base", help=f"base model (default: the run's, the adapter's, or {EMBEDDED_MODEL})")
    g.add_argument("--prompt", required=True)
    g.add_argument("--system", help="an optional system message")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(fn=cmd_generate)

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
    from engine.jobs import add_subcommands

    add_subcommands(sub, open_store)
    e = sub.add_parser("estimate", help="trainable parameters and memory estimate of a run config")
    e.add_argument("config", help="YAML or JSON run config")
    e.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="estimate for this device")
    e.add_argument("--budget-gb", type=float, help="suggest changes that fit this much memory")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_estimate)

    sp = sub.add_parser("spectra", help="singular values of every ΔW of a PEFT LoRA adapter")
    sp.add_argument("adapter", nargs="?", help="a PEFT adapter folder (any, not only ours)")
    sp.add_argument("--run", type=int, help="the adapter of this run")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_spectra)
    from engine.export import add_subcommands as add_export_subcommands
    add_export_subcommands(sub, open_store)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
