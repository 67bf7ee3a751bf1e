"""Chat on one base model: three adapters in one worker hold the base weights once, every pane equals that
adapter (or the base) alone with the same seed, the subprocess worker streams, restarts after a crash,
and refuses an adapter trained on another base."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.tiny import build_tiny_llama

PROMPT = [{"role": "user", "content": "what is the capital of france ?"}]
ADAPTERS = {"a": (1, 1e-2), "b": (2, 3e-2), "c": (3, 5e-3)}  # name: (seed, lr), so the three differ


def finished_run(
    store,
    home: Path,
    model: Path,
    dataset: Path,
    *,
    name: str = "tiny",
    seed: int = 1,
    lr: float = 1e-2,
    steps: int = 5,
) -> int:
    """Train a tiny adapter in-process and record it as a succeeded run (what the job queue would leave)."""
    from engine.core.config import RunConfig
    from engine.core.home import run_dir
    from engine.ml.train import train
    from storage import RunStatus, StoreSink

    cfg = RunConfig.from_dict(
        {
            "model": str(model),
            "dataset": str(dataset),
            "name": name,
            "train": {
                "max_steps": steps,
                "lr": lr,
                "seed": seed,
                "val_split": 0.2,
                "eval_every": steps,
                "batch_size": 4,
                "threads": 1,
            },
        }
    )
    run_id = store.create_run(name, cfg.to_dict(), "", model=cfg.model)
    out = run_dir(home, run_id)
    store.set_out_dir(run_id, str(out))
    store.mark_running(run_id, os.getpid())
    train(cfg, out, StoreSink(store, run_id), home=home)
    store.finish(run_id, RunStatus.SUCCEEDED, exit_code=0)
    return run_id


def train_adapter(out: Path, model: Path, dataset: Path, seed: int, lr: float, home: Path) -> str:
    from engine.core.config import RunConfig
    from engine.core.events import NullSink
    from engine.ml.train import train

    cfg = RunConfig.from_dict(
        {
            "model": str(model),
            "dataset": str(dataset),
            "train": {"max_steps": 5, "lr": lr, "seed": seed, "val_split": 0, "threads": 1},
        }
    )
    return train(cfg, out, NullSink(), home=home).adapter_dir


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama_dir, chat_jsonl):
    """Three adapters trained on the tiny Llama with different seeds and learning rates."""
    root = tmp_path_factory.mktemp("adapters")
    home = root / "home"
    home.mkdir()
    return home, {
        name: train_adapter(root / name, tiny_llama_dir, chat_jsonl, seed, lr, home)
        for name, (seed, lr) in ADAPTERS.items()
    }


def test_three_adapters_hold_the_base_weights_once(adapters, tiny_llama_dir):
    from engine.ml.generate import ChatModel, param_report

    home, dirs = adapters
    plain = ChatModel.load(str(tiny_llama_dir), home=home)
    many = ChatModel.load(str(tiny_llama_dir), dirs, home=home)
    one, three = param_report(plain.model), param_report(many.model)
    base_params = [p for n, p in many.model.named_parameters() if ".lora_" not in n]
    # the same tensors, counted by storage: one copy of every base weight, however many adapters
    assert len({p.data_ptr() for p in base_params}) == one["base_tensors"] == len(list(plain.model.parameters()))
    assert (
        three["base_bytes"] == one["base_bytes"] == sum(p.numel() * p.element_size() for p in plain.model.parameters())
    )
    # each adapter adds only its A and B: 3 × (2 layers × 7 modules × 2 factors) tensors
    assert three["lora_tensors"] == 3 * 2 * 7 * 2
    from safetensors.torch import load_file

    saved = sum(
        t.numel() * t.element_size()
        for d in dirs.values()
        for t in load_file(str(Path(d) / "adapter_model.safetensors")).values()
    )
    assert three["lora_bytes"] == saved
    # every adapted layer wraps the one base Linear, with the three adapters beside it
    from peft.tuners.lora import LoraLayer

    layers = [m for m in many.model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 14 and all(set(m.lora_A) == set(dirs) for m in layers)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_each_pane_equals_its_adapter_alone(adapters, tiny_llama_dir, temperature):
    from engine.ml.generate import ChatModel, GenParams

    home, dirs = adapters
    params = GenParams(max_new_tokens=12, temperature=temperature, seed=11, repetition_penalty=1.0)
    many = ChatModel.load(str(tiny_llama_dir), dirs, home=home)
    got: dict[str, list[str]] = {}
    order: list[str] = []
    stats: dict[str, dict] = {}

    def on_delta(pane, text):
        got.setdefault(pane, []).append(text)
        order.append(pane)

    panes = [("base", PROMPT, None), *((n, PROMPT, n) for n in dirs)]
    many.generate_many(panes, params, on_delta, lambda pane, s: stats.__setitem__(pane, s))
    replies = {k: "".join(v) for k, v in got.items()}

    alone = {"base": ChatModel.load(str(tiny_llama_dir), home=home).reply(PROMPT, None, params)}
    for n, d in dirs.items():
        alone[n] = ChatModel.load(str(tiny_llama_dir), {n: d}, home=home).reply(PROMPT, n, params)
    assert replies == alone
    assert len(set(alone.values())) == 4, alone  # the adapters really differ from each other and from the base
    assert all(s["error"] is None and s["tokens"] > 0 for s in stats.values()), stats
    # round-robin: the panes' pieces interleave rather than arriving pane after pane
    first_done = min(max(i for i, p in enumerate(order) if p == k) for k in replies)
    assert len(set(order[: first_done + 1])) == 4, order

    # and the same reply through the plain HF path (generate with the global seed), independent of ChatModel
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), dirs["b"]).eval()
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    torch.manual_seed(11)
    kw = dict(do_sample=True, temperature=temperature, top_p=0.95) if temperature else dict(do_sample=False)
    out = ref.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=12,
        repetition_penalty=1.0,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        **kw,
    )
    assert tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip() == replies["b"].strip()


def test_worker_process_streams_restarts_and_refuses_another_base(adapters, tiny_llama_dir, tmp_path):
    from engine.core.chat import ChatError, ChatWorker, GenParams, WorkerDied
    from engine.ml.generate import ChatModel

    home, dirs = adapters
    params = GenParams(max_new_tokens=10, temperature=0.8, seed=3)
    worker = ChatWorker(home)
    try:
        info = worker.start(str(tiny_llama_dir))
        assert worker.running and info["base"] == str(tiny_llama_dir) and info["adapters"] == {}
        for name in ("a", "b", "c"):
            info = worker.ensure_adapter(name, dirs[name])
        plain = ChatModel.load(str(tiny_llama_dir), home=home)
        from engine.ml.generate import param_report

        # the worker's own report: three adapters, one copy of the base weights
        assert set(info["adapters"]) == {"a", "b", "c"}
        assert info["base_bytes"] == param_report(plain.model)["base_bytes"]
        assert info["base_tensors"] == param_report(plain.model)["base_tensors"]

        text: dict[str, str] = {}
        pieces = 0
        stats = {}
        for pane, delta in worker.stream_many(
            [("left", PROMPT, None), ("right", PROMPT, "b")], params, on_done=lambda p, s: stats.__setitem__(p, s)
        ):
            text[pane] = text.get(pane, "") + delta
            pieces += 1
        assert pieces > 2 and set(stats) == {"left", "right"} and stats["right"].tokens > 0
        assert stats["right"].tokens_per_s > 0 and stats["right"].first_token_s is not None
        assert text["left"] == plain.reply(PROMPT, None, params)
        assert text["right"] == ChatModel.load(str(tiny_llama_dir), {"b": dirs["b"]}, home=home).reply(
            PROMPT, "b", params
        )

        # a pane with an adapter that is not loaded fails alone; the other pane still answers
        stats.clear()
        got = list(
            worker.stream_many(
                [(1, PROMPT, "nope"), (2, PROMPT, "a")], params, on_done=lambda p, s: stats.__setitem__(p, s)
            )
        )
        assert "adapter 'nope' is not loaded" in stats[1].error and stats[2].error is None and got

        # an adapter trained on another base model is refused, naming both bases
        other = build_tiny_llama(tmp_path / "other-base", seed=5)
        foreign = tmp_path / "foreign"
        shutil.copytree(dirs["a"], foreign)
        meta = json.loads((foreign / "loralab.json").read_text())
        meta["run_config"]["model"] = str(other)
        (foreign / "loralab.json").write_text(json.dumps(meta))
        with pytest.raises(ChatError) as e:
            worker.ensure_adapter("foreign", foreign)
        assert str(other) in str(e.value) and str(tiny_llama_dir) in str(e.value) and "trained on" in str(e.value)
        assert "foreign" not in worker.report()["adapters"]

        # crash: the next call says so clearly, the one after restarts with the same base and adapters
        pid = worker._p.popen.pid
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)
        with pytest.raises(
            WorkerDied, match=r"the chat worker stopped \(exit code -9.*it will restart on the next message"
        ):
            worker.reply(PROMPT, "b", params)
        assert not worker.running
        again = worker.reply(PROMPT, "b", params)
        assert again == text["right"] and worker._p.popen.pid != pid
        assert set(worker.report()["adapters"]) == {"a", "b", "c"}

        # stop: a long generation ends early, through stop() or through this request's own cancel flag
        import threading

        long = GenParams(max_new_tokens=200, temperature=0.0, repetition_penalty=1.0)  # the base loops, no EOS
        for how in ("stop", "cancel"):
            stats.clear()
            cancel = threading.Event()
            it = worker.stream_many(
                [(0, PROMPT, None), (1, PROMPT, "c")], long, cancel=cancel, on_done=lambda p, s: stats.__setitem__(p, s)
            )
            next(it)
            worker.stop() if how == "stop" else cancel.set()
            list(it)  # the rest of the stream ends promptly
            assert stats[0].stopped and stats[0].tokens < 100, (how, stats)
            assert stats[1].stopped or stats[1].error is None, (how, stats)  # stopped, unless it had ended by itself
    finally:
        pid = worker._p.popen.pid if worker._p else None
        worker.close()
    assert not worker.running and worker.report() == {}
    if pid:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # Unload really ended the process (its memory is the OS's again)


def test_chat_client_never_imports_torch():
    import subprocess

    code = "import sys, engine.core.chat, engine.core.export; print(sorted(m for m in ('torch','transformers','peft') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_cli_chat_compare(adapters, tiny_llama_dir, monkeypatch, capsys):
    import io

    from engine.cli import main
    from engine.core.chat import GenParams
    from engine.ml.generate import ChatModel

    home, dirs = adapters
    monkeypatch.setattr(sys, "stdin", io.StringIO("what is the capital of france ?\n/quit\n"))
    rc = main(
        [
            "--home",
            str(home),
            "chat",
            "--base",
            str(tiny_llama_dir),
            "--adapter",
            dirs["a"],
            "--adapter",
            dirs["b"],
            "--compare",
            "--max-new-tokens",
            "8",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    params = GenParams(max_new_tokens=8)
    base = ChatModel.load(str(tiny_llama_dir), home=home).reply(PROMPT, None, params)
    b = ChatModel.load(str(tiny_llama_dir), {"b": dirs["b"]}, home=home).reply(PROMPT, "b", params)
    assert f"[base] {base}" in out and f"[b] {b}" in out and "[a] " in out


def test_chat_tab_resolves_panes_bases_and_says_what_training_means(tmp_path, adapters, tiny_llama_dir):
    from engine.core.config import EMBEDDED_MODEL
    from storage import Store
    from ui.chat_tab import AUTO, pane_choices, pick_base, resolve_pane, status_text, training_note

    home, dirs = adapters
    store = Store.for_home(tmp_path / "h")
    run_id = store.create_run("pirate", {"model": str(tiny_llama_dir), "dataset": "x"}, str(tmp_path), status="running")
    store.update_run(run_id, adapter_dir=dirs["a"], final_loss=0.8123)
    store.finish(run_id, "succeeded")
    assert pane_choices(store) == [("base model (no adapter)", "base"), ("run 1 · pirate · loss 0.81", "run:1")]

    panes = [
        resolve_pane("base", store),
        resolve_pane("run:1", store),
        resolve_pane(dirs["b"], store),
        resolve_pane(str(tmp_path), store),
        resolve_pane("run:99", store),
    ]
    assert panes[0].name is None and panes[0].error is None
    assert (panes[1].name, panes[1].folder, panes[1].base) == ("run1", dirs["a"], str(tiny_llama_dir))
    assert panes[2].name.startswith("folder-") and panes[2].base == str(tiny_llama_dir)
    assert "not an adapter folder" in panes[3].error and "no such run" in panes[4].error
    assert pick_base(AUTO, panes) == str(tiny_llama_dir)  # the first adapter's base
    assert pick_base(AUTO, panes[:1]) == EMBEDDED_MODEL and pick_base("other/model", panes) == "other/model"

    assert training_note(store, {}) == ""
    busy = store.create_run("job", {"model": "m"}, str(tmp_path), status="running")
    assert "will load on the CPU" in training_note(store, {})
    assert "using the GPU: the chat runs on the CPU" in training_note(store, {"device": "cpu", "cuda_available": True})
    assert "share the cores" in training_note(store, {"device": "cpu", "cuda_available": False})
    assert f"#{busy}" in training_note(store, {"device": "cuda:0", "cuda_allocated_gb": 1.5})
    text = status_text(
        {
            "base": "m",
            "device": "cpu",
            "dtype": "float32",
            "adapters": {"run1": "x"},
            "base_bytes": 3 * 2**20,
            "lora_bytes": 2048,
            "rss_gb": 0.4,
            "peak_rss_gb": 0.5,
        }
    )
    assert "adapters: run1" in text and "3.0 MB" in text and "2.0 KB" in text
    store.close()
