"""train.devices / train.strategy: parsing, placement on a stand-in GPU list, memory per device, what the Train tab
offers and shows, the torchrun command (no torch: engine.core and ui only)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from engine.core.config import ConfigError, RunConfig
from engine.core.devices import (
    DeviceRequest,
    Gpu,
    Placement,
    Unplaceable,
    device_choices,
    parse_devices,
    place,
    scale_note,
)
from engine.core.estimate import estimate
from engine.core.launch import torchrun_argv
from engine.core.procs import explain_end
from storage import RunStatus
from ui.live_view import queue_markdown, status_markdown

GPUS = [Gpu(0, "A", 24.0, 24.0), Gpu(1, "A", 24.0, 24.0)]


@pytest.mark.parametrize(
    ("value", "req"),
    [
        ("auto", DeviceRequest("auto")),
        (2, DeviceRequest("count", count=2)),
        ("0,1", DeviceRequest("ids", ids=(0, 1))),
        ([1], DeviceRequest("ids", ids=(1,))),
        ("cuda:1", DeviceRequest("ids", ids=(1,))),
    ],
)
def test_devices_field_accepts_auto_a_count_and_gpu_ids(value, req):
    cfg = RunConfig.from_dict({"train": {"devices": value}})
    assert parse_devices(cfg.train.devices) == req


def test_bad_devices_and_strategy_are_refused_with_the_fix():
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({"train": {"devices": "0,0", "strategy": "zero3"}})
    assert any("train.devices = '0,0': a GPU id appears twice" in p for p in e.value.problems)
    assert any("train.strategy = 'zero3': must be one of ddp, fsdp" in p for p in e.value.problems)


def test_placement_on_two_gpus():
    one = DeviceRequest("count", count=1)
    assert place(one, "ddp", GPUS) == Placement((0,), 1)
    assert place(one, "ddp", GPUS, busy={0}) == Placement((1,), 1)
    assert place(one, "ddp", GPUS, busy={0, 1}) is None  # waits
    assert place(DeviceRequest("auto"), "ddp", GPUS, busy={1}) == Placement((0,), 1)
    assert place(DeviceRequest("ids", ids=(0, 1)), "ddp", GPUS, busy={1}) is None
    assert place(DeviceRequest("count", count=2), "ddp", []) == Placement((), 2)  # CPU processes
    assert Placement((1,), 1).env(visible="4,5") == {"CUDA_VISIBLE_DEVICES": "5"}  # through the visible list
    with pytest.raises(Unplaceable, match="this machine has 2 GPUs"):
        place(DeviceRequest("count", count=3), "ddp", GPUS)
    with pytest.raises(Unplaceable, match="no GPU 7"):
        place(DeviceRequest("ids", ids=(7,)), "ddp", GPUS)
    with pytest.raises(Unplaceable, match="fsdp' needs GPUs"):
        place(DeviceRequest("count", count=2), "fsdp", [])
    with pytest.raises(Unplaceable, match=r"needs about 30\.0 GB per device"):
        place(one, "ddp", GPUS, need_gb=30.0)


def test_memory_per_device_ddp_adds_buckets_fsdp_shards(anatomy_of, tiny_llama_dir):
    cfg = RunConfig.from_dict({"model": str(tiny_llama_dir), "train": {"devices": 2}})
    est = estimate(anatomy_of(tiny_llama_dir), cfg, "cuda", bf16_capable=True)
    from engine.core.devices import per_device_bytes

    assert per_device_bytes(est, "ddp", 1) == est.total_bytes
    assert per_device_bytes(est, "ddp", 2) == est.total_bytes + est.grad_bytes
    assert per_device_bytes(est, "fsdp", 2, 2) < per_device_bytes(est, "ddp", 2)
    note = scale_note(est, cfg.train, GPUS, 2)
    assert "per device** on 2 GPUs (ddp)" in note and "a step trains 8 examples" in note
    assert scale_note(est, cfg.train.__class__(devices="cuda:5"), GPUS, 2).startswith("⚠ train.devices")


def test_train_tab_offers_only_what_the_machine_has():
    assert [v for _, v in device_choices([], 2)] == ["auto", "2"]
    assert [v for _, v in device_choices(GPUS, 16)] == ["auto", "1", "2", "cuda:0", "cuda:1", "0,1"]


def test_queue_and_live_view_show_devices_world_size_and_per_rank_throughput():
    run = SimpleNamespace(id=4, name="dp", status=RunStatus.RUNNING, devices="cuda:0,1", world_size=2)
    run.__dict__.update(total_steps=10, peak_mem_gb=None, error=None, adapter_dir=None)
    queued = SimpleNamespace(id=5, name="next")
    panel = queue_markdown([run], [queued], {5: "waits for its GPUs"})
    assert (
        "#4** dp — running on cuda:0,1 (2 processes)" in panel and "1. #5 next — queued (waits for its GPUs)" in panel
    )
    last = {"tokens_per_s": 900.0, "rank0/tokens_per_s": 450.0, "rank1/tokens_per_s": 440.0}
    text = status_markdown(run, last, 3, None)
    assert "2 processes on cuda:0,1" in text and "per rank 450 / 440 tok/s" in text


def test_torchrun_commands_and_the_failed_rank_in_its_report():
    single = torchrun_argv(["train", "c.json"], 2, home="/h", python="py")
    assert single == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] + [
        "-m",
        "engine",
        "--home",
        "/h",
        "train",
        "c.json",
    ]
    multi = torchrun_argv(["train", "c.json"], 1, python="py", nnodes=2, node_rank=1, master="10.0.0.1:29500")
    assert multi[3:11] == ["--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1", "--master_port", "29500"]
    report = (
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
        "============================================================\n"
        "engine FAILED\n------------------------------------------------------------\n"
        "Failures:\n[1]:\n  time      : 2026\n  host      : vm\n  rank      : 0 (local_rank: 0)\n"
        "  exitcode  : 75 (pid: 11)\n------------------------------------------------------------\n"
        "Root Cause (first observed failure):\n[0]:\n  time      : 2026\n  host      : vm\n"
        "  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 12)\n  error_file: <N/A>\n"
    )
    words, code = explain_end(1, report)
    assert code == -9 and words.startswith("rank 1 ") and "SIGKILL" in words


def test_every_step_is_split_between_ranks_without_overlap_and_resumes_where_it_stopped():
    from itertools import islice

    from engine.core.batching import micro_batches, rank_share, step_micro_batches

    steps = list(islice(step_micro_batches(10, 2, seed=3, per_step=4), 6))  # 2 ranks × grad_accum 2
    stream = list(islice(micro_batches(10, 2, 3), 24))
    assert [mb for s in steps for mb in s] == stream  # the one-process stream, grouped by step
    for s in steps:
        mine = [rank_share(s, r, 2) for r in (0, 1)]
        assert mine[0] + mine[1] == s and len(mine[0]) == len(mine[1]) == 2  # disjoint halves, whole step
    resumed = list(islice(step_micro_batches(10, 2, seed=3, per_step=2, start=8), 2))  # now 1 rank × 2
    assert resumed == [stream[8:10], stream[10:12]]  # continues the stream whatever the process count
