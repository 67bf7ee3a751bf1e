"""A dataset → training examples: read (🤗 datasets), format, tokenize (datasets.map, cached), split.

    prep = prepare(cfg, tok, cache_dir=home / "cache" / "datasets")
    prep.train, prep.val                    # lists of Example
    prep.stats()                            # rows, dropped by reason, tokens total / kept / truncated, ...
    preview(cfg, tok, cache_dir)            # the same, plus token-length statistics and the first example

Tokenization runs once per (data, tokenizer, settings): datasets.map writes it to an Arrow file named by a
fingerprint of the data (datasets' own: path, size and mtime of a file; a hub revision), the tokenizer and
the settings, and every later run or preview memory-maps it. Nothing is dropped or cut without a count:
rows whose labelled tokens all fall beyond max_seq_len are dropped (counted per reason), long rows are
truncated (tokens_truncated), and plain text is grouped into max_seq_len blocks so none of it is cut.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.core.batching import DataFacts, facts_key
from engine.core.config import RunConfig
from engine.ml.data.diagnose import DatasetError
from engine.ml.data.formats import Chat, check_format, detect_format, split_text, to_item
from engine.ml.data.read import Part, read_parts
from engine.ml.data.templates import native_tools
from engine.ml.data.tokens import Example, encode, group_texts, learned, rows_of

TOKENIZATION_VERSION = 2  # bump when tokenization changes, to invalidate cached tokenizations
MAP_BATCH = 256
DROP_LONG_PROMPT = "no response token within max_seq_len (the prompt alone is longer)"
DROP_NOTHING = "nothing to learn (no trained assistant token)"
DROP_TINY_BLOCK = "last text block of a single token"
DROP_OVER_MAX = "beyond max_examples"


@dataclass(frozen=True)
class Prepared:
    train: list[Example]
    val: list[Example]
    format: str
    n_rows: int  # rows read (documents for plain text)
    dropped: dict[str, int]  # examples left out, per reason
    fingerprint: str
    tokens_total: int = 0  # every token of the rows read, before truncation
    tokens_kept: int = 0  # tokens in train + val
    tokens_truncated: int = 0  # cut from kept rows longer than max_seq_len
    tokens_dropped: int = 0  # tokens of dropped rows
    rows_truncated: int = 0
    longest: int = 0  # the longest row before truncation (tokens)
    notes: tuple[str, ...] = ()
    tools: str | None = None  # 'chat template' | 'fallback rendering' when rows use tools
    first: Example | None = field(default=None, compare=False)  # the first example in the data's order

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def stats(self) -> dict[str, Any]:
        """What the preview, `engine check` and every run's summary report about the data."""
        return {
            "format": self.format,
            "rows": self.n_rows,
            "train": len(self.train),
            "val": len(self.val),
            "dropped": dict(self.dropped),
            "tokens_total": self.tokens_total,
            "tokens_kept": self.tokens_kept,
            "tokens_truncated": self.tokens_truncated,
            "tokens_dropped": self.tokens_dropped,
            "rows_truncated": self.rows_truncated,
            "longest": self.longest,
            "tools": self.tools,
            "notes": list(self.notes),
        }

    def facts(self, cfg: RunConfig) -> DataFacts:
        """The training split's token counts, for the memory estimate (engine.core.batching)."""
        return DataFacts(
            facts_key(cfg), tuple(len(e.input_ids) for e in self.train), tuple(e.n_label_tokens for e in self.train)
        )


class Where:
    """A row's location, worked out only when an error message needs it (a JSONL line number reads the file)."""

    def __init__(self, part: Part, row: int):
        self.part, self.row = part, row

    def __str__(self) -> str:
        return self.part.where(self.row)


def tokenizer_id(tok) -> tuple:
    return (
        type(tok).__name__,
        tok.name_or_path,
        len(tok),
        tok.eos_token_id,
        tok.pad_token_id,
        getattr(tok, "chat_template", None),
    )


def part_format(cfg: RunConfig, part: Part) -> str:
    if part.plain_text:
        if cfg.dataset_format not in ("auto", "text"):
            raise DatasetError(f"{part.name}: a .txt file is plain text; dataset_format must be auto or text")
        return "text"
    if cfg.dataset_format == "auto":
        return detect_format(part.ds.column_names, part.name)
    check_format(cfg.dataset_format, part.ds.column_names, part.name)
    return cfg.dataset_format


