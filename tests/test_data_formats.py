"""Every common dataset layout, written here in the shapes users bring: what the model sees, what it learns,
and that nothing is silently lost (issue 11)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.core.config import RunConfig
from engine.ml.data import IGNORE, DatasetError, native_tools, prepare, preview
from tests.tiny import TOOLS_TEMPLATE, WORDS, make_chatml_bpe_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def chatml():
    """Byte-level BPE with a ChatML template that knows nothing of tools (like SmolLM2's)."""
    return make_chatml_bpe_tokenizer()


@pytest.fixture(scope="module")
def tooled():
    """The same tokenizer with a Hermes-style template that renders tools, calls and results."""
    return make_chatml_bpe_tokenizer(TOOLS_TEMPLATE)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def learned_text(tok, ex) -> str:
    return tok.decode([t for t in ex.labels if t != IGNORE])


def cfg_for(path, **kw) -> RunConfig:
    train = {"val_split": 0.0, **kw.pop("train", {})}
    return RunConfig.from_dict({"dataset": str(path), "train": train, **kw})


# ---- content parts ---------------------------------------------------------------------------------------


def test_content_parts_train_on_their_text_not_a_repr(tmp_path, chatml):
    rows = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]},
                {
                    "role": "assistant",
                    "content": [{"type": "text", "value": "ahoy matey"}],
                },  # 'value' as some tools write
            ]
        },
        {"messages": [{"role": "user", "content": "plain string"}, {"role": "assistant", "content": "yes"}]},
    ]
    prep = prepare(cfg_for(write_jsonl(tmp_path / "parts.jsonl", rows)), chatml)
    first = prep.first  # the first row, in the file's order
    text = chatml.decode(list(first.input_ids))
    assert text == "<|im_start|>user\nhello\nthere<|im_end|>\n<|im_start|>assistant\nahoy matey<|im_end|>\n"
    assert "[{" not in text and "'type'" not in text
    assert learned_text(chatml, first) == "ahoy matey<|im_end|>\n"  # the reply and its end of turn, nothing else


# ---- tool calling -------------------------------------------------------------------------------------------

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "the weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
SHAREGPT_TOOLS = {
    "conversations": [
        {"from": "human", "value": "weather in paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "paris"}})},
        {"from": "observation", "value": json.dumps({"temp": 21, "sky": "sunny"})},
        {"from": "gpt", "value": "it is sunny in paris"},
    ],
    "tools": json.dumps([WEATHER_TOOL]),  # LLaMA-Factory writes the tools column as a JSON string
    "system": "be brief",
}
OPENAI_TOOLS = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather in paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21, "sky": "sunny"}'},
        {"role": "assistant", "content": "it is sunny in paris"},
    ],
    "tools": [{"type": "function", "function": WEATHER_TOOL}],
}
PLAIN = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ahoy"}]}


