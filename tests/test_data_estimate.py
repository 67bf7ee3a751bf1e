"""The estimate sized on the real data: the micro-batches engine.core.batching predicts are the ones the trainer
builds, the largest of them sizes the estimate, and a run stores that estimate."""

from __future__ import annotations

import random

import pytest

from engine.core import batching as B
from engine.core.config import RunConfig
from engine.core.data_fields import truncation_warning
from engine.core.estimate import estimate, gb
from engine.ml import data as D


def examples(lengths, targets=None):
    rng = random.Random(0)
    out = []
    for i, n in enumerate(lengths):
        ids = tuple(rng.randrange(12, 100) for _ in range(n))
        k = n - 1 if targets is None else targets[i]  # the last k tokens are labelled
        out.append(D.Example(ids, (D.IGNORE,) * (n - k) + ids[n - k :]))
    return out


def test_the_trainer_builds_the_micro_batches_core_predicts():
    """engine.ml.data's collate_packed / collate and engine.core.batching.batch_shape agree on every micro-batch."""
    rng = random.Random(1)
    lengths = [rng.randint(3, 60) for _ in range(37)]
    targets = [rng.randint(1, n - 1) for n in lengths]
    exs = examples(lengths, targets)
    stream = D.micro_batches(len(exs), 5, seed=3)
    for _ in range(20):
        mb = next(stream)
        batch = [exs[i] for i in mb]
        for packing in (True, False):
            shape = B.batch_shape([lengths[i] for i in mb], [exs[i].n_label_tokens for i in mb], packing, 64)
            t = D.collate_packed(batch, 0, 64) if packing else D.collate(batch, 0)
            assert (shape.rows, shape.length) == tuple(t["input_ids"].shape)
            assert shape.targets == int((t["targets"] != D.IGNORE).sum())
            assert shape.tokens == sum(lengths[i] for i in mb)
    assert [[len(e.input_ids) for e in row] for row in D.pack_rows(exs[:6], 64)] == [
        [lengths[i] for i in row] for row in B.pack_lengths(lengths[:6], 64)
    ]


def test_run_batch_shapes_keep_the_largest_micro_batch():
    rng = random.Random(2)
    lengths = tuple(rng.randint(5, 120) for _ in range(200))
    targets = tuple(rng.randint(1, n - 1) for n in lengths)
    facts = B.DataFacts("k", lengths, targets)
    cfg = RunConfig.from_dict({"train": {"batch_size": 4, "epochs": 2, "max_seq_len": 128}})
    shapes, scanned = B.run_batch_shapes(facts, cfg.train)
    assert scanned == 2 * 50  # two epochs of 50 micro-batches
    every = []
    stream = B.micro_batches(200, 4, cfg.train.seed)
    for _ in range(scanned):
        mb = next(stream)
        every.append(B.batch_shape([lengths[i] for i in mb], [targets[i] for i in mb], True, 128))
    for s in every:  # every micro-batch is matched or exceeded by a kept one
        assert any(k.rows >= s.rows and k.length >= s.length and k.targets >= s.targets for k in shapes)
    assert max(s.rows * s.length for s in every) == max(k.rows * k.length for k in shapes)
    assert max(s.targets for s in every) == max(k.targets for k in shapes)
    assert len(shapes) < len({(s.rows, s.length, s.targets) for s in every})


def test_full_rows_of_data_give_the_worst_case(tiny_llama_dir, anatomy_of):
    """Data whose examples all fill max_seq_len with every token a target is the worst case: same bytes."""
    anatomy = anatomy_of(tiny_llama_dir)
    T = 64
    cfg = RunConfig.from_dict(
        {"model": str(tiny_llama_dir), "train_on": "all", "train": {"batch_size": 1, "max_seq_len": T}}
    )
    facts = B.DataFacts("k", (T,) * 8, (T - 1,) * 8)
    for device in ("cpu", "cuda"):
        data, worst = estimate(anatomy, cfg, device, data=facts), estimate(anatomy, cfg, device)
        assert (data.basis, worst.basis) == ("dataset", "worst case")
        assert data.allocated_bytes == worst.allocated_bytes and data.n_targets == worst.n_targets == T - 1