def _tokenize(part: Part, fmt: str, cfg: RunConfig, tok, cache_dir: Path | None):
    """datasets.map over the part: chat/completion rows → ids and labels; text → one row per document's ids."""
    max_len = cfg.train.max_seq_len
    settings = (fmt, cfg.train_on, max_len, cfg.text_split, native_tools(tok), TOKENIZATION_VERSION)
    key = hashlib.sha256(repr((part.ds._fingerprint, tokenizer_id(tok), settings)).encode()).hexdigest()[:24]

    def fn(batch: dict[str, list], idx: list[int]) -> dict[str, list]:
        rows = rows_of(batch)
        if fmt == "text":
            docs = (
                [d for r in rows for d in split_text(r["text"] or "", cfg.text_split)]
                if part.plain_text
                else [to_item(r, fmt, Where(part, i)) for r, i in zip(rows, idx)]
            )
            enc = encode(tok, docs, "all", 1 << 62)
            return {"input_ids": enc["input_ids"]}
        items = [to_item(r, fmt, Where(part, i)) for r, i in zip(rows, idx)]
        out = encode(tok, items, cfg.train_on, max_len, [Where(part, i) for i in idx])
        out["tools"] = [isinstance(it, Chat) and it.uses_tools for it in items]
        return out

    kwargs: dict[str, Any] = {}
    if cache_dir is not None:
        (cache_dir / "tokenized").mkdir(parents=True, exist_ok=True)
        kwargs["cache_file_name"] = str(cache_dir / "tokenized" / f"{key}.arrow")
    mapped = part.ds.map(
        fn,
        batched=True,
        batch_size=MAP_BATCH,
        with_indices=True,
        remove_columns=part.ds.column_names,
        new_fingerprint=key,
        **kwargs,
    )
    return mapped, key


@dataclass
class _Tally:
    examples: list[Example] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    total: int = 0
    kept: int = 0
    truncated: int = 0
    lost: int = 0
    rows_truncated: int = 0
    longest: int = 0
    tools: bool = False

    def row(self, ids: list[int], labels: list[int], n_full: int, n_learn_full: int) -> None:
        self.total += n_full
        self.longest = max(self.longest, n_full)
        if learned(labels) == 0:
            self.dropped[DROP_LONG_PROMPT if n_learn_full else DROP_NOTHING] += 1
            self.lost += n_full
            return
        self.examples.append(Example(tuple(ids), tuple(labels)))
        self.kept += len(ids)
        self.truncated += n_full - len(ids)
        self.rows_truncated += n_full > len(ids)


def prepare(cfg: RunConfig, tok, cache_dir: Path | None = None) -> Prepared:
    """Rows → examples → train/val split (seeded). Same config + same data = same split.

    cache_dir holds datasets' Arrow copies of local files and the tokenizations (the trainer passes
    <home>/cache/datasets); None uses datasets' own cache (HF_DATASETS_CACHE). Hub datasets always use
    the Hugging Face caches, so that one loaded before is found offline.
    """
    parts, notes = read_parts(cfg, cache_dir)
    formats = {p.name: part_format(cfg, p) for p in parts}
    fmt = next(iter(formats.values()))
    if len(set(formats.values())) > 1:
        raise DatasetError(f"the files of {cfg.dataset!r} have different formats: {formats}; keep one per folder")
    t, keys, n_rows, left = _Tally(), [], 0, cfg.max_examples or None
    for part in parts:
        if fmt != "text" and left is not None:
            n_rows += len(part.ds)
            if left < len(part.ds):
                t.dropped[DROP_OVER_MAX] += len(part.ds) - left
            part = Part(part.name, part.ds.select(range(min(left, len(part.ds)))), part.path, part.plain_text)
            left -= len(part.ds)
        mapped, key = _tokenize(part, fmt, cfg, tok, cache_dir)
        keys.append(key)
        if fmt == "text":
            docs = mapped["input_ids"]
            n_rows += len(docs)
            t.total += sum(map(len, docs))
            t.longest = max([t.longest, *map(len, docs)])
            t.examples.extend(Example(b, b) for b in group_texts(docs, cfg.train.max_seq_len))
            continue
        if left is None:
            n_rows += len(part.ds)
        cols = mapped.to_dict()
        t.tools = t.tools or any(cols["tools"])
        for ids, labels, n_full, n_learn in zip(
            cols["input_ids"], cols["labels"], cols["n_full"], cols["n_learn_full"]
        ):
            t.row(ids, labels, n_full, n_learn)
    if fmt == "text":
        _finish_blocks(t, cfg.max_examples)
    if not t.examples:
        reasons = "; ".join(f"{n} {why}" for why, n in t.dropped.items()) or "no rows"
        raise DatasetError(
            f"{cfg.dataset}: no example has any token to learn with max_seq_len = {cfg.train.max_seq_len} "
            f"({reasons}); raise max_seq_len or use train_on: all"
        )
    train, val = split(t.examples, cfg.train.val_split, cfg.train.seed)
    h = hashlib.sha256(repr((keys, cfg.max_examples, cfg.train.val_split, cfg.train.seed)).encode())
    return Prepared(
        train,
        val,
        fmt,
        n_rows,
        dict(t.dropped),
        h.hexdigest()[:16],
        tokens_total=t.total,
        tokens_kept=t.kept,
        tokens_truncated=t.truncated,
        tokens_dropped=t.lost,
        rows_truncated=t.rows_truncated,
        longest=t.longest,
        notes=tuple(notes),
        tools=("chat template" if native_tools(tok) else "fallback rendering") if t.tools else None,
        first=t.examples[0],
    )