@pytest.mark.parametrize("layout", ["sharegpt", "openai"])
@pytest.mark.parametrize("template", ["fallback", "native"])
def test_tool_calls_are_learned_and_tool_results_are_not(tmp_path, chatml, tooled, layout, template):
    tok = tooled if template == "native" else chatml
    assert native_tools(tok) is (template == "native")
    row = SHAREGPT_TOOLS if layout == "sharegpt" else OPENAI_TOOLS
    plain = (
        PLAIN
        if layout == "openai"
        else {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ahoy"}]}
    )
    prep = prepare(cfg_for(write_jsonl(tmp_path / "tools.jsonl", [row, plain])), tok)
    assert prep.tools == ("chat template" if template == "native" else "fallback rendering")
    ex = max(prep.train, key=lambda e: len(e.input_ids))
    text, learned = tok.decode(list(ex.input_ids)), learned_text(tok, ex)
    assert "the weather of a city" in text  # the tool definition is shown to the model
    assert '"temp": 21' in text  # and the tool's result
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris"}}\n</tool_call>'
    assert call in learned and "it is sunny in paris" in learned  # loss on the call and the answer
    for never in ("temp", 'sunny"', "weather in paris?", "the weather of a city", "be brief"):
        assert never not in learned, never  # no loss on tool results, the question, the tools, the system
    if template == "fallback":  # the documented fallback layout (README, Tool calling)
        assert "<tools>\n" in text and '<tool_response>\n{"temp": 21, "sky": "sunny"}\n</tool_response>' in text


@pytest.mark.parametrize("layout", ["sharegpt", "openai"])
def test_tool_calling_files_train(tmp_path, layout):
    """A short run of the tiny BPE Llama on each tool-calling layout: it trains and saves an adapter."""
    from engine.core.events import ListSink
    from engine.ml.train import train
    from tests.tiny import build_tiny_llama_bpe

    model = build_tiny_llama_bpe(tmp_path / "model")
    row = SHAREGPT_TOOLS if layout == "sharegpt" else OPENAI_TOOLS
    data = write_jsonl(tmp_path / "tools.jsonl", [row] * 6)
    cfg = RunConfig.from_dict(
        {"model": str(model), "dataset": str(data), "train": {"max_steps": 2, "batch_size": 2, "val_split": 0}}
    )
    sink = ListSink()
    result = train(cfg, tmp_path / "run", sink, home=tmp_path / "home")
    assert result.status == "succeeded" and result.final_loss is not None and result.final_loss > 0
    summary = sink.summary["summary"]
    assert summary["tools"] == "fallback rendering" and summary["rows"] == 6 and summary["dropped"] == {}
    assert (Path(result.adapter_dir) / "adapter_model.safetensors").is_file()


# ---- plain text: continued pre-training --------------------------------------------------------------------


def corpus(n_paragraphs: int, words: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n_paragraphs)]


