"""Datasets: read rows, detect their format, render chat templates, tokenize with response-only labels.

Formats (auto-detected from the keys of the first row, or forced with `dataset_format`):

    alpaca             {"instruction": ..., "input": ..., "output": ...}
    messages           {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
    sharegpt           {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}
    prompt_completion  {"prompt": ..., "completion": ...}     (raw continuation, no chat template)
    text               {"text": ...}                          (plain language modelling)

Files: .jsonl (a row per line), .json (a list of rows, or {"data": [...]}), .csv (a header row),
.txt (paragraphs separated by blank lines become `text` rows).

Labels are built from character spans of the assistant turns, never by comparing token ids with the
pad id: SmolLM2's pad token is <|im_end|>, the end-of-turn token, and masking by id would teach the
model never to stop (offline-assets.md, gotcha 1).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.core.config import BUILTIN_DATASETS, RunConfig

IGNORE = -100  # label value the loss skips
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "datasets"  # engine/datasets/
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}
FORMAT_KEYS = [
    ("messages", {"messages"}),
    ("sharegpt", {"conversations"}),
    ("alpaca", {"instruction", "output"}),
    ("prompt_completion", {"prompt", "completion"}),
    ("prompt_completion", {"prompt", "response"}),
    ("text", {"text"}),
]


class DatasetError(ValueError):
    """A dataset problem, naming the file, the line and what is wrong."""


@dataclass(frozen=True)
class Row:
    source: str  # file name (or builtin name)
    line: int  # 1-based line (jsonl/csv) or item index (json/txt)
    data: dict[str, Any]


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE where no loss is taken

    @property
    def n_label_tokens(self) -> int:
        """Tokens the loss is taken on: labelled tokens after the first (token 0 has nothing before it)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE)


# ---- 1. reading rows ---------------------------------------------------------------------------


def dataset_path(dataset: str) -> Path | None:
    """The file behind a dataset reference (None for builtin:chatterbot, which is read from a package)."""
    if dataset == "builtin:persona":
        return BUILTIN_DIR / "persona.jsonl"
    if dataset.startswith("builtin:"):
        return None
    return Path(dataset).expanduser()


def read_rows(dataset: str) -> list[Row]:
    if dataset.startswith("builtin:") and dataset not in BUILTIN_DATASETS:
        raise DatasetError(f"unknown built-in dataset {dataset!r}; choose one of {', '.join(BUILTIN_DATASETS)}")
    if dataset == "builtin:chatterbot":
        return _chatterbot_rows()
    path = dataset_path(dataset)
    assert path is not None
    if not path.is_file():
        raise DatasetError(
            f"dataset file {str(path)!r} does not exist; give a .jsonl/.json/.csv/.txt file "
            f"or one of {', '.join(BUILTIN_DATASETS)}"
        )
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".txt": _read_txt}
    if suffix not in readers:
        raise DatasetError(f"{path.name}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .txt")
    rows = readers[suffix](path)
    if not rows:
        raise DatasetError(f"{path.name}: no rows found")
    return rows


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path.name} line {i}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DatasetError(f"{path.name} line {i}: each line must be a JSON object, got {type(obj).__name__}")
            rows.append(Row(path.name, i, obj))
    return rows


