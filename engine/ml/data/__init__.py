"""Datasets → training examples (torch side; the web server never imports this package).

    prep = prepare(cfg, tok, cache_dir)            # read, detect the format, tokenize (cached), split
    batch = collate_packed(examples, pad_id, T)    # micro-batches as tensors

Modules, in the order the data flows through them:

    read.py      rows through 🤗 datasets: files, folders, hub ids (offline from the caches), built-in sets
    diagnose.py  what is wrong with a file datasets could not read (line, byte offset, encoding)
    formats.py   format detection; rows → Chat (messages, tool calls) | (prompt, completion) | text
    templates.py chat templates (tools= when the template supports them, else a documented fallback) and
                 the character spans of the assistant turns
    tokens.py    ids and response-only labels, truncation counts, group_texts for plain text
    pipeline.py  prepare() and preview(): the whole pipeline, its cache and its counts
    batching.py  collate (padded) and collate_packed (rows with restarting position ids)
"""

from engine.ml.data.batching import collate, collate_packed, epoch_order, micro_batches, pack_rows
from engine.ml.data.diagnose import DatasetError
from engine.ml.data.formats import Chat, detect_format, split_text, to_item
from engine.ml.data.pipeline import TOKENIZATION_VERSION, Prepared, check_rows, prepare, preview
from engine.ml.data.read import SUFFIXES, read_parts
from engine.ml.data.templates import chat_text, native_tools, render
from engine.ml.data.tokens import IGNORE, Example, encode, group_texts, tokenize_example

__all__ = [
    "IGNORE",
    "SUFFIXES",
    "TOKENIZATION_VERSION",
    "Chat",
    "DatasetError",
    "Example",
    "Prepared",
    "chat_text",
    "check_rows",
    "collate",
    "collate_packed",
    "detect_format",
    "encode",
    "epoch_order",
    "group_texts",
    "micro_batches",
    "native_tools",
    "pack_rows",
    "prepare",
    "preview",
    "read_parts",
    "render",
    "split_text",
    "to_item",
    "tokenize_example",
]
