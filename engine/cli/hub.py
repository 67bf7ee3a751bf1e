"""Taking a run elsewhere: `export` (adapter zip, merged model) and `push` (to the Hugging Face Hub)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from engine.cli.common import fail, home_of, key_error, open_store
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
    if not args.merged and not args.zip:
        return fail("say what to export: --merged OUT_DIR and/or --zip OUT.zip")
    store, home = open_store(args), home_of(args)
    try:
        run = store.get_run(args.id)
        if args.zip:
            print(f"adapter zip: {export_adapter_zip(run, store, home, args.zip)}")
        if args.merged:
            card = model_card(run, stored_summary(store, run.id), merged=True)
            out = merge_run(run, Path(args.merged), home, dtype=args.dtype, overwrite=args.force, card=card)
            print(f"merged model: {out}")
    except KeyError as e:
        return fail(key_error(e))
    except (ExportError, OSError) as e:
        return fail(str(e))
    return 0


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
    e = sub.add_parser("export", help="a run's adapter as a zip and/or merged into its base model")
    e.add_argument("id", type=int)
    e.add_argument("--merged", metavar="OUT_DIR", help="save base + adapter merged (merge_and_unload) here")
    e.add_argument("--zip", metavar="OUT.zip", help="write the adapter folder (with a model card) as a zip")
    e.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16", "auto"], help="merged weights' dtype")
    e.add_argument(
        "--force",
        action="store_true",
        help="replace OUT_DIR if it holds an earlier merged export of LoRA Lab (never other files)",
    )
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
