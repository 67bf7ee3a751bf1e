"""Data that cannot be decoded (issue 13, item 9): a lone surrogate, UTF-16, binary or Latin-1 bytes give one
message naming the file and the line or byte offset and saying to re-save as UTF-8; nothing crashes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.core.config import RunConfig
from engine.ml.data import Chat, DatasetError, prepare, tokenize_example
from tests.tiny import make_chatml_bpe_tokenizer

ROOT = Path(__file__).resolve().parent.parent
ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ahoy"}]}


@pytest.fixture(scope="module")
def tok():
    return make_chatml_bpe_tokenizer()


def _utf16(path: Path) -> None:
    path.write_text(json.dumps(ROW) + "\n", encoding="utf-16")  # with a byte-order mark


def _utf16_no_bom(path: Path) -> None:
    path.write_bytes((json.dumps(ROW) + "\n").encode("utf-16-le"))


def _binary(path: Path) -> None:
    path.write_bytes(json.dumps(ROW).encode() + b"\n" + bytes(range(128, 256)) * 4)


def _latin1_csv(path: Path) -> None:
    path.write_bytes("instruction,output\ncafé?,oui\n".encode("latin-1"))


def _surrogate_in_chat(path: Path) -> None:
    # json.dumps writes the lone surrogate as the escape \ud83d, as a truncating exporter does
    bad = {"messages": [{"role": "user", "content": "hi \ud83d"}, {"role": "assistant", "content": "yo"}]}
    path.write_text(json.dumps(ROW) + "\n" + json.dumps(bad) + "\n")


@pytest.mark.parametrize(
    "name,write,needles",
    [
        ("u16.jsonl", _utf16, ["u16.jsonl: the file is UTF-16 (byte-order mark at byte 0)", "re-save it as UTF-8"]),
        ("raw16.jsonl", _utf16_no_bom, ["raw16.jsonl: NUL byte at byte offset 1", "re-save it as UTF-8"]),
        ("blob.jsonl", _binary, [f"blob.jsonl: byte 0x80 at byte offset {len(json.dumps(ROW)) + 1} is not UTF-8"]),
        ("latin.csv", _latin1_csv, ["latin.csv: byte 0xe9 at byte offset 22 is not UTF-8", "re-save it as UTF-8"]),
        ("emoji.jsonl", _surrogate_in_chat, ["emoji.jsonl line 2: a lone UTF-16 surrogate \\ud83d"]),
    ],
)
def test_undecodable_data_names_the_file_and_the_place(tmp_path, tok, name, write, needles):
    write(tmp_path / name)
    with pytest.raises(DatasetError) as e:
        prepare(RunConfig(dataset=str(tmp_path / name)), tok)
    for needle in needles:
        assert needle in str(e.value), str(e.value)


def test_a_lone_surrogate_does_not_crash_tokenization(tok):
    """Items built in code (not read through Arrow, which refuses them) still get a message, not a TypeError."""
    chat = Chat([{"role": "user", "content": "hi \ud83d"}, {"role": "assistant", "content": "yo"}])
    with pytest.raises(DatasetError, match=r"lone UTF-16 surrogate \\ud83d .* cannot be tokenized"):
        tokenize_example(tok, chat, "responses", 64)
    assert tokenize_example(tok, "plain \u00e9t\u00e9 \U0001f600", "all", 64).input_ids  # real unicode is fine


def test_the_cli_says_it_in_one_line_without_a_traceback(tmp_path, tiny_llama_dir):
    _utf16(tmp_path / "u16.jsonl")
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
            str(tmp_path / "u16.jsonl"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: u16.jsonl: the file is UTF-16"), p.stderr
