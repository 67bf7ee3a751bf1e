"""Bad input through the CLI, as a user types it: every case is its own `python -m engine ...` process on its
own data home, and must end with the right exit code, ONE `error:` line that names the problem, no traceback,
and a database that is intact (PRAGMA integrity_check) with nothing left `running` or `queued`.

Configs are refused before any model is loaded (`submit`, ~1 s each); model paths by `estimate` and
`train`, datasets by `train` on the tiny model of tests/tiny.py (torch start-up, a few seconds each). The
processes run two at a time; each case's assertions look only at its own process and data home.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.tiny import QA

REPO_ROOT = Path(__file__).resolve().parent.parent
GOOD_ROW = json.dumps({"messages": [{"role": "user", "content": QA[0][0]}, {"role": "assistant", "content": QA[0][1]}]})


def lol_bomb() -> str:
    """A YAML "billion laughs": nine levels of nine aliases each (9⁹ strings once expanded)."""
    lines, prev = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]'], "a"
    for name in "bcdefghi":
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
        prev = name
    return "\n".join([*lines, "lora: *i", ""])


@dataclass(frozen=True)
class Case:
    name: str
    command: str  # submit | train | estimate
    config: Any  # a dict (written as JSON), str/bytes (the file as is), or a callable(model, data) → dict
    expect: tuple[str, ...]  # what the one error line must contain
    code: int = 2
    suffix: str = ".json"
    data: tuple[str, bytes] | None = None  # (file name, content) of a dataset the config may point at
    cpu_only: bool = False  # a refusal that holds on a CPU-only machine (fp16 is fine on a GPU)

    def content(self, model: Path, data: Path) -> bytes:
        cfg = self.config(model, data) if callable(self.config) else self.config
        if isinstance(cfg, dict):
            return json.dumps(cfg).encode()
        return cfg if isinstance(cfg, bytes) else cfg.encode()


def tiny(**train) -> Callable[[Path, Path], dict]:
    """A valid config on the tiny model and the case's dataset, with `train` fields changed."""
    return lambda m, d: {"model": str(m), "dataset": str(d), "train": {"max_steps": 1, "threads": 1, **train}}


def on_model(model: Any, **top) -> Callable[[Path, Path], dict]:
    return lambda m, d: {"model": model(m) if callable(model) else model, "dataset": "builtin:persona", **top}


