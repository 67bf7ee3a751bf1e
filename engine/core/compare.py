"""Outcome comparison, the pure side: which models a comparison holds, the reference-based scores, the
per-model summary, the CSV layout and how a comparison is written
(where: engine.core.runs.compare_path). No torch (engine.ml.compare generates).

    keys = parse_models(["run:3", "best:3", "4"], base=True)   # ["base", "run:3", "best:3", "run:4"]
    exact_match("Paris", " Paris ")  -> 1.0                   # equal after trimming whitespace
    rouge_l("the cat sat", "the cat")                         # LCS F-measure over lower-cased words
    chrf("Paris", "Paris")          -> 100.0                  # sacrebleu's chrF (character n-gram F-score)
    summary = summarize(result)                               # per model: the means, corpus chrF, perplexity

A result (what `python -m engine compare --json` prints and runs.compare_path holds):
    {"base_model", "source", "params", "models": [key, ...], "labels": {key: label},
     "prompts": [{"prompt", "reference", "outputs": {key: {"text", "exact_match", "rouge_l", "chrf",
                  "loss_sum", "tokens", "perplexity"}}}], "scores": {key: summary}}
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sacrebleu.metrics import CHRF

BASE = "base"
KINDS = ("run", "best")  # run:ID is the run's last adapter, best:ID its best validation step's
CSV_FIELDS = (
    "prompt_index",
    "model",
    "prompt",
    "reference",
    "output",
    "exact_match",
    "rouge_l",
    "chrf",
    "response_tokens",
    "perplexity",
)


def parse_model(ref: str) -> tuple[str, int]:
    """'run:3' | 'best:3' | '3' → (kind, run id); ValueError naming the bad value and the forms it takes."""
    text = str(ref).strip()
    kind, _, rid = text.rpartition(":")
    kind = kind or "run"
    if kind not in KINDS or not rid.isdigit():
        raise ValueError(f"model {ref!r}: give a run as ID, run:ID (its last adapter) or best:ID (its best adapter)")
    return kind, int(rid)


def model_key(kind: str, run_id: int) -> str:
    return f"{kind}:{run_id}"


def parse_models(refs: Iterable[str], base: bool = False) -> list[str]:
    """The comparison's model keys in order, the base first when asked, each once."""
    keys = [BASE] if base else []
    for ref in refs:
        key = model_key(*parse_model(ref))
        if key not in keys:
            keys.append(key)
    if not keys:
        raise ValueError("nothing to compare: give --runs ID [ID ...] (and --base for the base model)")
    return keys


# ---- scores -------------------------------------------------------------------------------------------------


def exact_match(hyp: str, ref: str) -> float:
    """1.0 when the output equals the reference after trimming leading/trailing whitespace, else 0.0."""
    return float(hyp.strip() == ref.strip())


def words(text: str) -> list[str]:
    """ROUGE's tokens: lower-cased runs of letters and digits (punctuation is not a word)."""
    return re.findall(r"\w+", text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hyp: str, ref: str) -> float:
    """ROUGE-L F-measure (β = 1): LCS of the words over the output's length (precision) and the
    reference's (recall), their harmonic mean. 0.0 when either side has no word."""
    h, r = words(hyp), words(ref)
    lcs = lcs_length(h, r)
    if not lcs:
        return 0.0
    p, rec = lcs / len(h), lcs / len(r)
    return 2 * p * rec / (p + rec)


def chrf(hyp: str, ref: str) -> float:
    """sacrebleu's sentence chrF (character 6-grams, β = 2), 0–100."""
    return float(CHRF().sentence_score(hyp, [ref]).score)


def corpus_chrf(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """sacrebleu's corpus chrF: n-gram statistics summed over all prompts before the F-score."""
    return float(CHRF().corpus_score(list(hyps), [list(refs)]).score)


def perplexity(loss_sum: float, tokens: int) -> float | None:
    """exp(mean per-token loss) over response tokens; None without tokens."""
    return math.exp(loss_sum / tokens) if tokens else None


def score_output(text: str, reference: str | None, loss_sum: float, tokens: int) -> dict[str, Any]:
    """One model's output on one prompt with its scores (None where there is no reference)."""
    has_ref = reference is not None
    return {
        "text": text,
        "exact_match": exact_match(text, reference) if has_ref else None,
        "rouge_l": rouge_l(text, reference) if has_ref else None,
        "chrf": chrf(text, reference) if has_ref else None,
        "loss_sum": loss_sum,
        "tokens": tokens,
        "perplexity": perplexity(loss_sum, tokens),
    }


def summarize(prompts: Sequence[dict[str, Any]], models: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per model: mean exact match and ROUGE-L, corpus chrF over the prompts with a reference, and the
    perplexity over all their response tokens together (exp of the token-weighted mean loss)."""
    out = {}
    for key in models:
        rows = [p for p in prompts if key in p["outputs"]]
        scored = [p for p in rows if p.get("reference") is not None]
        outs = [p["outputs"][key] for p in scored]
        loss = sum(p["outputs"][key]["loss_sum"] for p in rows)
        tokens = sum(p["outputs"][key]["tokens"] for p in rows)
        out[key] = {
            "prompts": len(rows),
            "with_reference": len(scored),
            "exact_match": sum(o["exact_match"] for o in outs) / len(outs) if outs else None,
            "rouge_l": sum(o["rouge_l"] for o in outs) / len(outs) if outs else None,
            "chrf": corpus_chrf([o["text"] for o in outs], [p["reference"] for p in scored]) if outs else None,
            "response_tokens": tokens,
            "perplexity": perplexity(loss, tokens),
        }
    return out


# ---- CSV and storage ------------------------------------------------------------------------------------------


def csv_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per prompt × model, in CSV_FIELDS order."""
    rows = []
    for i, p in enumerate(result["prompts"], 1):
        for key in result["models"]:
            o = p["outputs"].get(key)
            if o is None:
                continue
            rows.append(
                {
                    "prompt_index": i,
                    "model": result.get("labels", {}).get(key, key),
                    "prompt": p["prompt"],
                    "reference": p.get("reference") or "",
                    "output": o["text"],
                    "exact_match": _blank(o["exact_match"]),
                    "rouge_l": _blank(o["rouge_l"]),
                    "chrf": _blank(o["chrf"]),
                    "response_tokens": o["tokens"],
                    "perplexity": _blank(o["perplexity"]),
                }
            )
    return rows


def _blank(x: float | None) -> Any:
    return "" if x is None else x


def to_csv(result: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    w.writerows(csv_rows(result))
    return buf.getvalue()


def write_csv(result: dict[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(to_csv(result), encoding="utf-8", newline="")
    return p


def save_result(result: dict[str, Any], paths: Iterable[Path]) -> list[Path]:
    """Write the comparison to each path (engine.core.runs.compare_path of every compared run; the latest
    comparison replaces the one before)."""
    written = []
    for path in dict.fromkeys(Path(f) for f in paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
        tmp.replace(path)
        written.append(path)
    return written


def load_result(path: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