@pytest.mark.parametrize("layout", ["paragraphs", "long lines"])
def test_plain_text_keeps_every_token(tmp_path, chatml, layout):
    """The issue's case: long documents in a .txt with max_seq_len far shorter. group_texts keeps them all."""
    docs = corpus(30, 400)
    sep = "\n\n" if layout == "paragraphs" else "\n"
    (tmp_path / "book.txt").write_text(sep.join(docs) + "\n")
    prep = prepare(cfg_for(tmp_path / "book.txt", train={"max_seq_len": 64, "val_split": 0.1}), chatml)
    expected = sum(len(chatml(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)  # + EOS per document
    kept = sum(len(e.input_ids) for e in prep.train + prep.val)
    assert prep.n_rows == 30 and prep.format == "text"
    assert prep.tokens_total == expected and kept >= 0.99 * expected
    assert kept == expected and prep.tokens_truncated == 0  # in fact every single one
    assert sum(len(e.input_ids) == 64 for e in prep.train + prep.val) == expected // 64  # full blocks
    assert all(e.labels == e.input_ids for e in prep.train)  # continued pre-training: every token is a target


def test_text_split_modes(tmp_path, chatml):
    (tmp_path / "t.txt").write_text("one two\nthree\n\nfour\n")
    counts = {
        mode: prepare(cfg_for(tmp_path / "t.txt", text_split=mode), chatml).n_rows
        for mode in ("auto", "paragraph", "line", "file")
    }
    assert counts == {"auto": 2, "paragraph": 2, "line": 3, "file": 1}


def test_long_text_rows_in_jsonl_are_grouped_not_truncated(tmp_path, chatml):
    docs = corpus(3, 300)
    prep = prepare(
        cfg_for(write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in docs]), train={"max_seq_len": 50}), chatml
    )
    expected = sum(len(chatml(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)
    assert prep.tokens_kept == prep.tokens_total == expected and prep.tokens_truncated == 0


# ---- what is dropped or cut is counted ------------------------------------------------------------------------


def test_truncation_and_drops_are_counted(tmp_path, chatml):
    long_answer = " ".join(corpus(1, 200)[0].split())
    rows = [
        PLAIN,
        {"messages": [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": long_answer}]},
        {"messages": [{"role": "user", "content": long_answer}, {"role": "assistant", "content": "ok"}]},
    ]
    tok = chatml
    prep = prepare(cfg_for(write_jsonl(tmp_path / "d.jsonl", rows), train={"max_seq_len": 40}), tok)
    full = [len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]) for r in rows]
    assert prep.n_rows == 3 and len(prep.train) == 2
    assert prep.dropped == {"no response token within max_seq_len (the prompt alone is longer)": 1}
    assert prep.tokens_total == sum(full)
    assert prep.tokens_kept == full[0] + 40 and prep.tokens_truncated == full[1] - 40
    assert prep.tokens_dropped == full[2] and prep.rows_truncated == 1 and prep.longest == max(full)


def test_preview_json_reports_counts_and_the_rendered_example(tmp_path, tiny_llama_dir, chat_jsonl):
    """`engine preview --json`: rows, dropped by reason, tokens total/kept/truncated, format, rendered_example."""
    long = {
        "messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": " ".join(["arr"] * 80)}]
    }
    data = tmp_path / "d.jsonl"
    data.write_text(chat_jsonl.read_text() + json.dumps(long) + "\n")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "--home",
            str(tmp_path / "home"),
            "preview",
            "--model",
            str(tiny_llama_dir),
            "--dataset",
            str(data),
            "--max-seq-len",
            "32",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    from engine.ml.data import Chat, tokenize_example
    from engine.ml.model import load_tokenizer

    tok = load_tokenizer(str(tiny_llama_dir))
    lengths = [
        len(tokenize_example(tok, Chat(json.loads(line)["messages"]), "responses", 10**6).input_ids)
        for line in data.read_text().splitlines()
    ]
    assert info["format"] == "messages" and info["rows"] == 25 and info["dropped"] == {}
    assert info["tokens_total"] == sum(lengths) and info["tokens_truncated"] == lengths[-1] - 32
    assert info["rows_truncated"] == 1 and info["tokens_kept"] == sum(lengths) - (lengths[-1] - 32)
    assert (
        info["rendered_example"]
        == "user : what is the capital of france ? assistant : arr matey the capital of france is paris ! </s>"
    )
    assert info["warning"] and "max_seq_len = 32" in info["warning"]  # 53 of 494 tokens cut: over 1 %


# ---- other files, folders, hub ids, column mapping --------------------------------------------------------------


def test_parquet_and_arrow_files_load(tmp_path, chatml):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": f"say {w}", "input": "", "output": w} for w in WORDS[:10]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as f, pa.ipc.new_stream(f, pa.Table.from_pylist(rows).schema) as w:
        w.write_table(pa.Table.from_pylist(rows))
    for name in ("d.parquet", "d.arrow"):
        prep = prepare(cfg_for(tmp_path / name), chatml)
        assert prep.format == "alpaca" and prep.n_rows == 10 and len(prep.train) == 10
        assert learned_text(chatml, prep.first) == "the<|im_end|>\n"


def test_column_mapping(tmp_path, chatml):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "hi", "answer": "ahoy", "prompt": "ignored"}])
    prep = prepare(cfg_for(data, columns={"prompt": "question", "response": "answer"}), chatml)
    assert prep.format == "prompt_completion" and chatml.decode(list(prep.first.input_ids)) == "hiahoy<|im_end|>"
    with pytest.raises(DatasetError, match=r"columns prompt=nope: no such column; its columns are \['question'"):
        prepare(cfg_for(data, columns="prompt=nope"), chatml)