def _read_json(path: Path) -> list[Row]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path.name} line {e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DatasetError(f"{path.name}: expected a list of objects (or {{'data': [...]}}), got {type(obj).__name__}")
    for i, r in enumerate(obj, 1):
        if not isinstance(r, dict):
            raise DatasetError(f"{path.name} item {i}: must be an object, got {type(r).__name__}")
    return [Row(path.name, i, r) for i, r in enumerate(obj, 1)]


def _read_csv(path: Path) -> list[Row]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise DatasetError(f"{path.name}: the first line must be a header naming the columns")
        return [Row(path.name, reader.line_num, {k: v for k, v in r.items() if k}) for r in reader]


def _read_txt(path: Path) -> list[Row]:
    text = path.read_text(encoding="utf-8")
    rows, line = [], 1
    for block in text.split("\n\n"):
        if block.strip():
            rows.append(Row(path.name, line, {"text": block.strip()}))
        line += block.count("\n") + 2
    return rows


def _chatterbot_rows() -> list[Row]:
    """chatterbot-corpus English: each YAML conversation [q, a, q2, a2, ...] becomes one chat."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            "builtin:chatterbot needs the chatterbot-corpus package: pip install chatterbot-corpus==1.3.3"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "english"
    rows = []
    for f in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for i, conv in enumerate(doc.get("conversations") or [], 1):
            turns = [str(t).strip() for t in conv if str(t).strip()]
            if len(turns) < 2:
                continue
            turns = turns[: len(turns) // 2 * 2]
            msgs = [{"role": "user" if j % 2 == 0 else "assistant", "content": t} for j, t in enumerate(turns)]
            rows.append(Row(f"chatterbot/{f.name}", i, {"messages": msgs}))
    return rows


# ---- 2. formats ------------------------------------------------------------------------------


def detect_format(rows: list[Row]) -> str:
    keys = set(rows[0].data)
    for fmt, need in FORMAT_KEYS:
        if need <= keys:
            return fmt
    raise DatasetError(
        f"{rows[0].source} line {rows[0].line}: cannot tell the format from keys {sorted(keys)}; "
        "expected messages, conversations, instruction+output, prompt+completion or text "
        "(or set dataset_format)"
    )


def to_chat(row: Row, fmt: str) -> list[dict[str, str]] | tuple[str, str] | str:
    """A chat (list of messages), a (prompt, completion) pair, or plain text; errors name file and line."""
    d, where = row.data, f"{row.source} line {row.line}"

    def text_of(key: str, required: bool = True) -> str:
        v = d.get(key)
        if v is None or (isinstance(v, str) and not v.strip()):
            if required:
                raise DatasetError(f"{where}: {fmt} row needs a non-empty {key!r} field")
            return ""
        if not isinstance(v, (str, int, float)):
            raise DatasetError(f"{where}: {key!r} must be text, got {type(v).__name__}")
        return str(v)

    if fmt == "text":
        return text_of("text")
    if fmt == "prompt_completion":
        return text_of("prompt"), text_of("completion" if "completion" in d else "response")
    if fmt == "alpaca":
        extra = text_of("input", required=False)
        user = text_of("instruction") + (f"\n\n{extra}" if extra else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": text_of("output")}]
        if d.get("system"):
            msgs.insert(0, {"role": "system", "content": text_of("system")})
        return msgs
    key, role_key, content_key = (
        ("messages", "role", "content") if fmt == "messages" else ("conversations", "from", "value")
    )
    turns = d.get(key)
    if not isinstance(turns, list) or not turns:
        raise DatasetError(f"{where}: {key!r} must be a non-empty list of turns")
    msgs = []
    for j, t in enumerate(turns, 1):
        if not isinstance(t, dict) or role_key not in t or content_key not in t:
            raise DatasetError(f"{where}: turn {j} must be an object with {role_key!r} and {content_key!r}")
        role = ROLE_ALIASES.get(str(t[role_key]).lower())
        if role is None:
            raise DatasetError(f"{where}: turn {j} has role {t[role_key]!r}; use user, assistant or system")
        msgs.append({"role": role, "content": str(t[content_key])})
    if not any(m["role"] == "assistant" for m in msgs):
        raise DatasetError(f"{where}: the conversation has no assistant turn to learn from")
    return msgs


# ---- 3. tokenization ---------------------------------------------------------------------------


def _render(tok, msgs: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tok, msgs: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of each assistant turn (content + end-of-turn token).

    Turn i's span is what rendering msgs[:i+1] adds after the generation prompt of msgs[:i]; this needs
    an append-only template (ChatML and nearly all others are).
    """
    full = _render(tok, msgs)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = _render(tok, msgs[:i], add_generation_prompt=True)
        upto = _render(tok, msgs[: i + 1])
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise DatasetError(
                "the tokenizer's chat template is not append-only, so response-only labels cannot "
                "be placed; set train_on: all"
            )
        spans.append((len(prefix), len(upto)))
    return full, spans


def tokenize_example(tok, item, train_on: str, max_len: int) -> Example:
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if isinstance(item, str):  # plain text: learn every token
        ids = tok(item, add_special_tokens=False)["input_ids"] + eos
        labels = list(ids)
    elif isinstance(item, tuple):  # prompt → completion, raw continuation
        p = tok(item[0], add_special_tokens=False)["input_ids"]
        c = tok(item[1], add_special_tokens=False)["input_ids"] + eos
        ids = p + c
        labels = (list(p) if train_on == "all" else [IGNORE] * len(p)) + c
    else:
        text, spans = assistant_spans(tok, item)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        if train_on == "all":
            labels = list(ids)
        else:
            # A token is learned when it starts inside an assistant span.
            labels = [
                t if any(a <= s < b for a, b in spans) else IGNORE for t, (s, _e) in zip(ids, enc["offset_mapping"])
            ]
    return Example(tuple(ids[:max_len]), tuple(labels[:max_len]))


@dataclass(frozen=True)
class Prepared:
    train: list[Example]
    val: list[Example]
    format: str
    n_rows: int
    n_dropped: int  # examples with no label token left after truncation
    fingerprint: str


def cache_key(cfg: RunConfig, tok) -> str:
    """Fingerprint of everything tokenization depends on: the data bytes, the tokenizer, the settings."""
    h = hashlib.sha256()
    path = dataset_path(cfg.dataset)
    if path is not None and path.is_file():
        h.update(path.read_bytes())
    else:
        h.update(cfg.dataset.encode())
    for part in (
        type(tok).__name__,
        tok.name_or_path,
        len(tok),
        tok.eos_token_id,
        tok.pad_token_id,
        getattr(tok, "chat_template", None),
        cfg.dataset_format,
        cfg.train_on,
        cfg.train.max_seq_len,
        cfg.max_examples,
        TOKENIZATION_VERSION,
    ):
        h.update(repr(part).encode())
    return h.hexdigest()[:24]


TOKENIZATION_VERSION = 1  # bump when tokenize_example changes, to invalidate cached tokenizations


def _tokenize_all(cfg: RunConfig, tok) -> tuple[list[Example], int, str, int]:
    rows = read_rows(cfg.dataset)
    if cfg.max_examples:
        rows = rows[: cfg.max_examples]
    fmt = detect_format(rows) if cfg.dataset_format == "auto" else cfg.dataset_format
    examples, dropped = [], 0
    for r in rows:
        ex = tokenize_example(tok, to_chat(r, fmt), cfg.train_on, cfg.train.max_seq_len)
        if ex.n_label_tokens == 0:
            dropped += 1
            continue
        examples.append(ex)
    return examples, dropped, fmt, len(rows)


def prepare(cfg: RunConfig, tok, cache_dir: Path | None = None) -> Prepared:
    """Rows → examples → train/val split (seeded). Same config + same file = same split.

    Tokenization happens once per (data, tokenizer, settings): with a cache_dir the examples are kept
    under their fingerprint and later runs (and every epoch) reuse them.
    """
    cached = Path(cache_dir) / f"{cache_key(cfg, tok)}.json" if cache_dir else None
    if cached is not None and cached.is_file():
        blob = json.loads(cached.read_text())
        examples = [Example(tuple(i), tuple(lab)) for i, lab in blob["examples"]]
        dropped, fmt, n_rows = blob["dropped"], blob["format"], blob["rows"]
    else:
        examples, dropped, fmt, n_rows = _tokenize_all(cfg, tok)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".tmp{id(examples)}")
            tmp.write_text(
                json.dumps(
                    {
                        "examples": [[e.input_ids, e.labels] for e in examples],
                        "dropped": dropped,
                        "format": fmt,
                        "rows": n_rows,
                    }
                )
            )
            tmp.replace(cached)
    if not examples:
        raise DatasetError(
            f"{cfg.dataset}: no example has any token to learn after truncation to "
            f"max_seq_len = {cfg.train.max_seq_len}; raise max_seq_len or use train_on: all"
        )
    order = list(range(len(examples)))
    random.Random(cfg.train.seed).shuffle(order)
    n_val = round(len(examples) * cfg.train.val_split)
    if cfg.train.val_split > 0 and len(examples) >= 2:
        n_val = max(1, min(n_val, len(examples) - 1))
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    h = hashlib.sha256()
    for ex in examples:
        h.update(repr(ex.input_ids).encode())
    return Prepared(train, val, fmt, n_rows, dropped, h.hexdigest()[:16])