def check_rows(cfg: RunConfig, cache_dir: Path | None = None) -> int:
    """Read every row and turn it into an item without tokenizing (when no tokenizer is at hand); the
    number of rows, or the first DatasetError."""
    parts, _ = read_parts(cfg, cache_dir)
    n = 0
    for part in parts:
        fmt = part_format(cfg, part)
        if part.plain_text:
            n += len(part.ds)
            continue
        for i, row in enumerate(part.ds):
            to_item(row, fmt, Where(part, i))
            n += 1
    return n


def _finish_blocks(t: _Tally, max_examples: int) -> None:
    """Plain text: every token is in a block; a last block of one token has nothing to predict."""
    if t.examples and len(t.examples[-1].input_ids) < 2:
        t.dropped[DROP_TINY_BLOCK] += 1
        t.lost += len(t.examples.pop().input_ids)
    if max_examples and len(t.examples) > max_examples:
        t.dropped[DROP_OVER_MAX] += len(t.examples) - max_examples
        t.lost += sum(len(e.input_ids) for e in t.examples[max_examples:])
        del t.examples[max_examples:]
    t.kept = sum(len(e.input_ids) for e in t.examples)


def split(examples: list[Example], val_split: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded train/val split; at least one example on each side when val_split > 0 and there are two."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = round(len(examples) * val_split)
    if val_split > 0 and len(examples) >= 2:
        n_val = max(1, min(n_val, len(examples) - 1))
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def preview(cfg: RunConfig, tok, cache_dir: Path | None = None, *, facts: bool = False) -> dict[str, Any]:
    """prepare()'s stats, token-length statistics, and the first example as the model sees it."""
    prep = prepare(cfg, tok, cache_dir)
    lengths = sorted(len(e.input_ids) for e in prep.train + prep.val)
    pct = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]
    first = prep.first
    assert first is not None
    out = {
        **prep.stats(),
        "len_min": lengths[0],
        "len_p50": pct(0.5),
        "len_p95": pct(0.95),
        "len_max": lengths[-1],
        "max_seq_len": cfg.train.max_seq_len,
        "rendered_example": tok.decode(list(first.input_ids)),
        "trained_example": trained_text(tok, first),
        "label_tokens_first": first.n_label_tokens,
    }
    if facts:
        out["facts"] = prep.facts(cfg).to_dict()
    return out


def trained_text(tok, ex: Example) -> str:
    """The tokens the loss is taken on (the targets: token 0 predicts nothing), with ' … ' between stretches."""
    pieces, run = [], []
    for i, lab in enumerate(ex.labels):
        if i > 0 and lab >= 0:
            run.append(lab)
        elif run:
            pieces.append(tok.decode(run))
            run = []
    if run:
        pieces.append(tok.decode(run))
    return " … ".join(pieces)