def test_folder_reads_every_file_of_its_split_and_says_what_it_skips(tmp_path, chatml):
    folder = tmp_path / "data"
    (folder / "more").mkdir(parents=True)
    write_jsonl(folder / "train-1.jsonl", [PLAIN] * 2)
    write_jsonl(folder / "more" / "train-2.jsonl", [PLAIN] * 3)
    write_jsonl(folder / "test.jsonl", [PLAIN] * 4)
    (folder / "README.md").write_text("about")
    prep = prepare(cfg_for(folder), chatml)
    assert prep.n_rows == 5
    assert "test.jsonl: not read (split test; set dataset_split to use it)" in prep.notes
    assert "README.md: not read (not a data file)" in prep.notes
    assert prepare(cfg_for(folder, dataset_split="test"), chatml).n_rows == 4


def hub_cache(root: Path, repo: str, files: dict[str, list[dict]]) -> Path:
    """A dataset in the hub client's cache layout: datasets--org--name/snapshots/<rev>/ and refs/main."""
    rev = "0" * 40
    base = root / f"datasets--{repo.replace('/', '--')}"
    for rel, rows in files.items():
        (base / "snapshots" / rev / rel).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(base / "snapshots" / rev / rel, rows)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(rev)
    return root


def test_hub_dataset_id_loads_offline_from_the_hub_cache(tmp_path, tiny_llama_dir, chat_jsonl, chatml, monkeypatch):
    """hf:org/name with HF_HUB_OFFLINE=1, served from a hub cache laid out as `hf download` writes it."""
    import huggingface_hub.constants

    rows = [json.loads(x) for x in chat_jsonl.read_text().splitlines()]
    cache = hub_cache(
        tmp_path / "hub", "loralab-test/pirate-chat", {"data/train.jsonl": rows, "data/test.jsonl": rows[:3]}
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_DATASETS_CACHE": str(tmp_path / "ds")}
    p = subprocess.run(  # through the CLI, as a new user would
        [
            sys.executable,
            "-m",
            "engine",
            "--home",
            str(tmp_path / "home"),
            "preview",
            "--model",
            str(tiny_llama_dir),
            "--dataset",
            "hf:loralab-test/pirate-chat",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["rows"] == 24  # the train split; test.jsonl is the test split
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import; the same here
    assert prepare(cfg_for("hf:loralab-test/pirate-chat", dataset_split="test"), chatml).n_rows == 3
    with pytest.raises(DatasetError) as e:
        prepare(cfg_for("hf:loralab-test/not-here"), chatml)
    assert "'hf:loralab-test/not-here' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in str(e.value)
    assert "hf download --repo-type dataset loralab-test/not-here" in str(e.value)


# ---- what is not supported says so -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row,needle",
    [
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "looks like preference data"),
        ({"prompt": "p", "completion": "a", "label": True}, "unpaired preference (KTO) data"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                    {"role": "assistant", "content": "a cat"},
                ]
            },
            "d.jsonl line 1: turn 1 has an image_url part: multimodal rows are not supported",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "..."}}]},
                    {"role": "assistant", "content": "hi"},
                ]
            },
            "multimodal rows are not supported",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
                ]
            },
            "d.jsonl line 1: turn 2: tool call arguments are not valid JSON",
        ),
        (
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "call f"}]},
            "turn 2 (function_call) must hold JSON",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn to learn from"),
        ({"question": "q", "answer": "a"}, "Map your names with columns"),
    ],
)
def test_unsupported_rows_say_what_they_are(tmp_path, chatml, row, needle):
    with pytest.raises(DatasetError) as e:
        prepare(cfg_for(write_jsonl(tmp_path / "d.jsonl", [row])), chatml)
    assert needle in str(e.value)


def test_preview_of_every_builtin(chatml):
    persona = preview(RunConfig(dataset="builtin:persona"), chatml)
    assert persona["rows"] == 172 and persona["tokens_kept"] == persona["tokens_total"] and persona["dropped"] == {}
    chatter = preview(RunConfig(dataset="builtin:chatterbot"), chatml)  # a few long rows for this tiny vocabulary
    assert chatter["rows"] > 2000
    assert chatter["tokens_kept"] + chatter["tokens_truncated"] + chatter["tokens_dropped"] == chatter["tokens_total"]
