"""Which micro-batches a run trains on, from token lengths alone; stdlib only.

    order = epoch_order(n, seed, epoch)                  # the shuffled example order of one epoch
    rows = pack_lengths([5, 3, 4, 2], capacity=7)        # first-fit decreasing → [[0, 3], [2, 1]]
    steps = total_steps(n_train, cfg.train, world=2)     # optimizer steps of a run on 2 processes
    for global_step in step_micro_batches(n, b, seed, per_step=world * grad_accum):
        mine = rank_share(global_step, rank, world)      # this process's grad_accum micro-batches of the step
    shapes = run_batch_shapes(facts, cfg.train)          # the largest micro-batches the run will build

engine/ml/train.py trains on exactly these micro-batches (engine.ml.data.batching collates them into
tensors), and engine.core.estimate sizes its memory estimate on the largest of them, so the trainer and
the estimator cannot disagree about what a micro-batch holds. DataFacts carries a prepared dataset's
token lengths from the engine (`engine preview --facts`, `engine check`) to the estimator as plain numbers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.core.config import RunConfig, TrainSpec

# Beyond this many micro-batches the estimate looks at the first MAX_SCANNED of the run (several epochs of
# any dataset that fits a laptop); the largest micro-batch of a long run is found well before that.
MAX_SCANNED = 50_000


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Shuffled example order of one epoch; a pure function of (seed, epoch) so resume is exact."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def micro_batches(n_examples: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless stream of micro-batches (lists of example indices), epoch after epoch."""
    epoch = 0
    while True:
        order = epoch_order(n_examples, seed, epoch)
        for i in range(0, len(order), batch_size):
            yield order[i : i + batch_size]
        epoch += 1


