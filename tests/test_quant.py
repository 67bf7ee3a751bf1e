"""bitsandbytes 4/8-bit on CPU: LoRA gradients must match a dequantized fp32 reference, also after an
eval-mode forward (the CPU repacking trap in stack-notes.md)."""

import warnings

import pytest
import torch

from engine.core.config import RunConfig
from engine.ml.model import attach_lora, load_base_model, pick_device
from tests.tiny import build_tiny_llama


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    # 64-wide so every weight splits into whole 4-bit blocks of 64
    return build_tiny_llama(tmp_path_factory.mktemp("llama64"), hidden_size=64, intermediate_size=128)


def _lora_grads(model, ids):
    model.train()
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _randomise_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("fix", [True, False])
def test_4bit_lora_gradients_match_dequantized_reference_after_eval(llama64, fix):
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    cfg = RunConfig.from_dict(
        {
            "model": str(llama64),
            "quant": "4bit",
            "dtype": "fp32",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": "all-linear"},
        }
    )
    device = pick_device()
    q = load_base_model(str(llama64), cfg, device)
    if not fix:  # undo the fix to show the test can see the trap
        for m in q.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = True
    # The fp32 reference: the same network with every 4-bit weight dequantized.
    ref = load_base_model(str(llama64), cfg.replace(quant="none"), device)
    qmods = dict(q.named_modules())
    with torch.no_grad():
        for name, m in ref.named_modules():
            if isinstance(qmods.get(name), bnb.nn.Linear4bit):
                w = qmods[name].weight
                m.weight.copy_(dequantize_4bit(w.data, w.quant_state).to(torch.float32))
    q, ref = attach_lora(q, cfg), attach_lora(ref, cfg.replace(quant="none"))
    _randomise_lora(q)
    _randomise_lora(ref)
    ids = torch.tensor([[5, 20, 30, 40, 50, 60, 70, 80]])

    q.eval()
    with torch.no_grad():  # an eval-mode forward, as generate() or validation would do
        q(input_ids=ids)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gq = _lora_grads(q, ids)
    gr = _lora_grads(ref, ids)
    assert gq.keys() == gr.keys() and len(gq) == 2 * 14
    worst = max(float((gq[k] - gr[k]).norm() / gr[k].norm().clamp_min(1e-12)) for k in gq)
    repacked = any("gemv_4bit" in str(w.message) for w in caught)
    if fix:
        assert not repacked, [str(w.message) for w in caught]
        assert worst < 1e-3, worst
    else:
        # Without the fix, on CPUs with AVX512-BF16 the weights are repacked and gradients go wrong;
        # on other CPUs nothing is repacked and the gradients stay right. Either way the fix is harmless.
        if repacked:
            assert worst > 1e-2
        else:
            assert worst < 1e-3


def test_8bit_trains_and_loss_falls(llama64, tmp_path):
    from engine.core.events import ListSink
    from engine.ml.train import train
    from tests.tiny import write_chat_jsonl

    data = write_chat_jsonl(tmp_path / "c.jsonl")
    for quant in ("8bit", "4bit"):
        cfg = RunConfig.from_dict(
            {
                "model": str(llama64),
                "dataset": str(data),
                "quant": quant,
                "train": {
                    "max_steps": 15,
                    "lr": 1e-2,
                    "batch_size": 4,
                    "val_split": 0.1,
                    "eval_every": 5,
                    "scheduler": "constant",
                    "warmup_steps": 0,
                },
            }
        )
        sink = ListSink()
        res = train(cfg, tmp_path / quant, sink, home=tmp_path / "home")
        losses = [v for _, v in sink.series("train/loss")]
        assert res.steps_done == 15 and sum(losses[-3:]) < sum(losses[:3]), (quant, losses)