# ---- 4. batching -----------------------------------------------------------------------------


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Shuffled example order of one epoch; a pure function of (seed, epoch) so resume is exact."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def micro_batches(n_examples: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless stream of micro-batches (lists of example indices), epoch after epoch."""
    epoch = 0
    while True:
        order = epoch_order(n_examples, seed, epoch)
        for i in range(0, len(order), batch_size):
            yield order[i : i + batch_size]
        epoch += 1


def _targets(e: Example) -> list[int]:
    """Next-token targets aligned with the inputs: position i predicts token i+1 (IGNORE at the end)."""
    return list(e.labels[1:]) + [IGNORE]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest in the batch (the reference layout); padding is masked by length."""
    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[b, :n] = torch.tensor(e.input_ids)
        targets[b, :n] = torch.tensor(_targets(e))
        attn[b, :n] = 1
    return {"input_ids": input_ids, "targets": targets, "attention_mask": attn}


def pack_rows(examples: list[Example], capacity: int) -> list[list[Example]]:
    """First-fit decreasing: group examples into rows of at most `capacity` tokens."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for e in sorted(examples, key=lambda e: -len(e.input_ids)):
        n = len(e.input_ids)
        for i, free in enumerate(room):
            if n <= free:
                rows[i].append(e)
                room[i] -= n
                break
        else:
            rows.append([e])
            room.append(capacity - n)
    return rows


