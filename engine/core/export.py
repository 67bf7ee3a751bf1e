"""What leaves the data home: the adapter as a zip with its model card, and uploads to the Hugging Face Hub.
No torch here (merging lives in engine.ml.merge); huggingface_hub writes the card's metadata and uploads.

    path = export_adapter_zip(run, store, home)        # <home>/exports/run-<id>-adapter.zip, card inside
    text = model_card(run, summarize(...))             # README.md: YAML front matter, data, hyper-parameters
    url = upload_folder(folder, "me/pirate-lora")      # private unless private=False

The token comes from the argument, else HF_TOKEN, else `hf auth login`'s saved token. It is never written
to the database, a log or a command line, and error messages have it replaced by "hf_***".
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from engine.core.config import EMBEDDED_MODEL
from engine.core.runs import (
    ADAPTER_CONFIG,
    adapter_dir,
    adapter_zip_path,
    best_info,
    chosen_adapter,
    is_adapter_folder,
)
from engine.core.spectrum import record_stats, summarize

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF was converted from
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ADAPTER_FILES = (ADAPTER_CONFIG, "adapter_model.safetensors")
REDACTED = "hf_***"


class ExportError(RuntimeError):
    """An export that cannot be done; the message says why and what to do instead."""


# ---- where a merged model may go ----------------------------------------------------------------------

EXPORT_MARKER = "loralab-export.json"  # written into every merged folder: the files it holds are ours


def export_files(folder: Path) -> list[str] | None:
    """The files a LoRA Lab merged export recorded writing, or None if `folder` is not one."""
    try:
        files = json.loads((Path(folder) / EXPORT_MARKER).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [str(f) for f in files] if isinstance(files, list) else None


def mark_export(folder: Path, **about: Any) -> None:
    """Record every file in `folder` as written by this export (what a later --force may replace)."""
    files = sorted(p.name for p in Path(folder).iterdir()) + [EXPORT_MARKER]
    (Path(folder) / EXPORT_MARKER).write_text(json.dumps({"files": files, **about}, indent=1), encoding="utf-8")


def check_merge_target(out: str | Path, home: str | Path, overwrite: bool = False) -> None:
    """Refuse a merge target whose replacement could delete anything LoRA Lab did not write there.

    A new or empty folder is fine. A non-empty one only with overwrite, and only if it is a merged export
    of ours (its loralab-export.json lists every file in it, no sub-folders). Never the data home, a folder
    holding it, or a symbolic link.
    """
    out, home = Path(out).expanduser(), Path(home).expanduser().resolve()
    target = out.resolve()
    fresh = f"choose a new folder (e.g. {home / 'exports'}/run-N-merged)"
    if target == home or home.is_relative_to(target):
        raise ExportError(f"{out} holds the data home {home}: merging there could replace it; {fresh}")
    if out.is_symlink():
        raise ExportError(f"{out} is a symbolic link; {fresh}")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file, not a folder; {fresh}")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if not overwrite:
        raise ExportError(
            f"{out} exists and is not empty; {fresh}, or tick 'replace an earlier merged export' (--force) "
            "to replace a merged model LoRA Lab wrote there"
        )
    ours = export_files(out)
    if ours is None:
        raise ExportError(f"{out} is not a merged model LoRA Lab wrote (no {EXPORT_MARKER}): left alone; {fresh}")
    foreign = [e for e in entries if e not in ours or (out / e).is_dir()]
    if foreign:
        shown_names = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ExportError(f"{out} holds files LoRA Lab did not write there ({shown_names}): left alone; {fresh}")


# ---- the adapter of a run -----------------------------------------------------------------------------


def run_adapter(run: Any, home: str | Path | None = None) -> Path:
    """The run's saved adapter folder; ExportError if it has none."""
    d = adapter_dir(run, home)
    if not is_adapter_folder(d):
        raise ExportError(
            f"run {run.id} has no adapter at {d} (status {getattr(run.status, 'value', run.status)}); "
            "only a run that saved its adapter can be exported"
        )
    return d


def zip_adapter(adapter: str | Path, out_zip: str | Path, card: str | None = None) -> Path:
    """The adapter folder's files (not its sub-folders) in a zip, plus README.md when a card is given."""
    src, out = Path(adapter), Path(out_zip)
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


def stored_summary(store, run_id: int) -> dict[str, Any]:
    """The spectra summary of a run's latest stored step (see engine.core.spectrum.summarize)."""
    return summarize({name: record_stats(rec) for name, rec in store.get_spectra(run_id).items()})


