"""GGUF export for llama.cpp, Ollama and LM Studio, written with the `gguf` package (no llama.cpp needed).

    lines = export_merged_gguf("embedded:SmolLM2-135M-Instruct", "runs/3/adapter", "pirate.gguf", "q8_0")
    lines = export_adapter_gguf("embedded:SmolLM2-135M-Instruct", "runs/3/adapter", "pirate-lora.gguf")

Each writes the GGUF and an Ollama Modelfile beside it (pirate.gguf → pirate.Modelfile) and returns the
lines to show. Neither replaces an existing file unless force=True. The modules:

    arch.py     the verified architectures: llama.cpp names, the Q/K row permutation, hyper-parameters
    vocab.py    the tokenizer's metadata (copied from the base GGUF when it is the same vocabulary)
    merged.py   base + adapter merged → a model GGUF (f32, f16, bf16, q8_0)
    adapter.py  a PEFT LoRA → a llama.cpp LoRA adapter GGUF
    ollama.py   the Modelfile (FROM / ADAPTER, TEMPLATE from the chat template, SYSTEM, stop)

Why gguf directly and not llama.cpp's converter (the `convert-hf-to-gguf` package): see README.md, GGUF.
"""

from __future__ import annotations

from pathlib import Path

from engine.core.config import EMBEDDED_MODEL
from engine.core.export import ExportError
from engine.ml.gguf_export.common import (
    FILE_TYPES,
    Progress,
    atomic_target,
    check_outputs,
    reader,
    stderr_progress,
)


def modelfile_path(out: Path) -> Path:
    return Path(out).with_suffix(".Modelfile")


def reference_gguf(base: str, home: Path, gguf_base: str | Path | None = None) -> Path | None:
    """The base GGUF names, shapes and vocabulary are checked against: --gguf-base, else the embedded
    model's own file when the base is the embedded model, else None."""
    from engine.ml.generate import same_base
    from engine.ml.model import embedded_gguf_path

    if gguf_base:
        p = Path(gguf_base).expanduser()
        if not p.is_file():
            raise ExportError(f"--gguf-base {p}: no such file; give the base model's .gguf")
        return p
    return embedded_gguf_path() if same_base(base, EMBEDDED_MODEL, home) else None


def _write_modelfile(path: Path, text: str) -> None:
    with atomic_target(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def export_merged_gguf(
    base: str,
    adapter: str | Path,
    out: str | Path,
    kind: str = "f16",
    *,
    home: Path,
    force: bool = False,
    trust_remote_code: bool = False,
    gguf_base: str | Path | None = None,
    title: str = "",
    progress: Progress = stderr_progress,
) -> list[str]:
    """Merge `adapter` into `base` (fp32, peft) and write it as one GGUF of `kind`, with its Modelfile."""
    from engine.ml.gguf_export.arch import arch_of
    from engine.ml.gguf_export.merged import write_model_gguf
    from engine.ml.gguf_export.ollama import modelfile
    from engine.ml.gguf_export.vocab import vocab_plan
    from engine.ml.merge import load_merged, merge_source, merged_tokenizer
    from engine.ml.model import load_config

    out = Path(out)
    mf = modelfile_path(out)
    if kind not in FILE_TYPES:
        raise ExportError(f"--gguf-type {kind!r}: choose one of {', '.join(FILE_TYPES)}")
    check_outputs(out, mf, force=force)
    # everything that can be refused is checked before the (long) merge
    ref = merge_source(base, adapter, home)
    config = load_config(ref, trust_remote_code)
    arch_of(config)
    base_gguf = reader(reference_gguf(base, home, gguf_base))
    tok = merged_tokenizer(ref, adapter, trust_remote_code)
    vocab_plan(tok, int(config.vocab_size), base_gguf)
    progress(f"gguf: merging {adapter} into {base} (fp32)")
    model, tok = load_merged(base, adapter, dtype="fp32", home=home, trust_remote_code=trust_remote_code)
    how = write_model_gguf(model, tok, out, kind, name=title or out.stem, reference=base_gguf, progress=progress)
    text, notes = modelfile(tok, from_=f"./{out.name}", title=f"{title or out.stem}: merged model ({kind})")
    _write_modelfile(mf, text)
    return [*(f"note: {n}" for n in notes), f"merged GGUF ({kind}; {how}): {out}  ·  Ollama: {mf}"]


def export_adapter_gguf(
    base: str,
    adapter: str | Path,
    out: str | Path,
    kind: str = "f32",
    *,
    home: Path,
    force: bool = False,
    trust_remote_code: bool = False,
    gguf_base: str | Path | None = None,
    title: str = "",
    progress: Progress = stderr_progress,
) -> list[str]:
    """Write the LoRA adapter as a llama.cpp adapter GGUF, with a Modelfile FROM its base + ADAPTER it."""
    from engine.ml.gguf_export.adapter import write_adapter_gguf
    from engine.ml.gguf_export.ollama import modelfile
    from engine.ml.merge import check_trained_on, merged_tokenizer
    from engine.ml.model import load_config, resolve_model

    out, adapter = Path(out), Path(adapter)
    mf = modelfile_path(out)
    check_outputs(out, mf, force=force)
    check_trained_on(base, adapter, home)
    ref = resolve_model(base, home)
    base_path = reference_gguf(base, home, gguf_base)
    info = write_adapter_gguf(
        adapter,
        load_config(ref, trust_remote_code),
        out,
        kind,
        name=title or out.stem,
        reference=reader(base_path),
        progress=progress,
    )
    notes = []
    if base_path is None:
        notes.append(
            f"the Modelfile's FROM is {ref}: Ollama imports a safetensors folder of a supported architecture, "
            "or replace it with the base model as GGUF (and pass --gguf-base BASE.gguf to check the adapter against it)"
        )
    tok = merged_tokenizer(ref, adapter, trust_remote_code)
    text, more = modelfile(
        tok,
        from_=str(base_path.resolve()) if base_path else ref,
        adapter=f"./{out.name}",
        title=f"{title or out.stem}: LoRA adapter on {base}",
    )
    _write_modelfile(mf, text)
    summary = (
        f"adapter GGUF ({kind}; {info['modules']} LoRA pairs, r {'/'.join(map(str, info['ranks']))}, "
        f"alpha {info['alpha']:g}, {info['architecture']}"
        f"{', checked against ' + base_path.name if base_path else ''}): {out}  ·  Ollama: {mf}"
    )
    return [*(f"note: {n}" for n in notes + more), summary]
