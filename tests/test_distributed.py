"""Data-parallel training on CPU: torchrun starts gloo processes around `python -m engine train`.

Two processes × batch b must train exactly like one process × batch b × two accumulation steps (the loss is
normalised by the target tokens of the whole step, across ranks), only rank 0 writes, a rank that dies fails the
run with its exit status, and the multi-node form (two torchrun agents on localhost) makes one run, one adapter.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from engine.core.launch import torchrun_argv
from storage import RunStatus, Store

ROOT = Path(__file__).resolve().parent.parent


def env_for(home: Path) -> dict[str, str]:
    return {**os.environ, "LORALAB_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def cfg_file(path: Path, model, data, **train) -> Path:
    t = {"max_steps": 3, "batch_size": 2, "lr": 1e-2, "val_split": 0, "save_every": 2, "log_every": 1, "threads": 1}
    lora = {"r": 4, "alpha": 8, "targets": "qv", "dropout": 0.0}  # no dropout: the ranks' RNGs differ
    cfg = {"name": path.stem, "model": str(model), "dataset": str(data), "lora": lora, "train": {**t, **train}}
    path.write_text(json.dumps(cfg))
    return path


def engine(home: Path, *args, timeout=300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "engine", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env_for(home), capture_output=True, text=True, timeout=timeout)


def series(store: Store, run_id: int, name: str) -> list[tuple[int, float]]:
    return store.metric_series(run_id, name)


def test_two_gloo_processes_train_like_one_with_twice_the_accumulation(tmp_path, tiny_llama_dir, chat_jsonl):
    home = tmp_path / "home"
    two = cfg_file(tmp_path / "two.json", tiny_llama_dir, chat_jsonl, devices=2)
    one = cfg_file(tmp_path / "one.json", tiny_llama_dir, chat_jsonl, devices=1, grad_accum=2)
    procs = [  # side by side: the machine has two cores, and each process trains on one thread
        subprocess.Popen(
            [sys.executable, "-m", "engine", "train", str(c)],
            cwd=ROOT,
            env=env_for(home),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c in (two, one)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-3000:] for _, e in outs]
    assert "2 processes under torchrun" in outs[0][1]
    store = Store.for_home(home)
    try:
        runs = {r.name: r for r in store.list_runs()}
        assert sorted(runs) == ["one", "two"]  # one row per run: rank 1 records nothing
        shown = json.loads(engine(home, "show", str(runs["two"].id), "--json").stdout)
        assert (shown["world_size"], shown["devices"], shown["status"]) == (2, "cpu", "succeeded")
        assert runs["one"].world_size == 1
        for name in ("train/loss", "grad_norm", "tokens_seen"):
            a, b = series(store, runs["two"].id, name), series(store, runs["one"].id, name)
            assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3], name  # one point per step: rank 0's
            assert [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-4), name
    finally:
        store.close()
    run = home / "runs" / str(runs["two"].id)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    state = json.loads((run / "checkpoints" / "step-0000003" / "trainer_state.json").read_text())
    assert (state["world"], state["micro_batches"]) == (2, 6)  # what a resume continues from


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def rank_process(pid: int, rank: int) -> psutil.Process | None:
    for p in descendants(pid):
        try:
            if p.environ().get("RANK") == str(rank) and "engine" in p.cmdline():
                return p
        except psutil.Error:
            continue
    return None


def test_killing_one_rank_fails_the_run_with_its_exit_status_and_stops_the_others(tmp_path, tiny_llama_dir, chat_jsonl):
    home = tmp_path / "home"
    cfg = cfg_file(tmp_path / "long.json", tiny_llama_dir, chat_jsonl, devices=2, max_steps=100_000, save_every=0)
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "train", str(cfg)],
        cwd=ROOT,
        env=env_for(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (home / "loralab.db").is_file():
                with Store.for_home(home) as store:
                    if store.list_runs() and len(series(store, 1, "train/loss")) >= 2:
                        break
            time.sleep(0.3)
        victim = rank_process(proc.pid, 1)
        assert victim is not None, proc.stderr.read() if proc.poll() is not None else "no rank 1 found"
        tree = descendants(proc.pid)
        victim.kill()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-3000:]
    with Store.for_home(home) as store:
        rec = store.get_run(1)
    assert rec.status is RunStatus.FAILED and rec.exit_code == -signal.SIGKILL, (rec.status, rec.exit_code, rec.error)
    assert "rank 1" in rec.error and "SIGKILL" in rec.error
    psutil.wait_procs(tree, timeout=30)
    assert [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []  # no rank trains on


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_localhost_make_one_run_and_one_adapter_that_peft_loads(tmp_path, tiny_llama_dir, chat_jsonl):
    home = tmp_path / "home"
    cfg = cfg_file(tmp_path / "nodes.json", tiny_llama_dir, chat_jsonl)
    master = f"127.0.0.1:{free_port()}"
    nodes = [
        subprocess.Popen(
            torchrun_argv(["train", str(cfg)], 1, nnodes=2, node_rank=rank, master=master),
            cwd=ROOT,
            env=env_for(home),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outs = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], [e[-2000:] for _, e in outs]
    with Store.for_home(home) as store:
        runs = store.list_runs()
        assert [(r.status, r.world_size, r.steps_done) for r in runs] == [(RunStatus.SUCCEEDED, 2, 3)]
    assert sorted(p.name for p in (home / "runs").iterdir()) == ["1"]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), home / "runs/1/adapter")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.abs().sum()) > 0 for p in lora_b)  # trained, not the zero init


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gpus_train_like_one_with_twice_the_accumulation(tmp_path, tiny_llama_dir, chat_jsonl, strategy):
    """Not run on the CPU machines this was written on: FSDP and NCCL need two GPUs."""
    if gpu_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    home = tmp_path / "home"
    common = {"dtype": "fp32"}
    two = cfg_file(tmp_path / "two.json", tiny_llama_dir, chat_jsonl, devices=2, strategy=strategy)
    one = cfg_file(tmp_path / "one.json", tiny_llama_dir, chat_jsonl, devices=1, grad_accum=2)
    for c in (two, one):
        cfg = json.loads(c.read_text())
        c.write_text(json.dumps({**cfg, **common}))
        done = engine(home, "train", c)
        assert done.returncode == 0, done.stderr[-3000:]
    with Store.for_home(home) as store:
        runs = {r.name: r for r in store.list_runs()}
        assert (runs["two"].world_size, runs["two"].devices) == (2, "cuda:0,1")
        a, b = series(store, runs["two"].id, "train/loss"), series(store, runs["one"].id, "train/loss")
    assert [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-3)  # GPU reductions are not bit-exact
    assert (home / "runs" / str(runs["two"].id) / "adapter" / "adapter_model.safetensors").is_file()