def test_short_examples_size_the_estimate_on_the_largest_packed_micro_batch(tiny_llama_dir, anatomy_of):
    anatomy = anatomy_of(tiny_llama_dir)
    cfg = RunConfig.from_dict({"model": str(tiny_llama_dir), "train": {"batch_size": 4, "max_seq_len": 512}})
    lengths = (30, 40, 25, 90, 35, 20, 45, 50)
    facts = B.DataFacts("k", lengths, tuple(n // 3 for n in lengths))
    data, worst = estimate(anatomy, cfg, "cuda", data=facts), estimate(anatomy, cfg, "cuda")
    assert data.allocated_bytes < worst.allocated_bytes / 5
    # packed into one row per micro-batch (capacity 512): the biggest holds the most tokens of any 4
    order = B.epoch_order(8, cfg.train.seed, 0)
    biggest = max(sum(lengths[i] for i in order[k : k + 4]) for k in (0, 4))
    assert f"1 row × {biggest} tokens" in data.batch_note
    assert data.n_targets == max(sum(lengths[i] // 3 for i in order[k : k + 4]) for k in (0, 4))


def test_a_run_stores_the_estimate_of_its_data(tiny_llama_dir, chat_jsonl, tmp_path, anatomy_of):
    from engine.core.events import ListSink
    from engine.ml.model import load_tokenizer
    from engine.ml.train import train

    cfg = RunConfig.from_dict(
        {"model": str(tiny_llama_dir), "dataset": str(chat_jsonl), "train": {"max_steps": 2, "batch_size": 4}}
    )
    sink = ListSink()
    train(cfg, tmp_path / "run", sink, home=tmp_path / "home")
    prep = D.prepare(cfg, load_tokenizer(str(tiny_llama_dir)))
    expected = estimate(anatomy_of(tiny_llama_dir), cfg, "cpu", bf16_capable=False, data=prep.facts(cfg))
    assert expected.basis == "dataset"
    assert sink.summary["est_mem_gb"] == pytest.approx(gb(expected.allocated_bytes))
    worst = estimate(anatomy_of(tiny_llama_dir), cfg, "cpu", bf16_capable=False)
    assert sink.summary["est_mem_gb"] < gb(worst.allocated_bytes)
    assert sink.summary["summary"]["tokens_total"] == sink.summary["summary"]["tokens_kept"] > 0


def test_facts_round_trip_and_clip():
    f = B.DataFacts("k", (10, 100), (5, 60))
    assert B.DataFacts.from_dict(f.to_dict()) == f
    c = f.clipped(50)
    assert c.lengths == (10, 50) and c.targets == (5, 30)
    assert f.clipped(100) is f
    with pytest.raises(ValueError):
        B.DataFacts.from_dict({"lengths": [1, 2], "targets": [1]})


def test_truncation_warning_over_one_percent_with_the_fix():
    base = {"tokens_total": 10_000, "rows": 200, "longest": 1900, "dropped": {}, "tokens_dropped": 0}
    assert truncation_warning({**base, "tokens_truncated": 100, "rows_truncated": 3}, 512) is None  # exactly 1 %
    w = truncation_warning({**base, "tokens_truncated": 101, "rows_truncated": 3}, 512)
    assert w.startswith(
        "1.0 % of the data's tokens would be cut: 3 of 200 rows (2 %) are longer than max_seq_len = 512"
    )
    assert "Raise max_seq_len to 1,900" in w
    dropped = {"no response token within max_seq_len (the prompt alone is longer)": 2}
    w = truncation_warning(
        {**base, "tokens_truncated": 0, "rows_truncated": 0, "dropped": dropped, "tokens_dropped": 500}, 512
    )
    assert w.startswith("5.0 %") and "2 of them dropped" in w
