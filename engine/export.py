"""Export a run: the adapter as a zip, a merged model in a folder, a push to the Hugging Face Hub with a
generated model card; and the CLI's `chat`, `export` and `push` subcommands.

    zip_adapter("runs/3/adapter", "run-3.zip")                    # adapter_config.json + adapter_model.safetensors
    merge("embedded:SmolLM2-135M-Instruct", "runs/3/adapter", "out/merged")   # W + ΔW, saved like any model
    text = model_card(run, spectra_summary(store.get_spectra(3)))  # README.md with YAML front matter
    url = push(run, "me/pirate-lora")                              # private unless private=False

    python -m engine chat --base MODEL [--adapter DIR ...] [--run ID ...] [--compare]
    python -m engine export ID --merged OUT_DIR [--zip OUT.zip]
    python -m engine push ID --repo NAME [--merged] [--public]

The token for push comes from the argument, else HF_TOKEN, else `hf auth login`'s saved token. It is
never written to the database, a log or a command line, and error messages have it replaced by "hf_***".
Importing this module is light (no torch): merge() and chat import it when they run.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Mapping

from engine.config import EMBEDDED_MODEL
from engine.home import data_home

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF was converted from
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
REDACTED = "hf_***"


class ExportError(RuntimeError):
    """An export that cannot be done; the message says why and what to do instead."""


# ---- zip ---------------------------------------------------------------------------------------------


def adapter_dir_of(run) -> Path:
    d = Path(run.adapter_dir or Path(run.out_dir) / "adapter")
    if not (d / "adapter_config.json").is_file():
        raise ExportError(f"run {run.id} has no adapter at {d} (status {getattr(run.status, 'value', run.status)}); "
                          "only a run that saved its adapter can be exported")
    return d


def zip_adapter(adapter_dir: str | Path, out_zip: str | Path, card: str | None = None) -> Path:
    """The adapter folder's files (not its sub-folders) in a zip, plus README.md when a card is given."""
    src, out = Path(adapter_dir), Path(out_zip)
    missing = [f for f in ADAPTER_FILES if not (src / f).is_file()]
    if missing:
        raise ExportError(f"{src} is not a complete PEFT adapter folder: missing {', '.join(missing)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for f in sorted(src.iterdir()):
            if f.is_file() and not (card is not None and f.name == "README.md"):
                z.write(f, f.name)
        if card is not None:
            z.writestr("README.md", card)
    os.replace(tmp, out)
    return out


# ---- merge -------------------------------------------------------------------------------------------


def merge(base: str, adapter_dir: str | Path, out_dir: str | Path, *, quant: str = "none", dtype: str = "fp32",
          home: Path | None = None, card: str | None = None, overwrite: bool = False,
          trust_remote_code: bool = False) -> Path:
    """W' = W + scaling·B·A in every adapted layer (peft's merge_and_unload), saved with the tokenizer.

    The merge happens on the CPU in `dtype` (fp32 default: no rounding of ΔW). A 4-bit or 8-bit base is
    refused: ΔW would be rounded into the quantized grid and a bitsandbytes model does not save as a plain
    checkpoint. A QLoRA run merges into the full-precision base, which is what `export` does.
    """
    if quant != "none":
        raise ExportError(f"cannot merge into a {quant} base: adding ΔW to quantized weights rounds most of it away "
                          "and the result does not save as a plain checkpoint. Merge into the full-precision base "
                          "(quant none) instead; a QLoRA adapter applies to it unchanged.")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from engine import model as M
    from engine.generate import adapter_base_model, same_base

    home = home or data_home()
    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    trained_on = adapter_base_model(adapter_dir)
    if trained_on and not same_base(trained_on, base, home):
        raise ExportError(f"adapter {adapter_dir} was trained on {trained_on!r}, not on {base!r}; merge it into its own base")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{out} exists and is not empty; choose a new folder (or pass --force to replace it)")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": "auto"}[dtype]
    ref = M.resolve_model(base, home)
    tok_src = str(adapter_dir) if (adapter_dir / "tokenizer_config.json").is_file() else ref
    tok = M.load_tokenizer(tok_src, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
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


# ---- model card --------------------------------------------------------------------------------------


def _sigma(x: Any) -> list[float]:
    values = getattr(x, "sigma", None)
    if values is None:
        values = getattr(x, "values", None)
    return [float(v) for v in (values or [])]


def spectra_summary(spectra: Mapping[str, Any], top: int = 5) -> dict[str, Any]:
    """Mean effective rank and the modules with the largest ‖ΔW‖_F, from stored SpectrumRecords or from
    engine.spectra's ModuleSpectrum objects (anything with `values` or `sigma`: σ of ΔW)."""
    rows = []
    for name, rec in spectra.items():
        s = [v for v in _sigma(rec) if v > 0]
        total = sum(s)
        fro = math.sqrt(sum(v * v for v in s))
        eff = math.exp(-sum((v / total) * math.log(v / total) for v in s)) if total > 0 else 0.0
        rows.append((name, fro, eff, len(_sigma(rec))))
    if not rows:
        return {}
    rows.sort(key=lambda r: -r[1])
    return {"modules": len(rows), "mean_effective_rank": sum(r[2] for r in rows) / len(rows),
            "max_rank": max(r[3] for r in rows), "total_fro_norm": math.sqrt(sum(r[1] ** 2 for r in rows)),
            "top": [{"module": n, "fro_norm": f, "effective_rank": e} for n, f, e, _ in rows[:top]]}


def hub_base_id(model: str) -> str | None:
    """The base model as a hub id for the card's metadata, or None for a local folder."""
    if model == EMBEDDED_MODEL:
        return EMBEDDED_HUB_ID
    if HUB_ID.match(model) and not Path(model).expanduser().exists():
        return model
    return None


def flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.extend(flatten(v, f"{prefix}{k}."))
        else:
            out.append((f"{prefix}{k}", v))
    return out


def show(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v) if v else "(none)"
    if isinstance(v, float):
        return f"{v:g}"
    return "(empty)" if v == "" else str(v)


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "n/a" if x is None else format(x, fmt)


def model_card(run: Any, spectra: Mapping[str, Any] | None = None, *, merged: bool = False) -> str:
    """README.md for the Hub: YAML front matter, then dataset, every hyper-parameter, losses, spectra.

    `run` is a storage RunRecord (or anything with .config and the loss fields); `spectra` is
    spectra_summary()'s dict.
    """
    cfg = dict(run.config)
    base = str(cfg.get("model", EMBEDDED_MODEL))
    base_id = hub_base_id(base)
    dataset = str(cfg.get("dataset", ""))
    title = run.name or (f"run {run.id}" if getattr(run, "id", None) is not None else "LoRA adapter")
    meta = ["---"]
    if base_id:
        meta.append(f"base_model: {base_id}")
    meta += ["library_name: transformers" if merged else "library_name: peft", "pipeline_tag: text-generation",
             "tags:", "- lora", "- peft", "- loralab"]
    if base_id:
        meta.append(f"- base_model:{'finetune' if merged else 'adapter'}:{base_id}")
    if HUB_ID.match(dataset) and not Path(dataset).exists():
        meta += ["datasets:", f"- {dataset}"]
    meta.append("---")

    what = "a merged model (LoRA folded into the base weights)" if merged else "a LoRA adapter (PEFT format)"
    lines = [*meta, "", f"# {title}", "", f"This is {what} for **{base}**"
             + (f" (`{base_id}`)" if base_id and base_id != base else "") + ", trained with LoRA Lab.", ""]
    if cfg.get("quant", "none") != "none" and merged:
        lines += [f"Trained on a {cfg['quant']} base (QLoRA) and merged into the full-precision base, so outputs "
                  "differ slightly from the quantized model's.", ""]
    lines += ["## Training data", "", f"- dataset: `{dataset}`", f"- format: {cfg.get('dataset_format', 'auto')}",
              f"- loss on: {cfg.get('train_on', 'responses')}", ""]
    lines += ["## Hyper-parameters", "", "| parameter | value |", "|---|---|"]
    lines += [f"| `{k}` | {show(v)} |" for k, v in flatten(cfg)]
    res = [("final train loss", _num(getattr(run, "final_loss", None))),
           ("best validation loss", _num(getattr(run, "best_val_loss", None))),
           ("final validation loss", _num(getattr(run, "final_val_loss", None)))]
    steps, total = getattr(run, "steps_done", None), getattr(run, "total_steps", None)
    if steps is not None:
        res.append(("steps", f"{steps}" + (f" of {total}" if total else "")))
    for label, attr, fmt in (("tokens seen", "tokens_seen", ","), ("duration (s)", "duration_s", ".0f"),
                             ("trainable parameters", "trainable_params", ","), ("total parameters", "total_params", ","),
                             ("peak memory (GB)", "peak_mem_gb", ".2f"), ("device", "device", "")):
        v = getattr(run, attr, None)
        if v is not None:
            res.append((label, format(v, fmt)))
    lines += ["", "## Results", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in res]]
    if spectra:
        lines += ["", "## ΔW spectra", "",
                  f"σ(ΔW) of {spectra['modules']} adapted modules (ΔW = scaling·B·A): mean effective rank "
                  f"{spectra['mean_effective_rank']:.2f} of at most {spectra['max_rank']}, total ‖ΔW‖_F "
                  f"{spectra['total_fro_norm']:.4f}. Largest updates:", "",
                  "| module | ‖ΔW‖_F | effective rank |", "|---|---|---|"]
        lines += [f"| `{t['module']}` | {t['fro_norm']:.4f} | {t['effective_rank']:.2f} |" for t in spectra["top"]]
    load_id = base_id or base
    if merged:
        usage = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                 'model = AutoModelForCausalLM.from_pretrained("REPO_ID")',
                 'tok = AutoTokenizer.from_pretrained("REPO_ID")']
    else:
        usage = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
                 f'base = AutoModelForCausalLM.from_pretrained("{load_id}")',
                 'model = PeftModel.from_pretrained(base, "REPO_ID")']
    lines += ["", "## Usage", "", "```python", *usage, "```", ""]
    return "\n".join(lines)


