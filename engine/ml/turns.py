"""Taking turns: several panes generate on one model, one token each in turn, each with its own RNG state.

engine.ml.generate runs each pane's model.generate() in its own thread; a stopping criterion (TakeTurns)
hands the model to the next pane after every token, so every pane's text equals that adapter alone with
the same seed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable

import torch
from transformers import StoppingCriteria, TextStreamer


class RoundRobin:
    """Whose turn it is among the panes still generating; a pane runs model code only on its turn."""

    def __init__(self, order: list[Hashable]):
        self.order = list(order)
        self.i = 0
        self.cv = threading.Condition()

    def _mine(self, me: Hashable) -> bool:
        return bool(self.order) and self.order[self.i] == me

    def wait(self, me: Hashable) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self._mine(me))

    def pass_on(self, me: Hashable) -> bool:
        """Hand the turn to the next pane and wait for it to come back; True if another pane ran meanwhile."""
        with self.cv:
            if len(self.order) == 1:
                return False
            self.i = (self.i + 1) % len(self.order)
            self.cv.notify_all()
            self.cv.wait_for(lambda: self._mine(me))
            return True

    def leave(self, me: Hashable) -> None:
        with self.cv:
            k = self.order.index(me)
            del self.order[k]
            if k < self.i:
                self.i -= 1
            self.i = self.i % len(self.order) if self.order else 0
            self.cv.notify_all()


class RngState:
    """The global torch RNG state of one pane, kept while the other panes sample."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.cpu_state: torch.Tensor | None = None
        self.cuda_state: torch.Tensor | None = None

    def save(self) -> None:
        self.cpu_state = torch.get_rng_state()
        if self.cuda:
            self.cuda_state = torch.cuda.get_rng_state()

    def restore(self) -> None:
        if self.cpu_state is not None:
            torch.set_rng_state(self.cpu_state)
        if self.cuda_state is not None:
            torch.cuda.set_rng_state(self.cuda_state)


class TakeTurns(StoppingCriteria):
    """A stopping criterion called after every token: stops on Stop, else passes the turn."""

    def __init__(self, turns: RoundRobin, pane: Hashable, stop: threading.Event, on_pause, on_resume):
        self.turns, self.pane, self.stop, self.on_pause, self.on_resume = turns, pane, stop, on_pause, on_resume
        self.stopped = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.stop.is_set():
            self.stopped = True
            return ~done
        if len(self.turns.order) > 1:
            self.on_pause()
            if self.turns.pass_on(self.pane):
                self.on_resume()
        return done


class PaneStreamer(TextStreamer):
    """TextStreamer that hands each finished piece of text to a callback and counts the new tokens."""

    def __init__(self, tok, emit: Callable[[str], None]):
        super().__init__(tok, skip_prompt=True, skip_special_tokens=True)
        self.emit = emit
        self.n_tokens = 0
        self.first_at: float | None = None

    def put(self, value) -> None:
        if not (self.skip_prompt and self.next_tokens_are_prompt):
            self.n_tokens += int(value.numel())
            if self.first_at is None:
                self.first_at = time.perf_counter()
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.emit(text)
