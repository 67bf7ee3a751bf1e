"""What one forward pass computes: the per-token losses (packed, head on targets only, or padded), the
validation loss, and the start-up check that packing gives the padded path's losses on this model."""

from __future__ import annotations

import torch

from engine.ml import data as D


@torch.no_grad()
def evaluate(
    model,
    examples: list[D.Example],
    batch_size: int,
    pad_id: int,
    device,
    autocast,
    packed: bool = False,
    capacity: int = 512,
) -> float:
    """Mean per-token loss over the validation examples (dropout off)."""
    model.eval()
    total, n = torch.zeros((), device=device, dtype=torch.float64), 0
    for i in range(0, len(examples), batch_size):
        mb = examples[i : i + batch_size]
        batch = D.collate_packed(mb, pad_id, capacity) if packed else D.collate(mb, pad_id)
        with autocast:
            total += token_losses(model, {k: v.to(device) for k, v in batch.items()}, fast=packed).sum()
        n += sum(e.n_label_tokens for e in mb)
    model.train()
    return float(total) / max(1, n)


def token_losses(model, batch: dict[str, torch.Tensor], *, fast: bool) -> torch.Tensor:
    """Cross-entropy of every target token, shape (N,), N = number of targets in the batch.

    fast: run the decoder only and apply the output head to the N positions that have a target. For a
    response-only loss that skips the (T × vocab) logits of every prompt token: with SmolLM2's 49k
    vocabulary the head is ~20% of the model's FLOPs. The standard path computes all logits.
    """
    targets = batch["targets"]
    mask = targets != D.IGNORE  # (R, L)
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    if fast:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder = getattr(base, base.base_model_prefix)
        hidden = decoder(**inputs, use_cache=False).last_hidden_state  # (R, L, H)
        logits = base.get_output_embeddings()(hidden[mask])  # (N, V)
    else:
        logits = model(**inputs, use_cache=False).logits[mask]  # (N, V)
    return torch.nn.functional.cross_entropy(logits.float(), targets[mask], reduction="none")


@torch.no_grad()
def packing_agrees(model, examples: list[D.Example], pad_id: int, capacity: int, device, autocast) -> bool:
    """Does the packed, head-on-targets path give the padded path's per-token losses on this model?

    Checked on real examples at the start of every run (dropout off, no RNG used): a model whose
    attention ignores restarting position ids, or whose head is more than a linear layer (logit
    soft-capping), fails the check and trains with padding instead.
    """
    if not examples:
        return False
    was_training = model.training
    model.eval()
    try:
        with autocast:
            ref = token_losses(model, {k: v.to(device) for k, v in D.collate(examples, pad_id).items()}, fast=False)
            packed_batch = D.collate_packed(examples, pad_id, capacity)
            fast = token_losses(model, {k: v.to(device) for k, v in packed_batch.items()}, fast=True)
        # Per-token losses in packed order: undo the packing order to compare token by token.
        order = [
            e for row in D.pack_rows(examples, max(capacity, max(len(e.input_ids) for e in examples))) for e in row
        ]
        counts = [e.n_label_tokens for e in examples]
        starts = [sum(counts[:i]) for i in range(len(examples))]
        pos = {id(e): i for i, e in enumerate(examples)}
        ref_in_packed_order = torch.cat(
            [ref[starts[pos[id(e)]] : starts[pos[id(e)]] + counts[pos[id(e)]]] for e in order]
        )
        tol = 1e-3 if ref.dtype == torch.float32 and not torch.is_autocast_enabled(device.type) else 5e-2
        return ref.shape == fast.shape and bool(torch.allclose(fast, ref_in_packed_order, atol=tol, rtol=tol))
    except (TypeError, AttributeError, ValueError, RuntimeError):  # the model's forward cannot take this layout
        return False
    finally:
        model.train(was_training)