def export_adapter_zip(
    run: Any, store, home: str | Path, out_zip: str | Path | None = None, which: str = "last"
) -> Path:
    """THE adapter zip of a run: its PEFT folder plus a model card; <home>/exports/run-<id>-adapter.zip.
    which="best": the adapter of the best validation step (early stopping), run-<id>-best-adapter.zip."""
    card = model_card(run, stored_summary(store, run.id))
    if which != "last":
        try:
            folder = chosen_adapter(run, which, home)
        except ValueError as e:
            raise ExportError(str(e)) from None
        best = best_info(run, home) or {}
        card += (
            f"\n\n**This is the adapter of the best validation step** (step {best.get('step')}, val loss "
            f"{best.get('val_loss')}), kept by early stopping beside the last one; the losses above are the run's.\n"
        )
        return zip_adapter(folder, out_zip or adapter_zip_path(home, run.id, which), card)
    return zip_adapter(run_adapter(run, home), out_zip or adapter_zip_path(home, run.id), card)


# ---- model card --------------------------------------------------------------------------------------


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


def card_metadata(cfg: Mapping[str, Any], merged: bool) -> str:
    """The card's YAML front matter, written by huggingface_hub's ModelCardData."""
    from huggingface_hub import ModelCardData

    base_id = hub_base_id(str(cfg.get("model", EMBEDDED_MODEL)))
    dataset = str(cfg.get("dataset", ""))
    tags = ["lora", "peft", "loralab"] + (
        [f"base_model:{'finetune' if merged else 'adapter'}:{base_id}"] if base_id else []
    )
    data = ModelCardData(
        base_model=base_id,
        library_name="transformers" if merged else "peft",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=[dataset] if HUB_ID.match(dataset) and not Path(dataset).exists() else None,
    )
    return data.to_yaml()


def _results(run: Any) -> list[tuple[str, str]]:
    res = [
        ("final train loss", _num(getattr(run, "final_loss", None))),
        ("best validation loss", _num(getattr(run, "best_val_loss", None))),
        ("final validation loss", _num(getattr(run, "final_val_loss", None))),
    ]
    steps, total = getattr(run, "steps_done", None), getattr(run, "total_steps", None)
    if steps is not None:
        res.append(("steps", f"{steps}" + (f" of {total}" if total else "")))
    for label, attr, fmt in (
        ("tokens seen", "tokens_seen", ","),
        ("duration (s)", "duration_s", ".0f"),
        ("trainable parameters", "trainable_params", ","),
        ("total parameters", "total_params", ","),
        ("peak memory (GB)", "peak_mem_gb", ".2f"),
        ("device", "device", ""),
    ):
        v = getattr(run, attr, None)
        if v is not None:
            res.append((label, format(v, fmt)))
    return res


def model_card(run: Any, spectra: Mapping[str, Any] | None = None, *, merged: bool = False) -> str:
    """README.md for the Hub: YAML front matter, then dataset, every hyper-parameter, losses, spectra.

    `run` is a storage RunRecord (or anything with .config and the loss fields); `spectra` is
    engine.core.spectrum.summarize()'s dict.
    """
    cfg = dict(run.config)
    base = str(cfg.get("model", EMBEDDED_MODEL))
    base_id = hub_base_id(base)
    title = run.name or (f"run {run.id}" if getattr(run, "id", None) is not None else "LoRA adapter")
    what = "a merged model (LoRA folded into the base weights)" if merged else "a LoRA adapter (PEFT format)"
    lines = [
        "---",
        card_metadata(cfg, merged).strip(),
        "---",
        "",
        f"# {title}",
        "",
        f"This is {what} for **{base}**"
        + (f" (`{base_id}`)" if base_id and base_id != base else "")
        + ", trained with LoRA Lab.",
        "",
    ]
    if cfg.get("quant", "none") != "none" and merged:
        lines += [
            f"Trained on a {cfg['quant']} base (QLoRA) and merged into the full-precision base, so outputs "
            "differ slightly from the quantized model's.",
            "",
        ]
    lines += [
        "## Training data",
        "",
        f"- dataset: `{cfg.get('dataset', '')}`",
        f"- format: {cfg.get('dataset_format', 'auto')}",
        f"- loss on: {cfg.get('train_on', 'responses')}",
        "",
    ]
    lines += ["## Hyper-parameters", "", "| parameter | value |", "|---|---|"]
    lines += [f"| `{k}` | {show(v)} |" for k, v in flatten(cfg)]
    lines += ["", "## Results", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in _results(run)]]
    if spectra:
        lines += [
            "",
            "## ΔW spectra",
            "",
            f"σ(ΔW) of {spectra['modules']} adapted modules (ΔW = scaling·B·A): mean effective rank "
            f"{spectra['effective_rank_mean']:.2f} of at most {spectra['max_rank']}, total ‖ΔW‖_F "
            f"{spectra['fro_norm_total']:.4f}. Largest updates:",
            "",
            "| module | ‖ΔW‖_F | effective rank |",
            "|---|---|---|",
        ]
        lines += [f"| `{t['module']}` | {t['fro_norm']:.4f} | {t['effective_rank']:.2f} |" for t in spectra["top"]]
    if merged:
        usage = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("REPO_ID")',
            'tok = AutoTokenizer.from_pretrained("REPO_ID")',
        ]
    else:
        usage = [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base_id or base}")',
            'model = PeftModel.from_pretrained(base, "REPO_ID")',
        ]
    lines += ["", "## Usage", "", "```python", *usage, "```", ""]
    return "\n".join(lines)