def run_like_from_adapter(adapter_dir: str | Path) -> Any:
    """A stand-in for a RunRecord from an adapter folder alone (its loralab.json, else peft's config)."""
    import json

    d = Path(adapter_dir)
    ours = d / "loralab.json"
    if ours.is_file():
        cfg = json.loads(ours.read_text())["run_config"]
    else:
        peft_cfg = json.loads((d / "adapter_config.json").read_text())
        cfg = {"model": peft_cfg.get("base_model_name_or_path") or "unknown",
               "lora": {"r": peft_cfg.get("r"), "alpha": peft_cfg.get("lora_alpha"),
                        "dropout": peft_cfg.get("lora_dropout"), "targets": peft_cfg.get("target_modules")}}
    return SimpleNamespace(id=None, name=d.parent.name if d.name == "adapter" else d.name, config=cfg,
                           final_loss=None, best_val_loss=None, final_val_loss=None)


# ---- push --------------------------------------------------------------------------------------------


def redact(text: str, token: str | None) -> str:
    """The text with the token (and anything shaped like an HF token) replaced."""
    if token:
        text = text.replace(token, REDACTED)
    return re.sub(r"hf_[A-Za-z0-9]{8,}", REDACTED, text)


def push(source: Any, repo_id: str, token: str | None = None, private: bool = True, merged: bool = False, *,
         spectra: Mapping[str, Any] | None = None, home: Path | None = None, endpoint: str | None = None,
         commit_message: str | None = None) -> str:
    """Upload the adapter (or the merged model) with its model card to `repo_id`; returns the repo URL.

    `source` is a RunRecord or an adapter folder. The repo is created private unless private=False
    (exist_ok: pushing again adds a commit). `endpoint` points huggingface_hub at another server (the
    tests' stand-in; HF_ENDPOINT does the same for the CLI).
    """
    from huggingface_hub import HfApi, get_token

    if not HUB_ID.match(repo_id or ""):
        raise ExportError(f"repo {repo_id!r} is not a repo id: write it as 'user-or-org/name'")
    if isinstance(source, (str, Path)):
        adapter_dir, run = Path(source), run_like_from_adapter(source)
    else:
        adapter_dir, run = adapter_dir_of(source), source
    token = token or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise ExportError("no Hugging Face token: set HF_TOKEN, run `hf auth login`, or paste a write token "
                          "into the token field (it is used for this upload only and never stored)")
    card = model_card(run, spectra, merged=merged).replace("REPO_ID", repo_id)
    error: ExportError | None = None
    with tempfile.TemporaryDirectory(prefix="loralab-push-") as tmp:
        folder = Path(tmp) / "upload"
        if merged:
            merge(str(run.config.get("model", EMBEDDED_MODEL)), adapter_dir, folder, home=home, card=card,
                  trust_remote_code=bool(run.config.get("trust_remote_code", False)))
        else:
            folder.mkdir()
            for f in adapter_dir.iterdir():
                if f.is_file() and f.name != "README.md":
                    shutil.copy2(f, folder / f.name)
            (folder / "README.md").write_text(card, encoding="utf-8")
        api = HfApi(endpoint=endpoint, token=token)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                              commit_message=commit_message or f"Upload {'merged model' if merged else 'LoRA adapter'} "
                                                               f"from LoRA Lab ({run.name or 'adapter'})")
        except Exception as e:  # rebuilt outside the except block below, so no chained traceback keeps the token
            error = ExportError(redact(f"push to {repo_id} failed: {type(e).__name__}: {e}", token))
    if error is not None:
        raise error
    return str(url)