def pack_lengths(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: group items (by index) into rows of at most `capacity` tokens.

    Longest first (ties keep their order); each goes into the first row with room, else a new row.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def total_steps(n_train: int, tr: TrainSpec, world: int = 1) -> int:
    """Optimizer steps of a run: max_steps, or the epochs over micro-batches of batch_size, grad_accum each on
    each of `world` processes (a step trains world × grad_accum micro-batches)."""
    micro_per_epoch = math.ceil(n_train / tr.batch_size)
    return tr.max_steps or max(1, math.ceil(tr.epochs * micro_per_epoch / (tr.grad_accum * world)))


def step_micro_batches(n_examples: int, batch_size: int, seed: int, per_step: int, start: int = 0):
    """The micro-batch stream grouped by optimizer step: lists of `per_step` micro-batches (world × grad_accum),
    after skipping the first `start` micro-batches of the stream (those a resumed run already trained on).

    The stream does not depend on the number of processes: 2 processes × grad_accum 1 train, step by step, on
    the micro-batches 1 process × grad_accum 2 trains on, and a resume continues the stream where it stopped.
    """
    stream = micro_batches(n_examples, batch_size, seed)
    for _ in range(start):
        next(stream)
    while True:
        yield [next(stream) for _ in range(per_step)]


def rank_share(step: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """Process `rank`'s micro-batches of one step: the rank-th of `world` equal, disjoint, consecutive slices."""
    k = len(step) // world
    return step[rank * k : (rank + 1) * k]


# ---- what the estimator needs to know about a dataset ------------------------------------------------------


@dataclass(frozen=True)
class DataFacts:
    """The training split of a prepared dataset, as token counts: one length and one target count per example.

    `key` names what the numbers depend on (facts_key of the config they were made for), so that a UI can
    tell whether they still describe the form's config.
    """

    key: str
    lengths: tuple[int, ...]  # tokens per training example, after truncation (the trainer's order)
    targets: tuple[int, ...]  # positions with a loss target per example (Example.n_label_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "lengths": list(self.lengths), "targets": list(self.targets)}

    def clipped(self, max_seq_len: int) -> DataFacts:
        """The same examples truncated to max_seq_len, targets scaled with their length (an approximation:
        where in a row its targets lie is not kept)."""
        if max(self.lengths) <= max_seq_len:
            return self
        lengths = tuple(min(n, max_seq_len) for n in self.lengths)
        targets = tuple(min(t, m - 1, round(t * m / n)) for t, m, n in zip(self.targets, lengths, self.lengths))
        return DataFacts(f"{self.key} clipped to {max_seq_len}", lengths, targets)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataFacts:
        lengths, targets = tuple(int(x) for x in d["lengths"]), tuple(int(x) for x in d["targets"])
        if len(lengths) != len(targets) or not lengths:
            raise ValueError("data facts need one length and one target count per example, and at least one example")
        return cls(str(d.get("key", "")), lengths, targets)


def facts_key(cfg: RunConfig) -> str:
    """Everything a dataset's token lengths depend on: the data, how it is read, the tokenizer, the split."""
    tr = cfg.train
    parts = (
        cfg.model,
        cfg.dataset,
        cfg.dataset_format,
        cfg.dataset_split,
        cfg.dataset_subset,
        cfg.text_split,
        sorted(cfg.columns),
        cfg.train_on,
        cfg.max_examples,
        tr.max_seq_len,
        tr.val_split,
        tr.seed,
    )
    return repr(parts)


@dataclass(frozen=True)
class BatchShape:
    """One micro-batch as the trainer lays it out: `rows` × `length` token slots, `targets` loss positions."""

    rows: int
    length: int
    targets: int
    masked: bool  # transformers builds an attention mask (a restart inside a row, or padding)
    tokens: int  # real tokens (the rest of rows × length is padding)


def batch_shape(lengths: Sequence[int], targets: Sequence[int], packing: bool, capacity: int) -> BatchShape:
    """The layout engine.ml.data.batching gives these examples: packed rows (collate_packed) or padding (collate)."""
    n_tokens, n_targets = sum(lengths), sum(targets)
    if not packing:
        T = max(lengths)
        return BatchShape(len(lengths), T, n_targets, len(lengths) > 1, n_tokens)
    rows = pack_lengths(lengths, max(capacity, max(lengths)))
    L = max(sum(lengths[i] for i in row) for row in rows)
    # A row with a second example, or with a pad tail, restarts its position ids: transformers then builds
    # the block-diagonal mask (engine.core.memory). One full-length example per row needs none.
    masked = any(len(row) > 1 or sum(lengths[i] for i in row) < L for row in rows)
    return BatchShape(len(rows), L, n_targets, masked, n_tokens)


def run_batch_shapes(facts: DataFacts, tr: TrainSpec) -> tuple[list[BatchShape], int]:
    """The micro-batches the run will train on, reduced to those no other one dominates, and how many were
    scanned. Memory grows with rows, length and targets, so the largest micro-batch is among these."""
    n = len(facts.lengths)
    n_micro = total_steps(n, tr) * tr.grad_accum  # every process trains micro-batches of this stream
    stream = micro_batches(n, tr.batch_size, tr.seed)
    seen: dict[tuple[int, int, int, bool], BatchShape] = {}
    scanned = min(n_micro, MAX_SCANNED)
    for _ in range(scanned):
        mb = next(stream)
        s = batch_shape([facts.lengths[i] for i in mb], [facts.targets[i] for i in mb], tr.packing, tr.max_seq_len)
        seen.setdefault((s.rows, s.length, s.targets, s.masked), s)
    return pareto(list(seen.values())), scanned


def pareto(shapes: list[BatchShape]) -> list[BatchShape]:
    """The distinct shapes that no other shape matches or exceeds in rows, length, targets and mask at once.

    Per (rows, mask) group a sweep keeps the (length, targets) staircase; the few survivors of all groups
    are then compared pairwise.
    """
    groups: dict[tuple[int, bool], list[BatchShape]] = {}
    for s in shapes:
        groups.setdefault((s.rows, s.masked), []).append(s)
    survivors: list[BatchShape] = []
    for group in groups.values():
        best = -1
        for s in sorted(group, key=lambda s: (-s.length, -s.targets)):
            if s.targets > best:
                survivors.append(s)
                best = s.targets

    def key(s: BatchShape) -> tuple[int, int, int, bool]:
        return (s.rows, s.length, s.targets, s.masked)

    def dominated(a: BatchShape, b: BatchShape) -> bool:
        return all(x >= y for x, y in zip(key(b), key(a))) and key(b) != key(a)

    unique = list({key(s): s for s in survivors}.values())
    front = [a for a in unique if not any(dominated(a, b) for b in unique)]
    return sorted(front, key=lambda s: (-s.rows * s.length, -s.targets))


def packing_check_shape(facts: DataFacts, examples: int) -> tuple[int, int, int]:
    """(examples, longest, targets) of the start-up packing check on the first `examples` training examples."""
    k = min(examples, len(facts.lengths))
    return k, max(facts.lengths[:k]), sum(facts.targets[:k])
