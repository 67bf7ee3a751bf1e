"""Speed rules: what `dtype: auto` picks (and why), bf16 training against fp32, and the thread choice."""

import json

import pytest
import torch

from engine.core import anatomy as A
from engine.core.config import RunConfig
from engine.core.events import ListSink
from engine.ml import resources as RS


@pytest.fixture
def fresh_choices(monkeypatch):
    monkeypatch.setattr(RS, "_CHOICES", {})


def test_auto_dtype_is_fp32_on_a_cpu_without_native_bf16(fresh_choices, monkeypatch, tmp_path):
    monkeypatch.setattr(RS, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(RS, "matmul_gflops", lambda *a, **k: pytest.fail("no probe without the flags"))
    fast, why = RS.bf16_choice(torch.device("cpu"), tmp_path)
    assert not fast and why.startswith("fp32") and "AVX512-BF16" in why
    assert A.resolve_dtype("auto", "cpu", fast) == "fp32"


def test_auto_dtype_needs_the_flags_and_a_probe_that_shows_bf16_faster(fresh_choices, monkeypatch, tmp_path):
    monkeypatch.setattr(RS, "cpu_flags", lambda: {"avx512f", "amx_bf16", "amx_tile"})
    speeds = {torch.float32: 60.0, torch.bfloat16: 240.0}
    monkeypatch.setattr(RS, "matmul_gflops", lambda dtype, *a, **k: speeds[dtype])
    fast, why = RS.bf16_choice(torch.device("cpu"), tmp_path)
    assert fast and why.startswith("bf16") and "amx_bf16" in why and "240" in why
    cached = json.loads((tmp_path / "cache" / "bf16_probe.json").read_text())
    assert cached["bf16_gflops"] == 240.0 and cached["fp32_gflops"] == 60.0
    assert A.resolve_dtype("auto", "cpu", fast) == "bf16"
    assert A.resolve_dtype("auto", "cpu", fast, quant="4bit") == "fp32"  # quantized bases keep their rule
    assert A.resolve_dtype("fp32", "cpu", fast) == "fp32"  # fp32 stays selectable

    # a new process reads the cached probe instead of measuring again
    monkeypatch.setattr(RS, "_CHOICES", {})
    monkeypatch.setattr(RS, "matmul_gflops", lambda *a, **k: pytest.fail("the probe is cached"))
    assert RS.bf16_choice(torch.device("cpu"), tmp_path)[0]

    # flags alone do not prove it: a probe where bf16 is slower keeps fp32
    monkeypatch.setattr(RS, "_CHOICES", {})
    (tmp_path / "cache" / "bf16_probe.json").write_text(json.dumps({**cached, "bf16_gflops": 55.0}))
    fast, why = RS.bf16_choice(torch.device("cpu"), tmp_path)
    assert not fast and why.startswith("fp32") and "55" in why


def test_bf16_training_on_cpu_follows_the_fp32_loss_curve(tiny_llama_dir, chat_jsonl, tmp_path):
    """Same data, seed and init; bf16 = bf16 base weights under autocast, LoRA weights and AdamW in fp32.

    Tolerance 2 % per logged step (the bench's own rule for comparing losses): bf16 keeps 8 mantissa bits
    (relative rounding 2⁻⁹ ≈ 0.2 % per value) and this 2-layer model's loss goes through ~10 rounded matmuls
    per token, errors that mostly average out over the tokens; the LoRA update itself is fp32, so the curves
    do not drift apart over a few steps (measured: ≤ 0.1 %, so 2 % leaves room for other CPUs' kernels while
    still catching a wrong dtype path, e.g. bf16 LoRA weights or optimizer states). Few steps: bf16 matmuls
    are ~50× slower than fp32 on CPUs without AVX512-BF16/AMX.
    """
    from engine.ml.train import train

    curves, summaries = {}, {}
    for dtype in ("fp32", "bf16"):
        cfg = RunConfig.from_dict(
            {
                "model": str(tiny_llama_dir),
                "dataset": str(chat_jsonl),
                "dtype": dtype,
                "lora": {"r": 4, "dropout": 0.0},
                "train": {"lr": 1e-2, "max_steps": 6, "batch_size": 4, "warmup_steps": 0, "val_split": 0, "seed": 3},
            }
        )
        sink = ListSink()
        train(cfg, tmp_path / dtype, sink, home=tmp_path / "home")
        curves[dtype] = [v for _, v in sink.series("train/loss")]
        summaries[dtype] = sink.summary["summary"]
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert len(fp32) == len(bf16) == 6
    assert fp32[-1] < fp32[0] and bf16[-1] < bf16[0]  # both learn
    for x, y in zip(fp32, bf16):
        assert y == pytest.approx(x, rel=0.02)
    assert bf16 != fp32  # really a different dtype
    assert summaries["bf16"]["threads"][0]["threads"] >= 1  # the thread choice is in the summary


def test_threads_follow_what_runs_now(monkeypatch):
    monkeypatch.delenv("LORALAB_TRAIN_THREADS", raising=False)
    monkeypatch.setattr(RS.os, "cpu_count", lambda: 2)
    assert RS.choose_threads(0, others=0.1, ours=0).threads == 2  # idle: every core
    assert RS.choose_threads(0, others=0.9, ours=0).threads == 1  # the other core is busy
    assert RS.choose_threads(0, others=0.0, ours=1).threads == 1  # another run of ours is starting
    assert RS.choose_threads(0, others=3.0, ours=2).threads == 1  # never fewer than one
    assert RS.choose_threads(1, others=0.0, ours=0).threads == 1  # asked for
    assert RS.choose_threads(8, others=0.0, ours=0).threads == 2  # never more than the cores
    monkeypatch.setenv("LORALAB_TRAIN_THREADS", "1")
    assert RS.choose_threads(0, others=0.0, ours=0) == RS.ThreadChoice(1, "LORALAB_TRAIN_THREADS=1")


def test_thread_watch_rechecks_during_the_run_and_logs_it(monkeypatch):
    from engine.ml.hooks import TrainState

    monkeypatch.delenv("LORALAB_TRAIN_THREADS", raising=False)
    monkeypatch.setattr(RS.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(RS, "_our_training_processes", lambda: 0)
    samples = iter([0.0, 0.0, 1.0, 1.0, 0.0])  # busy cores of other processes, one per sample
    monkeypatch.setattr(RS, "_cpu_snapshot", lambda: None)
    monkeypatch.setattr(RS, "_busy_since", lambda start: (next(samples), None))
    monkeypatch.setattr(RS, "SAMPLE_S", 0.0)
    monkeypatch.setattr(RS, "RECHECK_S", 0.0)
    before = torch.get_num_threads()
    try:
        watch = RS.ThreadWatch(0)  # first sample: idle → 2 threads
        assert watch.choice.threads == 2 and torch.get_num_threads() == 2
        sink = ListSink()
        state = TrainState(RunConfig(), None, None, None, None, None, None, sink, None, 10)
        watch.on_start(state)
        for step in (1, 2, 3, 4):  # samples: 0 (same), 1 (busy → 1 thread), 1 (same), 0 (idle → 2)
            state.step = step
            watch.after_step(state)
        watch.on_end(state)
    finally:
        torch.set_num_threads(before)
    assert sink.series("threads") == [(0, 2), (2, 1), (4, 2)]
    assert [(h["step"], h["threads"]) for h in state.summary["threads"]] == [(0, 2), (2, 1), (4, 2)]
    assert "other processes use 1.0" in state.summary["threads"][1]["why"]
