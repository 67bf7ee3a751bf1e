"""The History tab's "Compare outcomes" section: the base and chosen adapters (a run's last or best) on the same
evaluation prompts, side by side per prompt, with their scores and a CSV download.

It runs `python -m engine compare --runs ... [--base] (--val | --prompts FILE) --csv OUT --json` in a child
process (ui.backend): one process holds one base copy with every adapter (engine.ml.compare). The model
choices are the Chat tab's (base, run:ID, best:ID); the scores are engine.core.compare's.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from engine.core import compare as C
from engine.core.runs import compare_csv_path
from ui.chat_tab import BASE, pane_choices
from ui.errors import warn

COMPARE_TIMEOUT_S = 1800.0
SOURCES = [("validation rows of the first run", "val"), ("a dataset file", "file")]
SCORE_COLUMNS = ["model", "prompts", "exact match", "ROUGE-L", "chrF", "perplexity"]
EXPLAIN = """\
Greedy outputs of each model on the same prompts (a row's prompt: the conversation up to the assistant's
turn), scored against the row's response. **Exact match**: the share of outputs equal to the reference
(leading/trailing spaces aside). **ROUGE-L**: F-measure of the longest common word subsequence (0–1).
**chrF**: character n-gram F-score (sacrebleu, 0–100, over all prompts). **Perplexity**: exp of the mean loss
on the references' response tokens, lower is better: the held-out perplexity when the rows are validation rows.
The CLI does the same: `python -m engine compare --runs 3 best:3 --base --val`.
"""


def compare_args(
    models: Sequence[str] | None, source: str, dataset: str, max_new: float, limit: float, *, backend, home
):
    """The engine command for the chosen models and prompts; ValueError saying what is missing."""
    picked = list(models or [])
    runs = [m for m in picked if m != BASE]
    if not runs:
        raise ValueError("choose at least one run's adapter to compare (the base alone has nothing to compare with)")
    ids = [C.parse_model(m)[1] for m in runs]
    args = ["compare", "--runs", *runs, *(["--base"] if BASE in picked else [])]
    if source == "file":
        if not (dataset or "").strip():
            raise ValueError("give the evaluation file (an uploaded dataset or a file in an allowed folder)")
        args += ["--prompts", backend.readable_dataset(dataset)]
    else:
        args.append("--val")
    args += ["--max-new-tokens", str(int(max_new)), "--limit", str(int(limit))]
    return args + ["--csv", str(compare_csv_path(home, ids)), "--json"]


def fmt(x: float | None, digits: int) -> float | None:
    return None if x is None else round(float(x), digits)


def scores_table(result: dict[str, Any]) -> pd.DataFrame:
    labels = result["labels"]
    rows = [
        [labels[k], s["prompts"], fmt(s["exact_match"], 3), fmt(s["rouge_l"], 3), fmt(s["chrf"], 1)]
        + [fmt(s["perplexity"], 3)]
        for k, s in result["scores"].items()
    ]
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def side_by_side(result: dict[str, Any]) -> pd.DataFrame:
    """One row per prompt: the prompt, the reference, then each model's output."""
    labels = [result["labels"][k] for k in result["models"]]
    rows = [
        [i, p["prompt"], p.get("reference") or ""] + [p["outputs"][k]["text"] for k in result["models"]]
        for i, p in enumerate(result["prompts"], 1)
    ]
    return pd.DataFrame(rows, columns=["#", "prompt", "reference", *labels])


def compare_outcomes(models, source, dataset, max_new, limit, *, backend, home: Path):
    """Compare button → [message, scores table, side-by-side table, CSV file]."""
    try:
        args = compare_args(models, source, dataset, max_new, limit, backend=backend, home=home)
        result = backend.run(args, COMPARE_TIMEOUT_S)
    except ValueError as e:
        return warn(str(e)), gr.skip(), gr.skip(), gr.skip()
    skipped = result.get("skipped_no_prompt") or 0
    note = f"; {skipped} row(s) without a prompt left out" if skipped else ""
    md = (
        f"**{len(result['prompts'])} prompts** ({result['source']}) on `{result['base_model']}`{note}. "
        f"Stored in {', '.join(f'`{p}`' for p in result.get('stored', []))}."
    )
    csv = gr.update(value=result["csv"], visible=True) if result.get("csv") else gr.skip()
    return md, scores_table(result), side_by_side(result), csv


def refresh_models(current: Sequence[str] | None, *, store):
    choices = pane_choices(store)
    values = {v for _, v in choices}
    return gr.update(choices=choices, value=[c for c in current or [] if c in values])


def build_compare_panel(store, backend, home: Path):
    """The section, wired; returns (fn, inputs, outputs) that refreshes its model choices."""
    gr.Markdown("### Compare outcomes")
    with gr.Row():
        models = gr.Dropdown(
            pane_choices(store),
            value=[],
            multiselect=True,
            label="Models (base, a run's last or best adapter)",
            scale=3,
        )
        source = gr.Radio(SOURCES, value="val", label="Prompts", scale=2)
    with gr.Row():
        dataset = gr.Textbox("", label="Evaluation file (for “a dataset file”)", scale=3)
        max_new = gr.Number(64, precision=0, minimum=1, label="Max new tokens", scale=1)
        limit = gr.Number(20, precision=0, minimum=0, label="Prompts (0 = all)", scale=1)
        run_btn = gr.Button("Compare outcomes", variant="primary", scale=1, elem_id="compare-outcomes")
    msg = gr.Markdown(elem_id="compare-outcomes-msg")
    scores = gr.Dataframe(pd.DataFrame(columns=SCORE_COLUMNS), interactive=False, label="Scores")
    side = gr.Dataframe(pd.DataFrame(columns=["#", "prompt", "reference"]), interactive=False, wrap=True)
    csv = gr.File(label="Comparison (CSV)", visible=False, interactive=False)
    with gr.Accordion("What the scores mean", open=False):
        gr.Markdown(EXPLAIN)
    run_btn.click(
        partial(compare_outcomes, backend=backend, home=home),
        [models, source, dataset, max_new, limit],
        [msg, scores, side, csv],
        api_name="compare_outcomes",
    )
    return partial(refresh_models, store=store), [models], [models]
