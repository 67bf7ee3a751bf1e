"""Checkpoints: a crafted trainer.pt cannot run code on resume, a damaged newest checkpoint falls back to the
one before it (and the loss curve continues exactly), a full disk says so and leaves no partial folder."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from engine.core.events import ListSink
from engine.core.runs import checkpoints
from engine.ml import checkpoint as C
from engine.ml.train import train
from tests.test_train import _cfg


class Exploit:
    """Unpickling this runs a shell command: what a malicious checkpoint would hold."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, chat_jsonl, tmp_path_factory):
    """An uninterrupted 12-step run, and the same run stopped after 8 steps (checkpoints at 4 and 8)."""
    root = tmp_path_factory.mktemp("ckpt")
    cfg = _cfg(tiny_llama_dir, chat_jsonl, max_steps=12, save_every=4, eval_every=100)
    full = ListSink()
    train(cfg, root / "full", full, home=root / "home")
    calls = {"n": 0}

    def stop_after_8():
        calls["n"] += 1
        return calls["n"] > 8

    assert train(cfg, root / "part", ListSink(), stop_after_8, home=root / "home").steps_done == 8
    return cfg, root, dict(full.series("train/loss"))


def copy_part(runs, tmp_path):
    cfg, root, want = runs
    out = tmp_path / "part"
    shutil.copytree(root / "part", out)
    return cfg, out, root / "home", want


def test_a_crafted_trainer_pt_is_refused_and_runs_nothing(runs, tmp_path, capfd):
    cfg, out, home, _ = copy_part(runs, tmp_path)
    newest = checkpoints(out)[-1]
    marker = tmp_path / "pwned"
    torch.save({"optimizer": Exploit(marker), "scheduler": {}, "rng": {}}, newest / C.TRAINER_BLOB)
    evil = shutil.copyfile(newest / C.TRAINER_BLOB, tmp_path / "evil.pt")  # the resumed run overwrites step 8

    with pytest.raises(C.CheckpointError, match="could run code"):
        C.read_checkpoint(newest)
    assert not marker.exists()
    # resuming the run falls back to the older, intact checkpoint, saying why; still nothing ran
    sink = ListSink()
    res = train(cfg, out, sink, resume_from=newest, home=home)
    assert not marker.exists()
    assert res.status == "succeeded" and min(s for s, _ in sink.series("train/loss")) == 5
    err = capfd.readouterr().err
    assert "cannot resume from step-0000008" in err and "refused, since loading it could run code" in err
    # the file really is an exploit: the unsafe load this replaced would have run it
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_damaged_newest_checkpoint_falls_back_and_the_curve_continues_exactly(runs, tmp_path, capfd):
    cfg, out, home, want = copy_part(runs, tmp_path)
    older, newest = checkpoints(out)
    assert (older.name, newest.name) == ("step-0000004", "step-0000008")
    blob = newest / C.TRAINER_BLOB
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])  # a crash or a bad copy cut it short

    resumed = ListSink()
    res = train(cfg, out, resumed, resume_from=newest, home=home)
    err = capfd.readouterr().err
    assert "cannot resume from step-0000008" in err and "trainer.pt is damaged" in err
    assert "falling back to step-0000004" in err and "resuming from step-0000004 (step 4)" in err
    got = dict(resumed.series("train/loss"))
    assert sorted(got) == list(range(5, 13)) and res.steps_done == 12
    for step in range(5, 13):  # optimizer, schedule, data order and RNG of step 4 restored
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


def test_no_usable_checkpoint_is_one_clear_error(runs, tmp_path):
    _, out, _, _ = copy_part(runs, tmp_path)
    for ckpt in checkpoints(out):
        (ckpt / C.ADAPTER_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(C.CheckpointError) as e:
        C.read_checkpoint(checkpoints(out)[-1])
    assert "adapter_model.safetensors is damaged" in str(e.value)
    from engine.cli.train import explain_failure

    newest = checkpoints(out)[-1]
    with pytest.raises(C.CheckpointError) as e:
        C.resume(newest, None, None, None, say=lambda m: None)
    msg = explain_failure(e.value)
    assert "cannot resume from" in msg and "step-0000004" in msg and "step-0000008" in msg
    assert "Submit the run again" in msg and "\n" not in msg


def test_disk_full_while_writing_a_checkpoint_says_so_and_removes_the_partial_folder(runs, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, out, _, _ = copy_part(runs, tmp_path)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(cfg.model), str(out / "adapter"), is_trainable=True
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    real_save = torch.save
    # /dev/full answers every write with ENOSPC: torch's own zip writer then fails as it does on a full disk
    monkeypatch.setattr(torch, "save", lambda obj, f, **kw: real_save(obj, "/dev/full", **kw))
    monkeypatch.setattr(C, "free_bytes", lambda path: 300 * 2**10)
    with pytest.raises(C.DiskFullError) as e:
        C.save_checkpoint(out, model, opt, sched, 9, 100, None, 1.0)
    msg = str(e.value)
    previous = C.folder_bytes(checkpoints(out)[-1])
    assert msg.startswith("disk full while writing checkpoint step-0000009 in ") and "0.3 MB free" in msg
    assert f"it takes about {C.mb(previous)}" in msg and "free at least" in msg
    assert "The partial folder .tmp-step-0000009 was removed" in msg and "unexpected pos" in msg
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-0000004", "step-0000008"]  # nothing partial left
    from engine.cli.train import explain_failure

    assert explain_failure(e.value) == msg


def test_a_full_disk_ends_the_run_failed_with_that_message(tiny_llama_dir, chat_jsonl, tmp_path):
    """The whole `engine train` process, with every checkpoint write landing on /dev/full (ENOSPC)."""
    import json
    import subprocess
    import sys

    from storage import RunStatus, Store
    from tests.test_jobs import REPO_ROOT

    home, cfg = tmp_path / "home", tmp_path / "run.json"
    train_cfg = {"max_steps": 4, "save_every": 2, "val_split": 0, "threads": 1}
    cfg.write_text(json.dumps({"model": str(tiny_llama_dir), "dataset": str(chat_jsonl), "train": train_cfg}))
    code = (
        "import runpy, sys, torch\n"
        "real = torch.save\n"
        "torch.save = lambda obj, f, **kw: real(obj, '/dev/full', **kw)\n"
        f"sys.argv = ['engine', '--home', {str(home)!r}, 'train', {str(cfg)!r}]\n"
        "runpy.run_module('engine', run_name='__main__')\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env={**os.environ}
    )
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 1 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert errors[0].startswith("error: disk full while writing checkpoint step-0000002 in ")
    with Store.for_home(home) as store:
        (run,) = store.list_runs()
        assert run.status is RunStatus.FAILED and run.error == errors[0].removeprefix("error: ")
    assert list((home / "runs" / str(run.id) / "checkpoints").iterdir()) == []  # no partial folder left