CONFIGS = [
    Case("missing config file", "submit", None, ("config file", "nope.json", "does not exist")),
    Case("config is a folder", "submit", None, ("is a folder",)),
    Case("not UTF-8", "submit", "name: caf\xe9\n".encode("latin-1"), ("not UTF-8", "offset 9"), suffix=".yaml"),
    Case("invalid JSON", "submit", '{"lora": {"r": 8,}}', ("not valid JSON", "line 1")),
    Case("invalid YAML", "submit", "lora: [r: 8\n", ("not valid YAML",), suffix=".yaml"),
    Case("top level is a list", "submit", "[1, 2]", ("top level must be a mapping",)),
    Case("100k-deep JSON", "submit", "[" * 100_000 + "]" * 100_000, ("nested more than",)),
    Case("20k-deep YAML", "submit", "a: " + "[" * 20_000 + "]" * 20_000, ("nested more than",), suffix=".yaml"),
    Case("YAML alias bomb", "submit", lol_bomb(), ("aliases expand to more than",), suffix=".yaml"),
    Case("a 2 MB config", "submit", "name: " + "x" * (2 << 20), ("is not a run config",), suffix=".yaml"),
    Case(
        "YAML python tag", "submit", "name: !!python/object/apply:os.system [id]\n", ("not valid YAML",), suffix=".yaml"
    ),
    Case("unknown field", "submit", {"lora": {"rank": 8}}, ("lora.rank: unknown field", "known: r, alpha")),
    Case("rank is text", "submit", {"lora": {"r": "eight"}}, ("lora.r = 'eight': must be an integer",)),
    Case("rank 0", "submit", {"lora": {"r": 0}}, ("lora.r = 0", "1–1024")),
    Case("rank 5000", "submit", {"lora": {"r": 5000}}, ("lora.r = 5000",)),
    Case("alpha negative", "submit", {"lora": {"alpha": -1}}, ("lora.alpha = -1",)),
    Case("dropout 1.5", "submit", {"lora": {"dropout": 1.5}}, ("lora.dropout = 1.5",)),
    Case("lr negative", "submit", {"train": {"lr": -0.1}}, ("train.lr = -0.1",)),
    Case("lr NaN", "submit", '{"train": {"lr": NaN}}', ("train.lr = nan",)),
    Case("batch size 0", "submit", {"train": {"batch_size": 0}}, ("train.batch_size = 0",)),
    Case("100000 threads", "submit", {"train": {"threads": 100_000}}, ("train.threads = 100000", "cores")),
    Case("seed negative", "submit", {"train": {"seed": -5}}, ("train.seed = -5",)),
    Case("a huge seed", "submit", {"train": {"seed": 2**70}}, ("train.seed",)),
    Case("an overflowing rank", "submit", {"lora": {"r": "1e400"}}, ("lora.r = '1e400'", "whole number")),
    Case("max_seq_len 4", "submit", {"train": {"max_seq_len": 4}}, ("train.max_seq_len = 4",)),
    Case("val_split 0.9", "submit", {"train": {"val_split": 0.9}}, ("train.val_split = 0.9",)),
    Case("no epochs, no steps", "submit", {"train": {"epochs": 0}}, ("train.epochs = 0.0",)),
    Case("quant bogus", "submit", {"quant": "2bit"}, ("quant = '2bit'", "none, 8bit, 4bit")),
    Case("fp16 with quant", "submit", {"quant": "4bit", "dtype": "fp16"}, ("dtype = 'fp16' with quant",)),
    Case("layers backwards", "submit", {"lora": {"layers": "5-1"}}, ("runs backwards",)),
    Case("layers to a billion", "submit", {"lora": {"layers": "0-1000000000"}}, ("layer indices are 0–100000",)),
    Case("no targets", "submit", {"lora": {"targets": []}}, ("lora.targets = []",)),
    Case("preset mixed with names", "submit", {"lora": {"targets": ["qv", "q_proj"]}}, ("mix of presets",)),
    Case("LoRA+ ratio 0.5", "submit", {"lora": {"loraplus_lr_ratio": 0.5}}, ("lora.loraplus_lr_ratio = 0.5",)),
    Case("PiSSA on 4-bit", "submit", {"quant": "4bit", "lora": {"init": "pissa"}}, ("lora.init = 'pissa'",)),
    Case("lora is a long string", "submit", {"lora": "x" * 100_000}, ("lora = 'xxx", "must be a mapping")),
    Case("unknown built-in data", "submit", {"dataset": "builtin:nope"}, ("dataset = 'builtin:nope'",)),
    Case("unknown embedded model", "submit", {"model": "embedded:Nope"}, ("model = 'embedded:Nope'",)),
]

MODELS = [
    Case("model is a file", "estimate", on_model("/etc/hostname"), ("model '/etc/hostname' is not a folder",)),
    Case("model folder without config.json", "train", on_model(lambda m: str(m.parent)), ("has no config.json",), 1),
    Case("model path traversal", "estimate", on_model("../../../../etc"), ("../../../../etc", "has no config.json")),
    Case("hub id not cached, offline", "estimate", on_model("nobody/no-such-model"), ("nobody/no-such-model",)),
    Case("fp16 on CPU, estimate", "estimate", on_model(str, dtype="fp16"), ("dtype = 'fp16' on CPU",), cpu_only=True),
    Case("fp16 on CPU, train", "train", on_model(str, dtype="fp16"), ("dtype = 'fp16' on CPU",), 1, cpu_only=True),
    Case("model is a file, train", "train", on_model("/etc/hostname"), ("is not a folder",), 1),
]

