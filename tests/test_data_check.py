"""`engine check` and `engine submit`: a run that cannot start is refused before anything is queued, with every
problem at once; one that can gets the data's counts and its data-based memory estimate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from engine.core.config import RunConfig
from engine.ml.check import check_run
from storage import Store

ROOT = Path(__file__).resolve().parent.parent


def test_check_passes_a_runnable_config_with_counts_and_estimate(tmp_path, tiny_llama_dir, chat_jsonl):
    cfg = RunConfig.from_dict({"model": str(tiny_llama_dir), "dataset": str(chat_jsonl), "train": {"batch_size": 4}})
    report = check_run(cfg, tmp_path / "home")
    assert report["ok"] and report["problems"] == []
    assert report["data"]["rows"] == 24 and report["data"]["train"] + report["data"]["val"] == 24
    assert len(report["facts"]["lengths"]) == report["data"]["train"]
    est = report["estimate"]
    assert est["basis"] == "dataset" and est["device"] == "cpu" and est["total_gb"] > 0
    in_out = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)]  # q k v o gate up down
    assert est["trainable_params"] == 2 * sum(8 * (i + o) for i, o in in_out)  # r 8, all-linear, 2 layers


def test_check_lists_every_problem_at_once(tmp_path, tiny_llama_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{x\n')
    cfg = RunConfig.from_dict({"model": str(tiny_llama_dir), "dataset": str(bad), "lora": {"targets": ["c_attn"]}})
    problems = check_run(cfg, tmp_path / "home")["problems"]
    assert any("bad.jsonl line 2: not valid JSON" in p for p in problems)
    assert any("'c_attn' matches no module" in p for p in problems)
    folder = tmp_path / "no-config"
    folder.mkdir()
    cfg = RunConfig.from_dict({"model": str(folder), "dataset": str(bad)})
    problems = check_run(cfg, tmp_path / "home")["problems"]  # no tokenizer: the rows are still read
    assert problems[0].startswith("model: model folder") and "has no config.json" in problems[0]
    assert "dataset: bad.jsonl line 2: not valid JSON" in problems[1] and len(problems) == 2


def test_submit_refuses_what_cannot_run_and_queues_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("")
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"model": "nobody/no-such-model", "dataset": str(bad)}))
    home = tmp_path / "home"
    p = subprocess.run(
        [sys.executable, "-m", "engine", "--home", str(home), "submit", str(cfg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "error: not queued: 2 problems:" in p.stderr
    assert "cannot load model 'nobody/no-such-model'" in p.stderr and "bad.jsonl: the file is empty" in p.stderr
    assert Store.for_home(home).list_runs() == []
