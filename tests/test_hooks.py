"""The training loop's extension points (engine.ml.hooks): each moment is reached, a loss term reaches the
gradients, and a hook's stop ends the run cleanly with the adapter saved."""

import pytest
import torch

from engine.core.config import RunConfig
from engine.core.events import ListSink
from engine.ml import hooks as H
from engine.ml.train import train


class Recorder(H.TrainHook):
    def __init__(self, stop_at=None, term=None):
        self.calls, self.stop_at, self.term, self.vals = [], stop_at, term, []

    def on_start(self, state):
        self.calls.append(("start", state.step, state.total_steps))

    def loss_term(self, state):
        return None if self.term is None else torch.tensor(self.term)

    def after_step(self, state):
        self.calls.append(("step", state.step))
        if self.stop_at is not None and state.step >= self.stop_at:
            state.stop_reason = f"stopped by the test at step {state.step}"

    def after_eval(self, state, val_loss):
        self.vals.append((state.step, val_loss))
        state.summary["evals_seen"] = len(self.vals)

    def on_end(self, state):
        self.calls.append(("end", state.step))


@pytest.fixture
def with_hook(monkeypatch):
    def install(hook):
        monkeypatch.setattr(H, "FACTORIES", [("recorder", lambda cfg: hook)])
        return hook

    return install


def cfg_for(model_dir, data, **train):
    t = {
        "lr": 1e-2,
        "max_steps": 6,
        "batch_size": 4,
        "warmup_steps": 0,
        "eval_every": 2,
        "save_every": 0,
        "scheduler": "constant",
        "val_split": 0.2,
        "seed": 3,
        **train,
    }
    return RunConfig.from_dict({"model": str(model_dir), "dataset": str(data), "lora": {"r": 4}, "train": t})


def test_every_moment_is_reached_and_a_stop_ends_the_run_cleanly(tiny_llama_dir, chat_jsonl, tmp_path, with_hook):
    hook = with_hook(Recorder(stop_at=3))
    sink = ListSink()
    res = train(cfg_for(tiny_llama_dir, chat_jsonl), tmp_path / "out", sink, home=tmp_path / "home")
    assert hook.calls == [("start", 0, 6), ("step", 1), ("step", 2), ("step", 3), ("end", 3)]
    assert res.status == "succeeded" and res.steps_done == 3 and (tmp_path / "out" / "adapter").is_dir()
    assert res.extra["stopped"] == "stopped by the test at step 3" and res.extra["evals_seen"] == 1
    assert [s for s, _ in hook.vals] == [2] and hook.vals[0][1] == pytest.approx(sink.series("val/loss")[0][1])


def test_a_loss_term_is_added_to_every_micro_batch(tiny_llama_dir, chat_jsonl, tmp_path, with_hook):
    """A constant added to each micro-batch's loss, scaled by 1/grad_accum, shifts the logged step loss by it
    and leaves the gradients (hence the whole curve) unchanged."""
    cfg = cfg_for(tiny_llama_dir, chat_jsonl, grad_accum=2, max_steps=3, val_split=0.0)
    with_hook(Recorder())
    plain = ListSink()
    train(cfg, tmp_path / "a", plain, home=tmp_path / "home")
    with_hook(Recorder(term=0.5))
    shifted = ListSink()
    train(cfg, tmp_path / "b", shifted, home=tmp_path / "home")
    for (_, a), (_, b) in zip(plain.series("train/loss"), shifted.series("train/loss"), strict=True):
        assert b == pytest.approx(a + 0.5, rel=1e-5)