DATASETS = [
    Case(
        "missing dataset file",
        "train",
        lambda m, d: {**tiny()(m, d), "dataset": str(d.parent / "gone.jsonl")},
        ("gone.jsonl", "does not exist"),
        1,
    ),
    Case("empty dataset", "train", tiny(), ("empty.jsonl",), 1, data=("empty.jsonl", b"")),
    Case(
        "malformed JSON line",
        "train",
        tiny(),
        ("broken.jsonl", "line 2"),
        1,
        data=("broken.jsonl", f"{GOOD_ROW}\n{{oops\n{GOOD_ROW}\n".encode()),
    ),
    Case("wrong extension", "train", tiny(), ("data.parquet", ".parquet"), 1, data=("data.parquet", b"PAR1")),
    Case("wrong keys", "train", tiny(), ("keys.jsonl",), 1, data=("keys.jsonl", b'{"question": "a", "reply": "b"}\n')),
    Case("JSON that is not a list", "train", tiny(), ("one.json",), 1, data=("one.json", b'"just a string"')),
]

CASES = CONFIGS + MODELS + DATASETS


def prepare(case: Case, root: Path, model: Path) -> tuple[list[str], Path]:
    """The case's data home (with one earlier run that must survive), files and command line."""
    from engine.core.config import RunConfig
    from storage import RunStatus, Store

    home = root / "home"
    with Store.for_home(home) as store:
        earlier = store.create_run("earlier", RunConfig().to_dict(), "")
        store.mark_running(earlier, os.getpid())
        store.finish(earlier, RunStatus.SUCCEEDED)
    data = root / (case.data[0] if case.data else "chat.jsonl")
    data.write_bytes(case.data[1] if case.data else (GOOD_ROW + "\n").encode() * 8)
    cfg = root / f"run{case.suffix}"
    if case.name == "missing config file":
        cfg = root / "nope.json"
    elif case.name == "config is a folder":
        cfg = root / "folder.json"
        cfg.mkdir()
    else:
        cfg.write_bytes(case.content(model, data))
    return [sys.executable, "-m", "engine", "--home", str(home), case.command, str(cfg)], home


def run_case(case: Case, root: Path, model: Path) -> dict[str, Any]:
    argv, home = prepare(case, root, model)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORALAB_TRAIN_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    p = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    return {"code": p.returncode, "stdout": p.stdout, "stderr": p.stderr, "home": home}


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_llama_dir) -> dict[str, dict[str, Any]]:
    roots = {c.name: tmp_path_factory.mktemp("bad") for c in CASES}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {c.name: pool.submit(run_case, c, roots[c.name], tiny_llama_dir) for c in CASES}
        return {name: f.result() for name, f in futures.items()}


def test_the_table_is_big_enough_and_names_are_unique():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_clear_line(case: Case, results):
    if case.cpu_only:
        import torch

        if torch.cuda.is_available():
            pytest.skip("fp16 is refused on a CPU only; this machine has a GPU")
    r = results[case.name]
    errors = [line for line in r["stderr"].splitlines() if line.startswith("error:")]
    assert r["code"] == case.code, r["stderr"][-2000:]
    assert len(errors) == 1, r["stderr"][-2000:]
    for text in case.expect:
        assert text in errors[0], (text, errors[0])
    assert len(errors[0]) < 700, errors[0]  # a message, not a dump of the value
    assert "Traceback" not in r["stderr"], r["stderr"][-3000:]
    db = r["home"] / "loralab.db"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        left = conn.execute("SELECT id, status FROM runs WHERE status IN ('running', 'queued')").fetchall()
        earlier = conn.execute("SELECT status FROM runs WHERE name = 'earlier'").fetchone()
        failed = conn.execute("SELECT error FROM runs WHERE status = 'failed'").fetchall()
    assert left == [] and earlier == ("succeeded",)
    if case.command == "train" and case.code == 1:  # the run was recorded, and ended failed with that line
        assert [e for (e,) in failed] == [errors[0].removeprefix("error: ")]