# ---- CLI ---------------------------------------------------------------------------------------------


def adapter_name(path: str, taken: Iterable[str]) -> str:
    """A short pane name for an adapter folder: run3 for <home>/runs/3/adapter, else the folder's name."""
    p = Path(path).expanduser().resolve()
    name = p.name
    if p.name == "adapter":
        name = f"run{p.parent.name}" if p.parent.name.isdigit() else p.parent.name
    taken, n, out = set(taken), 2, name
    while out in taken or out == "base":
        out, n = f"{name}-{n}", n + 1
    return out


def cmd_chat(args, open_store) -> int:
    from engine.chat import GenParams
    from engine.generate import AdapterBaseMismatch, ChatModel, adapter_base_model

    home = data_home(args.home)
    dirs = list(args.adapter or [])
    for rid in args.run or []:
        dirs.append(str(adapter_dir_of(open_store(args).get_run(rid))))
    base = args.base or (adapter_base_model(dirs[0]) if dirs else None) or EMBEDDED_MODEL
    names: dict[str, str] = {}
    for d in dirs:
        names[adapter_name(d, names)] = d
    print(f"loading {base} with {len(names)} adapter(s) ...", file=sys.stderr, flush=True)
    try:
        chat = ChatModel.load(base, quant=args.quant, home=home)
        for name, d in names.items():
            chat.add_adapter(name, d)
    except (AdapterBaseMismatch, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    params = GenParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       seed=args.seed)
    panes: list[str | None] = [None, *names] if args.compare else [next(iter(names), None)]
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: dict[str | None, list[dict[str, str]]] = {p: list(system) for p in [None, *names]}
    label = lambda p: p or "base"  # noqa: E731
    tty = sys.stdin.isatty()
    print(f"chatting with {', '.join(label(p) for p in panes)} on {base} ({chat.device}). "
          "Commands: /use NAME|base, /compare, /reset, /quit", file=sys.stderr, flush=True)
    while True:
        try:
            line = input("you> " if tty else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history = {p: list(system) for p in history}
            continue
        if line == "/compare":
            panes = [None, *names]
            continue
        if line.startswith("/use"):
            want = line.split(maxsplit=1)[1] if " " in line else ""
            if want not in ("base", *names):
                print(f"error: no pane {want!r}; choose base or {', '.join(names) or '(no adapters)'}", file=sys.stderr)
                continue
            panes = [None if want == "base" else want]
            continue
        for p in panes:
            history[p].append({"role": "user", "content": line})
            print(f"[{label(p)}] " if len(panes) > 1 else "", end="", flush=True)
            pieces = []
            for piece in chat.stream(history[p], p, params):
                pieces.append(piece)
                print(piece, end="", flush=True)
            print(flush=True)
            history[p].append({"role": "assistant", "content": "".join(pieces)})
    return 0


def cmd_export(args, open_store) -> int:
    if not args.merged and not args.zip:
        print("error: say what to export: --merged OUT_DIR and/or --zip OUT.zip", file=sys.stderr)
        return 2
    store = open_store(args)
    try:
        run = store.get_run(args.id)
        adapter_dir = adapter_dir_of(run)
        summary = spectra_summary(store.get_spectra(run.id))
        if args.zip:
            print(f"adapter zip: {zip_adapter(adapter_dir, args.zip, model_card(run, summary))}")
        if args.merged:
            out = merge(str(run.config.get("model", EMBEDDED_MODEL)), adapter_dir, args.merged, dtype=args.dtype,
                        home=data_home(args.home), card=model_card(run, summary, merged=True), overwrite=args.force,
                        trust_remote_code=bool(run.config.get("trust_remote_code", False)))
            print(f"merged model: {out}")
    except (KeyError, ExportError, OSError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2
    return 0


def cmd_push(args, open_store) -> int:
    store = open_store(args)
    token = os.environ.get("HF_TOKEN")
    try:
        run = store.get_run(args.id)
        url = push(run, args.repo, token=token, private=not args.public, merged=args.merged,
                   spectra=spectra_summary(store.get_spectra(run.id)), home=data_home(args.home))
    except (KeyError, ExportError, OSError) as e:
        print(f"error: {redact(str(e.args[0] if isinstance(e, KeyError) and e.args else e), token)}", file=sys.stderr)
        return 1
    print(f"pushed run {run.id} ({'merged model' if args.merged else 'adapter'}) to {url} "
          f"({'public' if args.public else 'private'})")
    return 0


def add_subcommands(sub, open_store) -> None:
    """`chat`, `export` and `push` on the engine's CLI (engine/__main__.py calls this)."""
    from functools import partial

    c = sub.add_parser("chat", help="interactive chat with a base model and adapters, streamed")
    c.add_argument("--base", help=f"base model (default: the first adapter's base, else {EMBEDDED_MODEL})")
    c.add_argument("--adapter", action="append", help="a PEFT adapter folder (repeat for several)")
    c.add_argument("--run", type=int, action="append", help="the adapter of this run (repeatable)")
    c.add_argument("--compare", action="store_true", help="answer every prompt with the base and each adapter")
    c.add_argument("--quant", default="none", choices=["none", "8bit", "4bit"])
    c.add_argument("--system", help="a system message at the start of every conversation")
    c.add_argument("--max-new-tokens", type=int, default=128)
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    c.add_argument("--top-p", type=float, default=0.95)
    c.add_argument("--seed", type=int, default=0, help="the same seed for every pane")
    c.set_defaults(fn=partial(cmd_chat, open_store=open_store))

    e = sub.add_parser("export", help="a run's adapter as a zip and/or merged into its base model")
    e.add_argument("id", type=int)
    e.add_argument("--merged", metavar="OUT_DIR", help="save base + adapter merged (merge_and_unload) here")
    e.add_argument("--zip", metavar="OUT.zip", help="write the adapter folder (with a model card) as a zip")
    e.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16", "auto"], help="merged weights' dtype")
    e.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    e.set_defaults(fn=partial(cmd_export, open_store=open_store))

    p = sub.add_parser("push", help="upload a run's adapter (or merged model) with a model card to the Hub",
                       description="The token comes from HF_TOKEN or `hf auth login`; never from the command line.")
    p.add_argument("id", type=int)
    p.add_argument("--repo", required=True, help="user-or-org/name")
    p.add_argument("--merged", action="store_true", help="push the merged model instead of the adapter")
    p.add_argument("--public", action="store_true", help="make a new repo public (default: private)")
    p.set_defaults(fn=partial(cmd_push, open_store=open_store))
