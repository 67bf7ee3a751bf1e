"""The CLI contract: train prints the run id, records the run, and fails with the reason."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def cli(home, *args, timeout=300):
    env = {**os.environ, "LORALAB_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "engine", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def write_cfg(path, model, dataset, **train):
    t = {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "eval_every": 3, "save_every": 3, "val_split": 0.1}
    t.update(train)
    path.write_text(
        json.dumps(
            {
                "name": "cli-test",
                "model": str(model),
                "dataset": str(dataset),
                "lora": {"r": 4, "alpha": 8, "targets": "qv"},
                "train": t,
            }
        )
    )
    return path


def test_train_runs_show_generate(tmp_path, tiny_llama_dir, chat_jsonl):
    home = tmp_path / "home"
    cfg = write_cfg(tmp_path / "c.json", tiny_llama_dir, chat_jsonl)
    r = cli(home, "train", str(cfg))
    assert r.returncode == 0, r.stderr
    run_id = int(r.stdout.strip().splitlines()[-1])
    assert "run 1 succeeded: 6/6 steps" in r.stderr

    shown = json.loads(cli(home, "show", str(run_id), "--json").stdout)
    assert shown["status"] == "succeeded" and shown["steps_done"] == 6 and shown["final_loss"] > 0
    assert (
        shown["config"]["lora"]["targets"] == ["qv"]
        and Path(shown["adapter_dir"], "adapter_model.safetensors").is_file()
    )
    assert (home / "runs" / str(run_id) / "config.json").is_file()
    listed = json.loads(cli(home, "runs", "--json").stdout)
    assert [x["id"] for x in listed] == [run_id]
    assert "cli-test" in cli(home, "runs").stdout

    g = cli(home, "generate", "--run", str(run_id), "--prompt", "hello", "--max-new-tokens", "5")
    assert g.returncode == 0, g.stderr
    assert len(g.stdout.split()) >= 1


def test_bad_config_lists_every_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  r: 0\n  alpha: -2\ntrain:\n  lr: 5\nquant: 3bit\n")
    r = cli(tmp_path / "home", "train", str(bad))
    assert r.returncode == 2
    for needle in ("4 problems", "lora.r = 0", "lora.alpha = -2.0", "train.lr = 5.0", "quant = '3bit'"):
        assert needle in r.stderr, r.stderr


def test_failure_is_recorded_with_the_reason(tmp_path, tiny_llama_dir):
    home = tmp_path / "home"
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "hello", "output": "ahoy"}\n{"instruction": "hello"}\n')
    r = cli(home, "train", str(write_cfg(tmp_path / "c.json", tiny_llama_dir, data)))
    assert r.returncode == 1
    assert "d.jsonl line 2: alpaca row needs a non-empty 'output'" in r.stderr
    shown = json.loads(cli(home, "show", "1", "--json").stdout)
    assert shown["status"] == "failed" and "line 2" in shown["error"]


def test_inspect_json_lists_modules_with_shapes(tmp_path, tiny_gpt2_dir):
    r = cli(tmp_path / "home", "inspect", str(tiny_gpt2_dir), "--json")
    info = json.loads(r.stdout)
    assert info["architecture"] == "GPT2LMHeadModel" and info["num_layers"] == 2
    kinds = {k["target"]: (k["count"], k["in_features"], k["out_features"]) for k in info["kinds"]}
    # attn.c_proj and mlp.c_proj share a kind name but not a shape: inspect keeps them apart
    assert kinds == {
        "c_attn": (2, 32, 96),
        "attn.c_proj": (2, 32, 32),
        "c_fc": (2, 32, 128),
        "mlp.c_proj": (2, 128, 32),
    }
    assert {m["type"] for m in info["modules"]} == {"Conv1D"} and not any(
        "lm_head" in m["name"] for m in info["modules"]
    )


def test_offline_hub_id_gives_a_clear_error(tmp_path):
    r = cli(tmp_path / "home", "inspect", "someone/not-a-cached-model")
    assert r.returncode != 0
    assert "not a local folder and not in the Hugging Face cache" in r.stderr


@pytest.mark.slow
def test_quickstart_on_the_real_embedded_model(tmp_path):
    """A few real steps of SmolLM2 through the CLI: GGUF conversion, chat template, adapter."""
    home = tmp_path / "home"
    cfg = tmp_path / "q.yaml"
    cfg.write_text(
        (ROOT / "examples" / "quickstart.yaml")
        .read_text()
        .replace("epochs: 2", "max_steps: 3")
        .replace("batch_size: 8", "batch_size: 2")
    )
    r = cli(home, "train", str(cfg), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    run_id = r.stdout.strip().splitlines()[-1]
    assert (home / "models" / "SmolLM2-135M-Instruct" / "model.safetensors").is_file()
    shown = json.loads(cli(home, "show", run_id, "--json").stdout)
    assert shown["status"] == "succeeded" and shown["steps_done"] == 3 and shown["final_loss"] < 6
    g = cli(home, "generate", "--run", run_id, "--prompt", "What is the capital of France?", "--max-new-tokens", "12")
    assert g.returncode == 0 and len(g.stdout.strip()) > 0, g.stderr


def test_hub_id_loads_from_the_local_hf_cache_offline(tmp_path, tiny_llama_dir, chat_jsonl):
    """A hub id goes through the real hub client: here it is served from an HF cache laid out as the
    hub client writes it (models--org--name/snapshots/<rev>/), with HF_HUB_OFFLINE=1."""
    import shutil

    cache = tmp_path / "hf-cache"
    repo = cache / "models--loralab-test--tiny-llama"
    snap = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_llama_dir, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    env_home = tmp_path / "home"
    cfg = write_cfg(tmp_path / "c.json", "loralab-test/tiny-llama", chat_jsonl, max_steps=2)
    env = {**os.environ, "LORALAB_HOME": str(env_home), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    r = subprocess.run(
        [sys.executable, "-m", "engine", "train", str(cfg)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    adapter_cfg = json.loads((env_home / "runs" / "1" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "loralab-test/tiny-llama"
