"""The run config's data fields: hub ids, the column mapping, plain-text splitting; stdlib only.

engine.core.config declares the fields and calls validate_data(); engine.ml.data reads the data by them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

TEXT_SPLITS = ("auto", "paragraph", "line", "file")
# The data files LoRA Lab reads, and the 🤗 datasets builder that reads each (engine.ml.data.read).
DATA_FILE_TYPES = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}
HUB_PREFIX = "hf:"  # dataset = "hf:org/name": a Hugging Face hub dataset
# The field names a format reads; `columns` maps them to a file's own names.
DATASET_COLUMNS = (
    "messages",
    "conversations",
    "tools",
    "system",
    "instruction",
    "input",
    "output",
    "history",
    "prompt",
    "completion",
    "response",
    "text",
)


class _Problems(list):
    def need(self, ok: bool, name: str, value: Any, allowed: str) -> None:
        if not ok:
            self.append(f"{name} = {value!r}: {allowed}")


def validate_data(cfg: Any) -> list[str]:
    """The problems of a RunConfig's data fields beyond their choices (engine.core.config.validate adds them)."""
    p = _Problems()
    if cfg.dataset.startswith(HUB_PREFIX):
        p.need(
            bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", cfg.dataset[len(HUB_PREFIX) :]))
            and ".." not in cfg.dataset,
            "dataset",
            cfg.dataset,
            "a hub dataset is hf:org/name (letters, digits, '_', '.', '-')",
        )
    for target, source in cfg.columns:
        p.need(target in DATASET_COLUMNS, "columns", target, f"map one of {', '.join(DATASET_COLUMNS)}")
        p.need(bool(source.strip()), f"columns.{target}", source, "give the name of a column of the data")
    sources = [s for _, s in cfg.columns]
    dup = sorted({s for s in sources if sources.count(s) > 1})
    if dup:
        p.append(f"columns: {', '.join(map(repr, dup))} mapped twice; map each column of the data once")
    return list(p)


def parse_columns(value: Any) -> tuple[tuple[str, str], ...]:
    """{'prompt': 'question'}, 'prompt=question, response=answer' or [['prompt', 'question']] → pairs."""
    if value is None or value == "" or value == {} or value == []:
        return ()
    if isinstance(value, str):
        pairs = []
        for part in (x.strip() for x in value.split(",")):
            if not part:
                continue
            m = re.fullmatch(r"([^=:\s]+)\s*[=:]\s*(\S.*)", part)
            if not m:
                raise ValueError(f"cannot read {part!r}; write pairs like 'prompt=question, response=answer'")
            pairs.append((m.group(1), m.group(2).strip()))
        return tuple(pairs)
    if isinstance(value, Mapping):
        value = list(value.items())
    if isinstance(value, (list, tuple)) and all(
        isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(y, str) for y in x) for x in value
    ):
        return tuple((str(a), str(b)) for a, b in value)
    raise TypeError("must be a mapping of names, e.g. {prompt: question, response: answer}")


def columns_text(columns: tuple[tuple[str, str], ...]) -> str:
    """The inverse of parse_columns for a text box: 'prompt=question, response=answer'."""
    return ", ".join(f"{a}={b}" for a, b in columns)


CUT_WARN_FRACTION = 0.01  # the Train tab and `engine preview` warn when more of the data's tokens would be cut


def truncation_warning(stats: Mapping[str, Any], max_seq_len: int) -> str | None:
    """The warning, with the fix, when more than 1 % of a dataset's tokens would be cut (engine preview's stats)."""
    total = int(stats.get("tokens_total") or 0)
    cut = int(stats.get("tokens_truncated") or 0)
    long_prompts = sum(n for why, n in (stats.get("dropped") or {}).items() if "max_seq_len" in why)
    lost = cut + (int(stats.get("tokens_dropped") or 0) if long_prompts else 0)
    if not total or lost / total <= CUT_WARN_FRACTION:
        return None
    rows = int(stats.get("rows") or 0)
    long_rows = int(stats.get("rows_truncated") or 0) + long_prompts
    dropped = f", {long_prompts} of them dropped (their prompt alone is longer)" if long_prompts else ""
    return (
        f"{100 * lost / total:.1f} % of the data's tokens would be cut: {long_rows:,} of {rows:,} rows "
        f"({100 * long_rows / max(1, rows):.0f} %) are longer than max_seq_len = {max_seq_len}{dropped}. "
        f"Raise max_seq_len to {int(stats.get('longest') or 0):,} to keep every token (memory grows with it), "
        "or shorten those rows."
    )
