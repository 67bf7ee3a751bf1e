"""Items → token ids with labels: response-only labels for chats, prompt masking for completions, and
group_texts for plain text.

    enc = encode(tok, items, train_on, max_len)       # batched: input_ids, labels, n_full, n_learn_full
    ex = tokenize_example(tok, item, train_on, max_len)
    blocks = group_texts(docs_ids, block_size)         # plain text: joined with EOS, cut into blocks

Truncation keeps the first max_len tokens; n_full (the length before truncation) and n_learn_full (its
labelled tokens) are kept so that nothing is cut or dropped without the preview and the run saying so.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from engine.ml.data.diagnose import DatasetError, lone_surrogate
from engine.ml.data.formats import Chat, Item
from engine.ml.data.templates import chat_text

IGNORE = -100  # label value the loss skips


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE where no loss is taken

    @property
    def n_label_tokens(self) -> int:
        """Tokens the loss is taken on: labelled tokens after the first (token 0 has nothing before it)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE)


def learned(labels: Sequence[int]) -> int:
    return sum(1 for x in labels[1:] if x != IGNORE)


def encode(tok, items: Sequence[Item], train_on: str, max_len: int, wheres: Sequence[str] | None = None) -> dict:
    """Token ids and labels of each item (truncated to max_len), with n_full and n_learn_full before truncation."""
    wheres = wheres or [f"row {i + 1}" for i in range(len(items))]
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    ids_all: list[list[int]] = [[] for _ in items]
    labels_all: list[list[int]] = [[] for _ in items]
    chats = [(i, it) for i, it in enumerate(items) if isinstance(it, Chat)]
    if chats:
        rendered = [chat_text(tok, it, wheres[i]) for i, it in chats]
        enc = _tok(tok, [t for t, _ in rendered], [wheres[i] for i, _ in chats], return_offsets_mapping=True)
        for (i, _), (_, spans), ids, offsets in zip(chats, rendered, enc["input_ids"], enc["offset_mapping"]):
            ids_all[i] = list(ids)
            # A token is learned when it starts inside an assistant span.
            labels_all[i] = (
                list(ids)
                if train_on == "all"
                else [t if any(a <= s < b for a, b in spans) else IGNORE for t, (s, _e) in zip(ids, offsets)]
            )
    pairs = [(i, it) for i, it in enumerate(items) if isinstance(it, tuple)]
    if pairs:  # prompt → completion, raw continuation
        where = [wheres[i] for i, _ in pairs]
        ps = _tok(tok, [p for _, (p, _c) in pairs], where)["input_ids"]
        cs = _tok(tok, [c for _, (_p, c) in pairs], where)["input_ids"]
        for (i, _), p, c in zip(pairs, ps, cs):
            c = list(c) + eos
            ids_all[i] = list(p) + c
            labels_all[i] = (list(p) if train_on == "all" else [IGNORE] * len(p)) + c
    texts = [(i, it) for i, it in enumerate(items) if isinstance(it, str)]
    if texts:  # plain text: learn every token
        for (i, _), ids in zip(texts, _tok(tok, [t for _, t in texts], [wheres[i] for i, _ in texts])["input_ids"]):
            ids_all[i] = list(ids) + eos
            labels_all[i] = list(ids_all[i])
    return {
        "input_ids": [x[:max_len] for x in ids_all],
        "labels": [x[:max_len] for x in labels_all],
        "n_full": [len(x) for x in ids_all],
        "n_learn_full": [learned(x) for x in labels_all],
    }


def _tok(tok, texts: list[str], wheres: Sequence[Any], **kw) -> Any:
    """tok(texts) with a row-naming error for text no tokenizer takes: a lone UTF-16 surrogate (the fast
    tokenizers raise a bare TypeError). Data read through Arrow cannot hold one; items built in code can."""
    try:
        return tok(texts, add_special_tokens=False, **kw)
    except TypeError:
        for text, where in zip(texts, wheres):
            bad = lone_surrogate(text)
            if bad:
                raise DatasetError(
                    f"{where}: a lone UTF-16 surrogate {bad} in the text (half of an emoji?) cannot be tokenized; "
                    "fix or remove that character"
                ) from None
        raise


def tokenize_example(tok, item: Item, train_on: str, max_len: int) -> Example:
    enc = encode(tok, [item], train_on, max_len)
    return Example(tuple(enc["input_ids"][0]), tuple(enc["labels"][0]))


def group_texts(docs: Iterable[Sequence[int]], block_size: int) -> Iterator[tuple[int, ...]]:
    """The standard group_texts of continued pre-training: documents (each ending in EOS) are concatenated
    and cut into blocks of block_size tokens. Unlike run_clm's, the last, shorter block is kept: every
    token of the data is in some block (packing pads nothing either way)."""
    buf: list[int] = []
    for ids in docs:
        buf.extend(ids)
        while len(buf) >= block_size:
            yield tuple(buf[:block_size])
            del buf[:block_size]
    if buf:
        yield tuple(buf)


def rows_of(batch: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """A datasets batch (column → values) as row dicts."""
    keys = list(batch)
    return [dict(zip(keys, vals)) for vals in zip(*(batch[k] for k in keys))]
