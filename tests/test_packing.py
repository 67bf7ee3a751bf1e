"""Packing and the head-on-targets path change no number: same sequences, same weights → same per-token losses."""

import pytest
import torch

from engine.core.config import RunConfig
from engine.ml.data import IGNORE, Example, collate, collate_packed, pack_rows, prepare
from engine.ml.model import attach_lora, load_base_model, load_tokenizer, pick_device
from engine.ml.steps import packing_agrees, token_losses


def _examples(tok, data, n=6):
    cfg = RunConfig.from_dict({"dataset": str(data), "train": {"val_split": 0, "max_seq_len": 64}})
    return prepare(cfg, tok).train[:n]


@pytest.mark.parametrize("which", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_packed_per_token_losses_equal_padded(which, request, chat_jsonl):
    model_dir = request.getfixturevalue(which)
    tok = load_tokenizer(str(model_dir))
    cfg = RunConfig.from_dict({"model": str(model_dir), "lora": {"r": 4, "dropout": 0.0}})
    model = attach_lora(load_base_model(str(model_dir), cfg, pick_device()), cfg)
    with torch.no_grad():  # a trained-looking adapter: B ≠ 0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.eval()
    exs = _examples(tok, chat_jsonl)
    lengths = {len(e.input_ids) for e in exs}
    assert len(lengths) > 1  # varied lengths, so the padded batch really has padding

    padded = token_losses(model, collate(exs, tok.pad_token_id), fast=False)
    for capacity in (64, 1000):  # several rows, and everything in one row
        batch = collate_packed(exs, tok.pad_token_id, capacity)
        assert "attention_mask" not in batch
        fast = token_losses(model, batch, fast=True)
        order = [e for row in pack_rows(exs, capacity) for e in row]
        by_example = {}
        at = 0
        for e in order:
            by_example[id(e)] = fast[at : at + e.n_label_tokens]
            at += e.n_label_tokens
        ref_at = 0
        for e in exs:
            ref = padded[ref_at : ref_at + e.n_label_tokens]
            ref_at += e.n_label_tokens
            torch.testing.assert_close(by_example[id(e)], ref, rtol=1e-5, atol=1e-5)
        assert packing_agrees(
            model, exs, tok.pad_token_id, capacity, pick_device(), torch.autocast("cpu", enabled=False)
        )


def test_packing_layout():
    exs = [Example(tuple(range(1, n + 1)), (IGNORE,) + tuple(range(2, n + 1))) for n in (5, 3, 4, 2)]
    rows = pack_rows(exs, capacity=7)
    assert sorted(sum(len(e.input_ids) for e in r) for r in rows) == [7, 7]
    b = collate_packed(exs, pad_id=0, capacity=7)
    assert b["input_ids"].shape == (2, 7) and int((b["input_ids"] == 0).sum()) == 0  # no padding at all
    for r in range(2):  # positions restart at 0 at each example
        starts = (b["position_ids"][r] == 0).nonzero().flatten().tolist()
        assert starts[0] == 0 and len(starts) == 2
    # targets: the next token within the example, never across examples
    assert int((b["targets"] != IGNORE).sum()) == sum(e.n_label_tokens for e in exs) == 10


def test_training_uses_packing_and_reports_padding(tiny_llama_dir, chat_jsonl, tmp_path):
    from engine.core.events import ListSink
    from engine.ml.train import train

    sinks = {}
    for packing in (True, False):
        cfg = RunConfig.from_dict(
            {
                "model": str(tiny_llama_dir),
                "dataset": str(chat_jsonl),
                "lora": {"dropout": 0.0},
                "train": {"max_steps": 4, "batch_size": 4, "packing": packing, "val_split": 0},
            }
        )
        sinks[packing] = ListSink()
        train(cfg, tmp_path / str(packing), sinks[packing], home=tmp_path / "home")
    assert sinks[True].summary["summary"]["packing"] is True
    assert all(v == 0 for _, v in sinks[True].series("pad_frac"))
    assert any(v > 0 for _, v in sinks[False].series("pad_frac"))
    # the same maths: the same loss curve with and without packing (no dropout)
    a, b = sinks[True].series("train/loss"), sinks[False].series("train/loss")
    assert [s for s, _ in a] == [s for s, _ in b]
    for (_, x), (_, y) in zip(a, b):
        assert x == pytest.approx(y, rel=1e-4)


@pytest.mark.parametrize("trainable_head", [False, True], ids=["frozen-head", "trainable-head"])
def test_chunked_loss_equals_full_logits_loss_and_gradients(trainable_head, tiny_llama_dir, chat_jsonl):
    """The chunked head (3 positions at a time, so many chunks and a ragged last one) gives the full-logits
    per-token losses and the same gradients for the LoRA weights (and the head, when it trains) to fp32
    round-off."""
    tok = load_tokenizer(str(tiny_llama_dir))
    cfg = RunConfig.from_dict({"model": str(tiny_llama_dir), "lora": {"r": 4, "dropout": 0.0}})
    model = attach_lora(load_base_model(str(tiny_llama_dir), cfg, pick_device()), cfg)
    head = model.get_output_embeddings()
    head.weight.requires_grad_(trainable_head)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    exs = _examples(tok, chat_jsonl, n=4)
    batch = collate(exs, tok.pad_token_id)
    weights = torch.linspace(0.5, 1.5, sum(e.n_label_tokens for e in exs))  # a non-uniform upstream gradient
    grads, losses = [], []
    for fast, chunk in ((False, 0), (True, 3)):
        model.zero_grad(set_to_none=True)
        per_token = token_losses(model, batch, fast=fast, chunk=chunk)
        (per_token * weights).sum().backward()
        losses.append(per_token.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert len(losses[0]) > 3 * 4  # several chunks
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and any("lora_A" in n for n in grads[0])
    assert any("lm_head" in n or "embed" in n for n in grads[0]) == trainable_head
    for n in grads[0]:  # fp32 round-off: summation order differs (chunks, a matmul instead of autograd's)
        assert float((grads[1][n] - grads[0][n]).norm()) <= 1e-5 * float(grads[0][n].norm()) + 1e-9, n