def run_like_from_adapter(adapter: str | Path) -> Any:
    """A stand-in for a RunRecord from an adapter folder alone (its loralab.json, else peft's config)."""
    d = Path(adapter)
    ours = d / "loralab.json"
    if ours.is_file():
        cfg = json.loads(ours.read_text())["run_config"]
    else:
        peft_cfg = json.loads((d / ADAPTER_CONFIG).read_text())
        cfg = {
            "model": peft_cfg.get("base_model_name_or_path") or "unknown",
            "lora": {
                "r": peft_cfg.get("r"),
                "alpha": peft_cfg.get("lora_alpha"),
                "dropout": peft_cfg.get("lora_dropout"),
                "targets": peft_cfg.get("target_modules"),
            },
        }
    return SimpleNamespace(
        id=None,
        name=d.parent.name if d.name == "adapter" else d.name,
        config=cfg,
        final_loss=None,
        best_val_loss=None,
        final_val_loss=None,
    )


# ---- push --------------------------------------------------------------------------------------------


def redact(text: str, token: str | None) -> str:
    """The text with the token (and anything shaped like an HF token) replaced."""
    if token:
        text = text.replace(token, REDACTED)
    return re.sub(r"hf_[A-Za-z0-9]{8,}", REDACTED, text)


def resolve_token(token: str | None) -> str:
    from huggingface_hub import get_token

    token = token or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise ExportError(
            "no Hugging Face token: set HF_TOKEN, run `hf auth login`, or paste a write token "
            "into the token field (it is used for this upload only and never stored)"
        )
    return token


def upload_folder(
    folder: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool = True,
    *,
    endpoint: str | None = None,
    commit_message: str = "Upload from LoRA Lab",
) -> str:
    """Create `repo_id` (private unless private=False; exist_ok) and upload the folder; returns the repo URL.

    `endpoint` points huggingface_hub at another server (the tests' stand-in; HF_ENDPOINT does the same).
    """
    from huggingface_hub import HfApi

    if not HUB_ID.match(repo_id or ""):
        raise ExportError(f"repo {repo_id!r} is not a repo id: write it as 'user-or-org/name'")
    token = resolve_token(token)
    api = HfApi(endpoint=endpoint, token=token)
    error: ExportError | None = None
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=commit_message)
    except Exception as e:  # rebuilt outside the except block, so no chained traceback keeps the token
        error = ExportError(redact(f"push to {repo_id} failed: {type(e).__name__}: {e}", token))
    if error is not None:
        raise error
    return str(url)


def push_adapter(
    source: Any,
    repo_id: str,
    token: str | None = None,
    private: bool = True,
    *,
    spectra: Mapping[str, Any] | None = None,
    endpoint: str | None = None,
    home: str | Path | None = None,
) -> str:
    """Upload a run's adapter (a RunRecord) or any adapter folder, with its model card; returns the repo URL.
    The merged model is pushed by `python -m engine push ID --merged` (merging needs torch)."""
    if isinstance(source, (str, Path)):
        folder, run = Path(source), run_like_from_adapter(source)
    else:
        folder, run = run_adapter(source, home), source
    card = model_card(run, spectra).replace("REPO_ID", repo_id)
    with tempfile.TemporaryDirectory(prefix="loralab-push-") as tmp:
        upload = Path(tmp) / "upload"
        upload.mkdir()
        for f in folder.iterdir():
            if f.is_file() and f.name != "README.md":
                shutil.copy2(f, upload / f.name)
        (upload / "README.md").write_text(card, encoding="utf-8")
        return upload_folder(
            upload,
            repo_id,
            token,
            private,
            endpoint=endpoint,
            commit_message=f"Upload LoRA adapter from LoRA Lab ({run.name or 'adapter'})",
        )
