"""Taking a run elsewhere: `export` (adapter zip, merged model) and `push` (to the Hugging Face Hub)."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from engine.cli.common import fail, home_of, key_error, open_store, say
from engine.core.config import EMBEDDED_MODEL
from engine.core.export import (
    ExportError,
    export_adapter_zip,
    model_card,
    push_adapter,
    redact,
    run_adapter,
    stored_summary,
    upload_folder,
)
from engine.core.runs import is_adapter_folder


def merge_run(run, out: Path, home: Path, *, dtype: str = "fp32", overwrite: bool = False, card: str | None = None):
    from engine.ml.merge import merge

    return merge(
        str(run.config.get("model", EMBEDDED_MODEL)),
        run_adapter(run, home),
        out,
        dtype=dtype,
        home=home,
        card=card,
        overwrite=overwrite,
        trust_remote_code=bool(run.config.get("trust_remote_code", False)),
    )


def cmd_export(args) -> int:
    gguf = bool(args.gguf or args.gguf_adapter)
    if not args.merged and not args.zip and not gguf:
        return fail(
            "say what to export: --merged OUT_DIR, --zip OUT.zip, --gguf OUT.gguf and/or --gguf-adapter OUT.gguf"
        )
    if (args.merged or args.zip) and not isinstance(args.id, int):
        return fail(
            f"--merged and --zip take a run id, not the folder {args.id}; an adapter folder exports with --gguf"
        )
    if gguf:
        code = cmd_export_gguf(args)
        if code or not (args.merged or args.zip):
            return code
    store, home = open_store(args), home_of(args)
    try:
        run = store.get_run(args.id)
        if args.zip:
            print(f"adapter zip: {export_adapter_zip(run, store, home, args.zip, which=args.adapter)}")
        if args.merged:
            card = model_card(run, stored_summary(store, run.id), merged=True)
            out = merge_run(run, Path(args.merged), home, dtype=args.dtype, overwrite=args.force, card=card)
            print(f"merged model: {out}")
    except KeyError as e:
        return fail(key_error(e))
    except (ExportError, OSError) as e:
        return fail(str(e))
    return 0


def run_or_folder(value: str) -> int | str:
    """A run id, or a PEFT adapter folder (with adapter_config.json)."""
    if value.isdigit():
        return int(value)
    if is_adapter_folder(value):
        return str(Path(value).expanduser().resolve())
    raise argparse.ArgumentTypeError(
        f"{value!r} is neither a run id nor a PEFT adapter folder (with adapter_config.json)"
    )


def gguf_source(args, home: Path) -> dict:
    """base model, adapter folder, title and trust flag of what `export ID --gguf...` exports."""
    from engine.core.chat import adapter_base_model

    if isinstance(args.id, int):
        run = open_store(args).get_run(args.id)
        return {
            "base": args.base or str(run.config.get("model", EMBEDDED_MODEL)),
            "adapter": run_adapter(run, home),
            "title": f"{run.name or 'run'} (LoRA Lab run {run.id})",
            "trust_remote_code": bool(run.config.get("trust_remote_code", False)),
        }
    base = args.base or adapter_base_model(args.id)
    if not base:
        raise ExportError(f"{args.id}/adapter_config.json names no base model; say which with --base MODEL")
    return {"base": base, "adapter": Path(args.id), "title": Path(args.id).name, "trust_remote_code": False}


def cmd_export_gguf(args) -> int:
    """`export ID --gguf OUT.gguf` (merged model) and/or `--gguf-adapter OUT.gguf` (llama.cpp LoRA adapter)."""
    from engine.ml.gguf_export import check_outputs, modelfile_path  # light (gguf, numpy): refusals come fast

    home = home_of(args)
    outs = [Path(o) for o in (args.gguf_adapter, args.gguf) if o]
    if len(outs) == 2 and outs[0].resolve() == outs[1].resolve():
        return fail("--gguf and --gguf-adapter name the same file; give each its own")
    try:
        check_outputs(*outs, *map(modelfile_path, outs), force=args.force)  # before either export starts
        lines = export_gguf_files(args, home)
    except KeyError as e:
        return fail(key_error(e))
    except (ExportError, OSError) as e:
        return fail(str(e))
    for line in lines:
        (say if line.startswith("note:") else print)(line)
    return 0


def export_gguf_files(args, home: Path) -> list[str]:
    from engine.ml.gguf_export import export_adapter_gguf, export_merged_gguf
    from engine.ml.model import ModelError

    try:
        src = gguf_source(args, home)
        common = {"home": home, "force": args.force, "gguf_base": args.gguf_base, **src}
        lines = []
        if args.gguf_adapter:
            lines += export_adapter_gguf(out=args.gguf_adapter, kind=args.gguf_type or "f32", **common)
        if args.gguf:
            lines += export_merged_gguf(out=args.gguf, kind=args.gguf_type or "f16", **common)
        return lines
    except ModelError as e:
        raise ExportError(str(e)) from None


def cmd_push(args) -> int:
    store, home = open_store(args), home_of(args)
    token = os.environ.get("HF_TOKEN")
    try:
        run = store.get_run(args.id)
        summary = stored_summary(store, run.id)
        if args.merged:
            card = model_card(run, summary, merged=True).replace("REPO_ID", args.repo)
            with tempfile.TemporaryDirectory(prefix="loralab-push-") as tmp:
                folder = merge_run(run, Path(tmp) / "upload", home, card=card)
                url = upload_folder(
                    folder,
                    args.repo,
                    token,
                    not args.public,
                    commit_message=f"Upload merged model from LoRA Lab ({run.name or 'run'})",
                )
        else:
            url = push_adapter(run, args.repo, token=token, private=not args.public, spectra=summary, home=home)
    except KeyError as e:
        return fail(key_error(e), 1)
    except (ExportError, OSError) as e:
        return fail(redact(str(e), token), 1)
    print(
        f"pushed run {run.id} ({'merged model' if args.merged else 'adapter'}) to {url} "
        f"({'public' if args.public else 'private'})"
    )
    return 0


def register(sub) -> None:
    e = sub.add_parser(
        "export",
        help="a run's adapter as a zip, merged into its base model, or as GGUF for llama.cpp / Ollama / LM Studio",
    )
    e.add_argument("id", type=run_or_folder, help="a run id, or (for --gguf / --gguf-adapter) a PEFT adapter folder")
    e.add_argument("--merged", metavar="OUT_DIR", help="save base + adapter merged (merge_and_unload) here")
    e.add_argument("--zip", metavar="OUT.zip", help="write the adapter folder (with a model card) as a zip")
    e.add_argument(
        "--adapter",
        choices=("last", "best"),
        default="last",
        help="with --zip: the run's last adapter, or its best validation step's (early stopping)",
    )
    e.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16", "auto"], help="merged weights' dtype")
    e.add_argument(
        "--force",
        action="store_true",
        help="replace OUT_DIR if it holds an earlier merged export of LoRA Lab (never other files), or the GGUF "
        "and its Modelfile",
    )
    add_gguf_arguments(e)
    e.set_defaults(fn=cmd_export)

    p = sub.add_parser(
        "push",
        help="upload a run's adapter (or merged model) with a model card to the Hub",
        description="The token comes from HF_TOKEN or `hf auth login`; never from the command line.",
    )
    p.add_argument("id", type=int)
    p.add_argument("--repo", required=True, help="user-or-org/name")
    p.add_argument("--merged", action="store_true", help="push the merged model instead of the adapter")
    p.add_argument("--public", action="store_true", help="make a new repo public (default: private)")
    p.set_defaults(fn=cmd_push)


def add_gguf_arguments(e) -> None:
    g = e.add_argument_group("GGUF (llama.cpp, Ollama, LM Studio); an Ollama Modelfile is written beside each file")
    g.add_argument("--gguf", metavar="OUT.gguf", help="base + adapter merged into one GGUF model")
    g.add_argument("--gguf-adapter", metavar="OUT.gguf", help="the adapter alone, as a llama.cpp LoRA GGUF (--lora)")
    g.add_argument(
        "--gguf-type",
        choices=["f32", "f16", "bf16", "q8_0"],
        help="tensor type (default: f16 for --gguf, f32 for --gguf-adapter); norms stay f32",
    )
    g.add_argument(
        "--gguf-base",
        metavar="BASE.gguf",
        help="the base model's GGUF: the adapter's names and shapes are checked against it, the Modelfile uses it "
        "(default: the embedded model's own GGUF when the base is the embedded model)",
    )
    g.add_argument(
        "--base", metavar="MODEL", help="for an adapter folder: its base model (default: adapter_config.json's)"
    )
