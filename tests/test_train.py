"""The trainer on tiny models: loss falls, base weights stay, adapters reload exactly, resume is exact."""

from pathlib import Path

import pytest
import torch

from engine.core.config import ConfigError, RunConfig
from engine.core.events import ListSink
from engine.core.runs import latest_checkpoint
from engine.ml.train import train


def _cfg(model_dir, data, **train_kw):
    t = {
        "lr": 1e-2,
        "max_steps": 12,
        "batch_size": 4,
        "warmup_steps": 0,
        "eval_every": 6,
        "save_every": 6,
        "scheduler": "constant",
        "val_split": 0.1,
        "seed": 7,
    }
    t.update(train_kw)
    return RunConfig.from_dict(
        {
            "model": str(model_dir),
            "dataset": str(data),
            "lora": {"r": 8, "alpha": 16, "targets": "all-linear", "dropout": 0.1},
            "train": t,
        }
    )


def _base_weights(model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir))
    return {k: v.clone() for k, v in m.state_dict().items()}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("which", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_loss_falls_base_unchanged_adapter_reloads(which, request, chat_jsonl, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(which)
    before = _base_weights(model_dir)
    sink = ListSink()
    res = train(_cfg(model_dir, chat_jsonl, max_steps=25), tmp_path / "out", sink, home=tmp_path / "home")
    losses = [v for _, v in sink.series("train/loss")]
    assert res.status == "succeeded" and res.steps_done == 25 and len(losses) == 25
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses  # loss falls on a small repeated set
    assert all(torch.equal(before[k], v) for k, v in _base_weights(model_dir).items())  # base weights untouched

    # Plain peft can load the adapter; it changes the logits; reloading twice gives identical logits.
    adapter = tmp_path / "out" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    ids = torch.tensor([[5, 20, 30, 40, 50, 60]])
    base = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    base_logits = _logits(base, ids)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(adapter)).eval()
    tuned2 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(adapter)).eval()
    lt = _logits(tuned, ids)
    assert (lt - base_logits).abs().max() > 1e-3
    assert torch.equal(lt, _logits(tuned2, ids))
    # every LoRA-able linear got an adapter (all-linear, Conv1D included for GPT-2)
    n_lora = sum(1 for n, _ in tuned.named_modules() if n.endswith("lora_A.default"))
    assert n_lora == (14 if which == "tiny_llama_dir" else 8)


def test_resume_continues_the_same_loss_curve(tiny_llama_dir, chat_jsonl, tmp_path):
    full, part, resumed = ListSink(), ListSink(), ListSink()
    cfg = _cfg(tiny_llama_dir, chat_jsonl, max_steps=12, save_every=6, grad_accum=2)
    train(cfg, tmp_path / "a", full, home=tmp_path / "home")
    # the same run stopped after 6 steps (as a cancel would), then resumed from its checkpoint
    calls = {"n": 0}

    def stop_after_6():
        calls["n"] += 1
        return calls["n"] > 6

    r = train(cfg, tmp_path / "b", part, stop_after_6, home=tmp_path / "home")
    assert r.status == "cancelled" and r.steps_done == 6
    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt.name == "step-0000006"
    train(cfg, tmp_path / "b", resumed, resume_from=ckpt, home=tmp_path / "home")
    a = dict(full.series("train/loss"))
    b = {**dict(part.series("train/loss")), **dict(resumed.series("train/loss"))}
    assert sorted(b) == list(range(1, 13))
    for step in range(1, 13):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step


def test_target_errors_list_what_exists(tiny_llama_dir, chat_jsonl, tmp_path):
    cfg = RunConfig.from_dict(
        {
            "model": str(tiny_llama_dir),
            "dataset": str(chat_jsonl),
            "lora": {"targets": ["q_proj", "c_attn"], "layers": [0, 5]},
        }
    )
    with pytest.raises(ConfigError) as e:
        train(cfg, tmp_path / "o", home=tmp_path / "home")
    msg = str(e.value)
    assert (
        "'c_attn' matches no module" in msg and "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in msg
    )
    assert "has layers 0–1; no layer 5" in msg


def test_layer_restriction_and_variants(tiny_llama_dir, chat_jsonl, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = RunConfig.from_dict(
        {
            "model": str(tiny_llama_dir),
            "dataset": str(chat_jsonl),
            "lora": {"targets": "attention", "layers": "1", "use_rslora": True, "use_dora": True},
            "train": {"max_steps": 2, "val_split": 0},
        }
    )
    res = train(cfg, tmp_path / "o", home=tmp_path / "home")
    m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)), res.adapter_dir)
    names = [n for n, _ in m.named_modules() if n.endswith("lora_A.default")]
    assert len(names) == 4 and all(".layers.1.self_attn." in n for n in names)
    assert m.peft_config["default"].use_dora and m.peft_config["default"].use_rslora


def test_loraplus_and_lorafa_train(tiny_llama_dir, chat_jsonl, tmp_path):
    for lora in ({"loraplus_lr_ratio": 16}, {"freeze_A": True}):
        cfg = RunConfig.from_dict(
            {
                "model": str(tiny_llama_dir),
                "dataset": str(chat_jsonl),
                "lora": lora,
                "train": {"max_steps": 3, "val_split": 0, "lr": 1e-2},
            }
        )
        sink = ListSink()
        assert train(cfg, tmp_path / str(len(lora)), sink, home=tmp_path / "home").steps_done == 3


def test_nan_loss_stops_with_a_clear_failure(chat_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    from engine.ml.train import TrainingDiverged
    from tests.tiny import build_tiny_llama

    d = build_tiny_llama(tmp_path / "broken")
    m = AutoModelForCausalLM.from_pretrained(str(d))
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")  # a corrupt checkpoint
    m.save_pretrained(d)
    with pytest.raises(TrainingDiverged, match=r"loss became nan .* at step 1; lower train.lr"):
        train(_cfg(d, chat_jsonl, max_steps=5), tmp_path / "o", home=tmp_path / "home")


def test_peak_rss_is_this_process_not_its_parent(tmp_path):
    """ru_maxrss survives fork+exec on Linux; a child of a big parent must still report its own peak."""
    import subprocess
    import sys

    code = (
        "import os, subprocess, sys\n"
        "hog = bytearray(600 * 2**20)\n"  # the parent holds 600 MB
        "for i in range(0, len(hog), 4096): hog[i] = 1\n"
        "out = subprocess.run([sys.executable, '-c', 'from engine.ml.resources import peak_rss_gb; print(peak_rss_gb())'],"
        " capture_output=True, text=True, cwd=sys.argv[1]).stdout\n"
        "print(out)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).resolve().parent.parent)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    child_peak = float(r.stdout.strip().splitlines()[-1])
    assert child_peak < 0.5, child_peak  # the child imported torch (~0.3 GB), not the parent's 600 MB
