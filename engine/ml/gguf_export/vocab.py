"""The tokenizer as llama.cpp reads it from a GGUF: vocabulary, merges, pre-tokenizer, special ids, template.

    write_vocab(writer, tok, n_vocab, tmp_dir, reference=embedded_gguf)   # ExportError if not expressible

Two paths:

- the tokenizer has exactly the vocabulary of the reference GGUF (the embedded SmolLM2's own file, or a
  base GGUF given with --gguf-base): its `tokenizer.ggml.*` vocabulary fields (model, pre, tokens,
  token types, merges) are copied as they are, so llama.cpp tokenizes the export like the base;
- otherwise a byte-level BPE tokenizer (`tokenizer.json` with a BPE model and a ByteLevel decoder) is
  written the way llama.cpp's converter writes one (`gguf-py`'s SpecialVocab for merges and special
  tokens), with `tokenizer.ggml.pre` recognised from the pre-tokenizer's structure (PRE_TOKENIZERS).

Anything else (SentencePiece, WordPiece, word-level vocabularies, byte-fallback BPE, an unknown
pre-tokenizer) is refused: llama.cpp would tokenize it differently from the model's own tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf

from engine.core.export import ExportError
from engine.ml.gguf_export.arch import CONVERTER_HINT

VOCAB_FIELDS = ("model", "pre", "tokens", "token_type", "merges", "scores", "add_space_prefix")


def _split_regex(name: str) -> str:
    # transformers' own table of llama.cpp pre-tokenizer names → the split regex of the HF tokenizer
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    return GGUF_PRE_TOKENIZER_SPLITS[name]


def _pre_tokenizers() -> dict[tuple, tuple[str, bool]]:
    """Structure of a HF pre-tokenizer → (llama.cpp's tokenizer.ggml.pre, the BPE ignore_merges it implies).

    Each pair was checked against llama.cpp's src/llama-vocab.cpp: "gpt-2" is the GPT-2 regex alone,
    "smollm" splits every digit first (`\\p{N}`, then the GPT-2 regex), "qwen2" and "llama-bpe" are the
    split regexes of transformers' GGUF_PRE_TOKENIZER_SPLITS; llama-bpe also sets ignore_merges.
    """
    return {
        ("bytelevel",): ("gpt-2", False),
        ("digits", "bytelevel"): ("smollm", False),
        ("split", _split_regex("qwen2")): ("qwen2", False),
        ("split", _split_regex("llama-bpe")): ("llama-bpe", True),
    }


def pre_tokenizer_signature(pre: dict[str, Any] | None) -> tuple | None:
    """A comparable description of a tokenizer.json pre_tokenizer, or None for shapes we do not know."""
    if not pre:
        return None
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]

    def byte_level(s: dict, regex: bool) -> bool:
        return s.get("type") == "ByteLevel" and not s.get("add_prefix_space") and bool(s.get("use_regex")) == regex

    if len(steps) == 1 and byte_level(steps[0], True):
        return ("bytelevel",)
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level(steps[1], True):
        return ("digits", "bytelevel")
    if kinds == ["Split", "ByteLevel"] and byte_level(steps[1], False):
        s = steps[0]
        if s.get("behavior") == "Isolated" and not s.get("invert") and "Regex" in (s.get("pattern") or {}):
            return ("split", s["pattern"]["Regex"])
    return None


def bpe_pre_type(tok) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer, or ExportError saying what it is."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(
            f"the tokenizer ({type(tok).__name__}) has no tokenizer.json; GGUF export writes byte-level BPE "
            f"vocabularies from one. {CONVERTER_HINT}."
        )
    tj = json.loads(backend.to_str())
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        kind = model.get("type", "?") + (
            " with byte fallback (SentencePiece style)" if model.get("byte_fallback") else ""
        )
        raise ExportError(
            f"the tokenizer is a {kind} vocabulary; GGUF export writes byte-level BPE vocabularies (GPT-2, "
            f"SmolLM, Qwen2, Llama 3 style) and copies the embedded model's. {CONVERTER_HINT}."
        )
    norm = (tj.get("normalizer") or {}).get("type")
    if norm not in (None, "NFC"):
        raise ExportError(f"the tokenizer has a {norm} normalizer, which llama.cpp does not apply. {CONVERTER_HINT}.")
    found = _pre_tokenizers().get(pre_tokenizer_signature(tj.get("pre_tokenizer")))
    if found is None:
        raise ExportError(
            f"the tokenizer's pre-tokenizer {json.dumps(tj.get('pre_tokenizer'))[:160]} is not one whose llama.cpp "
            f"equivalent we verified (gpt-2, smollm, qwen2, llama-bpe). {CONVERTER_HINT}."
        )
    name, ignore_merges = found
    if bool(model.get("ignore_merges")) != ignore_merges:
        raise ExportError(
            f"the tokenizer's BPE ignore_merges={bool(model.get('ignore_merges'))} differs from what llama.cpp "
            f"assumes for pre-tokenizer {name!r}. {CONVERTER_HINT}."
        )
    return name


def token_list(tok, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their llama.cpp types, as convert_hf_to_gguf's get_vocab_base makes them."""
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        t = reverse[i]
        if t in added:
            types.append(gguf.TokenType.CONTROL if decoder[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(t)
    return tokens, types


def copy_vocab_fields(w: gguf.GGUFWriter, reader: gguf.GGUFReader) -> None:
    """The reference GGUF's vocabulary fields, value for value."""
    for short in VOCAB_FIELDS:
        key = f"tokenizer.ggml.{short}"
        field = reader.fields.get(key)
        if field is None:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub)


def reference_matches(reader: gguf.GGUFReader | None, tokens: list[str]) -> bool:
    field = reader.fields.get("tokenizer.ggml.tokens") if reader is not None else None
    return field is not None and field.contents() == tokens


def vocab_plan(tok, n_vocab: int, reference: gguf.GGUFReader | None = None) -> tuple[list[str], list[int], str | None]:
    """(tokens, types, pre) if the tokenizer is written from scratch, pre None if the reference's vocabulary
    is copied; ExportError if GGUF cannot hold it. Cheap: called before a merge and again when writing."""
    if len(tok.get_vocab()) > n_vocab:
        raise ExportError(f"the tokenizer has {len(tok.get_vocab())} tokens but the model only {n_vocab} embeddings")
    tokens, types = token_list(tok, n_vocab)
    return tokens, types, None if reference_matches(reference, tokens) else bpe_pre_type(tok)


def write_vocab(w: gguf.GGUFWriter, tok, n_vocab: int, tmp: Path, reference: gguf.GGUFReader | None = None) -> str:
    """Write the tokenizer's GGUF metadata; returns how (for the CLI's report)."""
    tokens, types, pre = vocab_plan(tok, n_vocab, reference)
    if pre is None:
        copy_vocab_fields(w, reference)
        how = "vocabulary copied from the base GGUF"
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        how = f"byte-level BPE, pre-tokenizer {pre}"
    tok.save_pretrained(tmp)
    special = gguf.SpecialVocab(tmp, load_merges=pre is not None, n_vocab=n_vocab)
    if pre is not None and not special.merges:
        raise ExportError("the tokenizer.json has no BPE merges; llama.cpp cannot tokenize without them")
    for kind, value in added_specials(tok).items():
        special.add_special_token.setdefault(kind, value)
    if getattr(tok, "chat_template", None) and not special.chat_template:
        special.chat_template = tok.chat_template
    special.add_to_gguf(w, quiet=True)
    return how


def added_specials(tok) -> dict[str, bool]:
    """Whether encoding adds BOS / EOS, measured on the tokenizer itself (llama.cpp's default differs by type)."""
    ids = tok("a")["input_ids"]
    return {
        "bos": tok.bos_token_id is not None and bool(ids) and ids[0] == tok.bos_token_id,
        "eos": tok.eos_token_id is not None and bool(ids) and ids[-1] == tok.eos_token_id,
    }
