"""Micro-batches as tensors: padded (the reference layout) or packed rows with restarting position ids.

Which examples form a micro-batch, and how packing groups them into rows, is engine.core.batching (shared
with the memory estimate); this module only lays them out in tensors.
"""

from __future__ import annotations

import torch

from engine.core.batching import epoch_order, micro_batches, pack_lengths
from engine.ml.data.tokens import IGNORE, Example

__all__ = ["collate", "collate_packed", "epoch_order", "micro_batches", "pack_rows"]


def _targets(e: Example) -> list[int]:
    """Next-token targets aligned with the inputs: position i predicts token i+1 (IGNORE at the end)."""
    return list(e.labels[1:]) + [IGNORE]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest in the batch (the reference layout); padding is masked by length."""
    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[b, :n] = torch.tensor(e.input_ids)
        targets[b, :n] = torch.tensor(_targets(e))
        attn[b, :n] = 1
    return {"input_ids": input_ids, "targets": targets, "attention_mask": attn}


def pack_rows(examples: list[Example], capacity: int) -> list[list[Example]]:
    """First-fit decreasing (engine.core.batching.pack_lengths): examples in rows of at most `capacity` tokens."""
    return [[examples[i] for i in row] for row in pack_lengths([len(e.input_ids) for e in examples], capacity)]


def collate_packed(examples: list[Example], pad_id: int, capacity: int) -> dict[str, torch.Tensor]:
    """Concatenate examples into few rows; position ids restart at 0 for every example.

    With attention_mask=None, transformers reads the restarts as sequence boundaries and builds a
    block-diagonal causal mask: no token attends across examples, so each example's per-token losses
    equal the padded computation's while no compute is spent on padding. A row's unused tail is a pad
    segment of its own (positions from 0, no targets).
    """
    rows = pack_rows(examples, max(capacity, max(len(e.input_ids) for e in examples)))
    L = max(sum(len(e.input_ids) for e in row) for row in rows)
    R = len(rows)
    input_ids = torch.full((R, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, L), dtype=torch.long)
    targets = torch.full((R, L), IGNORE, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e.input_ids)
            input_ids[r, at : at + n] = torch.tensor(e.input_ids)
            position_ids[r, at : at + n] = torch.arange(n)
            targets[r, at : at + n] = torch.tensor(_targets(e))
            at += n
        position_ids[r, at:] = torch.arange(L - at)
    return {"input_ids": input_ids, "position_ids": position_ids, "targets": targets}
