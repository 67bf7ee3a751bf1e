"""What one forward pass computes: the per-token losses (decoder + the output head in chunks on the target
positions only, or the model's own full logits), the validation loss, and the start-up check that the
chunked head and packing give the model's own per-token losses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.core.memory import PACKING_CHECK_TARGETS, loss_chunk_rows
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
    *,
    fast: bool | None = None,
    chunk: int = 0,
) -> float:
    """Mean per-token loss over the validation examples (dropout off). fast: the chunked head (default: packed)."""
    model.eval()
    fast = packed if fast is None else fast
    total, n = torch.zeros((), device=device, dtype=torch.float64), 0
    for i in range(0, len(examples), batch_size):
        mb = examples[i : i + batch_size]
        batch = D.collate_packed(mb, pad_id, capacity) if packed else D.collate(mb, pad_id)
        with autocast:
            total += token_losses(model, {k: v.to(device) for k, v in batch.items()}, fast=fast, chunk=chunk).sum()
        n += sum(e.n_label_tokens for e in mb)
    model.train()
    return float(total) / max(1, n)


def token_losses(model, batch: dict[str, torch.Tensor], *, fast: bool, chunk: int = 0) -> torch.Tensor:
    """Cross-entropy of every target token, shape (N,), N = number of targets in the batch.

    fast: run the decoder only and apply the output head to the N positions that have a target, `chunk`
    positions at a time (0 = auto, engine.core.memory.loss_chunk_rows): no (N × vocab) logits tensor is
    ever alive, only one chunk's. For a response-only loss that also skips the logits of every prompt token
    (with SmolLM2's 49k vocabulary the head is ~20% of the model's FLOPs). The standard path computes the
    model's own full logits (for heads that are more than a linear layer).
    """
    targets = batch["targets"]
    mask = targets != D.IGNORE  # (R, L)
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    if not fast:
        logits = model(**inputs, use_cache=False).logits[mask]  # (N, V)
        return F.cross_entropy(logits.float(), targets[mask], reduction="none")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, base.base_model_prefix)
    hidden = decoder(**inputs, use_cache=False).last_hidden_state  # (R, L, H)
    head = base.get_output_embeddings()
    return chunked_head_loss(hidden[mask], head, targets[mask], loss_chunk_rows(chunk, head.out_features))


def chunked_head_loss(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per-token cross-entropy of head(hidden) against targets, `chunk` rows of logits at a time.

    A frozen head (LoRA's case): the gradient w.r.t. the hidden states is made chunk by chunk in the
    forward pass ((softmax − one-hot) · W, as Liger's fused linear cross-entropy does), so backward only
    scales it: no recomputation, nothing N × vocab kept. A trainable head: each chunk is recomputed in
    backward (activation checkpointing), which is exact too and costs one more head matmul.
    """
    trainable = head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad)
    if not (trainable and torch.is_grad_enabled()):
        return _FrozenHeadCE.apply(hidden, head.weight, head.bias, targets, chunk)
    from torch.utils.checkpoint import checkpoint

    def piece(h, t):
        return F.cross_entropy(head(h).float(), t, reduction="none")

    parts = [
        checkpoint(piece, hidden[i : i + chunk], targets[i : i + chunk], use_reentrant=False)
        for i in range(0, len(targets), chunk)
    ]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


class _FrozenHeadCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        dev = hidden.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        w = weight.to(dt)  # one cast for all chunks (autocast would recast a frozen weight per chunk)
        b = None if bias is None else bias.to(dt)
        need_grad = ctx.needs_input_grad[0]
        losses = torch.empty(len(targets), device=hidden.device, dtype=torch.float32)
        grad = torch.empty_like(hidden) if need_grad else None
        for i in range(0, len(targets), chunk):
            t = targets[i : i + chunk]
            z = F.linear(hidden[i : i + chunk].to(dt), w, b).float()  # (c, V) fp32; the 16-bit logits freed
            picked = z.gather(1, t[:, None])[:, 0]
            top = z.amax(1, keepdim=True)
            z.sub_(top).exp_()  # in place: one (c, V) buffer
            total = z.sum(1, keepdim=True)
            losses[i : i + chunk] = (total.log() + top)[:, 0] - picked
            if need_grad:
                z.div_(total)  # softmax
                z[torch.arange(len(t), device=z.device), t] -= 1.0
                grad[i : i + chunk] = (z.to(dt) @ w).to(hidden.dtype)
            del z
        if need_grad:
            ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad,) = ctx.saved_tensors
        return grad * grad_losses[:, None].to(grad.dtype), None, None, None, None