def collate_packed(examples: list[Example], pad_id: int, capacity: int) -> dict[str, torch.Tensor]:
    """Concatenate examples into few rows; position ids restart at 0 for every example.

    With attention_mask=None, transformers reads the restarts as sequence boundaries and builds a
    block-diagonal causal mask: no token attends across examples, so each example's per-token losses
    equal the padded computation's while no compute is spent on padding. A row's unused tail is a pad
    segment of its own (positions from 0, no targets).
    """
    rows = pack_rows(examples, max(capacity, max(len(e.input_ids) for e in examples)))
    L = max(sum(len(e.input_ids) for e in row) for row in rows)
    R = len(rows)
    input_ids = torch.full((R, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, L), dtype=torch.long)
    targets = torch.full((R, L), IGNORE, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e.input_ids)
            input_ids[r, at : at + n] = torch.tensor(e.input_ids)
            position_ids[r, at : at + n] = torch.arange(n)
            targets[r, at : at + n] = torch.tensor(_targets(e))
            at += n
        position_ids[r, at:] = torch.arange(L - at)
    return {"input_ids": input_ids, "position_ids": position_ids, "targets": targets}


def preview(cfg: RunConfig, tok, n: int = 3) -> dict[str, Any]:
    """Format, counts, token-length statistics and the rendered template of the first example."""
    prep = prepare(cfg, tok)
    lengths = sorted(len(e.input_ids) for e in prep.train + prep.val)
    first = to_chat(read_rows(cfg.dataset)[0], prep.format)
    rendered = _render(tok, first) if isinstance(first, list) else (first if isinstance(first, str) else "".join(first))
    pct = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]
    return {
        "format": prep.format,
        "rows": prep.n_rows,
        "train": len(prep.train),
        "val": len(prep.val),
        "dropped": prep.n_dropped,
        "tokens_total": sum(lengths),
        "len_min": lengths[0],
        "len_p50": pct(0.5),
        "len_p95": pct(0.95),
        "len_max": lengths[-1],
        "rendered_example": rendered,
        "label_tokens_first": prep.train[0].n_label_tokens if prep.train else 0,
    }