@dataclass(frozen=True)
class FastPaths:
    """What the start-up check found: may the loss use the chunked head (`head`), and packing (`packed`)?"""

    head: bool
    packed: bool


def check_examples(examples: list[D.Example], limit: int) -> list[D.Example]:
    """The examples cut to at most `limit` targets each (a prefix is a valid example), so that the check's
    reference logits (limit × vocab) stay small."""
    out = []
    for e in examples:
        seen, end = 0, len(e.input_ids)
        for j, lab in enumerate(e.labels[1:], start=1):
            if lab != D.IGNORE:
                seen += 1
                if seen > limit:
                    end = j
                    break
        out.append(D.Example(tuple(e.input_ids[:end]), tuple(e.labels[:end])))
    return [e for e in out if e.n_label_tokens]


def _reference_losses(model, examples: list[D.Example], pad_id: int, device) -> torch.Tensor:
    """The model's own forward, one example at a time, its head on the target positions only
    (transformers' logits_to_keep; the full logits of one example where a model does not take it)."""
    out = []
    for e in examples:
        batch = {k: v.to(device) for k, v in D.collate([e], pad_id).items()}
        mask = batch["targets"][0] != D.IGNORE
        keep = mask.nonzero()[:, 0]
        try:
            logits = model(input_ids=batch["input_ids"], use_cache=False, logits_to_keep=keep).logits[0]
        except TypeError:  # no logits_to_keep in this model's forward
            logits = model(input_ids=batch["input_ids"], use_cache=False).logits[0, mask]
        out.append(F.cross_entropy(logits.float(), batch["targets"][0, mask], reduction="none"))
    return torch.cat(out)


@torch.no_grad()
def fast_paths(model, examples: list[D.Example], pad_id: int, capacity: int, device, autocast) -> FastPaths:
    """Do the chunked head and the packed layout give the model's own per-token losses on this model?

    Checked on real examples (cut to PACKING_CHECK_TARGETS targets each, the head run that many positions
    at a time, so that this check stays under the training step's memory) at the start of every run, dropout off, no RNG used: a head that is more than a linear
    layer (logit soft-capping) fails `head`; attention that ignores restarting position ids fails `packed`.
    """
    if not examples:
        return FastPaths(False, False)
    was_training = model.training
    model.eval()
    chunk = PACKING_CHECK_TARGETS
    examples = check_examples(examples, chunk)
    try:
        with autocast:
            ref = _reference_losses(model, examples, pad_id, device)
            tol = 1e-3 if ref.dtype == torch.float32 and not torch.is_autocast_enabled(device.type) else 5e-2

            def same(a: torch.Tensor, b: torch.Tensor) -> bool:
                return a.shape == b.shape and bool(torch.allclose(a, b, atol=tol, rtol=tol))

            padded = token_losses(
                model, {k: v.to(device) for k, v in D.collate(examples, pad_id).items()}, fast=True, chunk=chunk
            )
            if not same(padded, ref):
                return FastPaths(False, False)
            packed = token_losses(
                model,
                {k: v.to(device) for k, v in D.collate_packed(examples, pad_id, capacity).items()},
                fast=True,
                chunk=chunk,
            )
        return FastPaths(True, same(packed, _in_packed_order(ref, examples, capacity)))
    except (TypeError, AttributeError, ValueError, RuntimeError):  # the model's forward cannot take this layout
        return FastPaths(False, False)
    finally:
        model.train(was_training)


def _in_packed_order(ref: torch.Tensor, examples: list[D.Example], capacity: int) -> torch.Tensor:
    """Per-token losses in example order → in the order collate_packed lays the examples out."""
    order = [e for row in D.pack_rows(examples, max(capacity, max(len(e.input_ids) for e in examples))) for e in row]
    counts = [e.n_label_tokens for e in examples]
    starts = [sum(counts[:i]) for i in range(len(examples))]
    pos = {id(e): i for i, e in enumerate(examples)}
    return torch.cat([ref[starts[pos[id(e)]] : starts[pos[id(e)]] + counts[pos[id(e)]]] for e in order])


def packing_agrees(model, examples: list[D.Example], pad_id: int, capacity: int, device, autocast) -> bool:
    """Does the packed, head-on-targets path give the model's own per-token losses (fast_paths().packed)?"""
    return fast_paths(model, examples, pad_id, capacity, device, autocast).packed
