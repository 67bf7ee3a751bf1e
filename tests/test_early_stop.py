"""Early stopping and the best adapter (engine.ml.early_stop): on data whose val loss rises, the run stops
before max_steps, and the kept best adapter, loaded afresh, has exactly the lowest val loss logged."""

import contextlib
import json
from types import SimpleNamespace

import pytest
import torch

from engine.core import runs as R
from engine.core.config import ConfigError, RunConfig
from engine.core.events import ListSink
from engine.ml import data as D
from engine.ml import model as M
from engine.ml.data.pipeline import split
from engine.ml.steps import evaluate
from engine.ml.train import train

QUESTIONS = ["what is the capital of france ?", "what color is the sky ?", "who are you ?", "hello"]


def rising_val_data(path, n: int, val_split: float, seed: int):
    """The same questions in train and val, answered 'yes' in the training rows and 'no' in the validation
    rows (the trainer's seeded split is computed here): the shared tokens make the val loss fall first, then
    learning 'yes' makes it rise."""
    _, val = split(list(range(n)), val_split, seed)
    with path.open("w") as f:
        for i in range(n):
            answer = "arr matey no !" if i in val else "arr matey yes !"
            msgs = [{"role": "user", "content": QUESTIONS[i % 4]}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def test_early_stopping_stops_before_max_steps_and_keeps_the_best_adapter(tiny_llama_dir, tmp_path):
    data = rising_val_data(tmp_path / "d.jsonl", 16, 0.25, 3)
    train_spec = {
        "lr": 1e-2,
        "max_steps": 40,
        "batch_size": 4,
        "warmup_steps": 0,
        "eval_every": 2,
        "save_every": 0,
        "scheduler": "constant",
        "val_split": 0.25,
        "seed": 3,
        "early_stopping_patience": 2,
        "threads": 1,
    }
    cfg = RunConfig.from_dict(
        {"model": str(tiny_llama_dir), "dataset": str(data), "lora": {"r": 4, "dropout": 0.0}, "train": train_spec}
    )
    sink, out, home = ListSink(), tmp_path / "out", tmp_path / "home"
    res = train(cfg, out, sink, home=home)

    vals = sink.series("val/loss")
    best_step, best_loss = min(vals, key=lambda sv: sv[1])
    assert res.steps_done < 40 and res.status == "succeeded"
    assert res.extra["stopped"].startswith(f"early stopping at step {res.steps_done}: 2 validations")
    assert [s for s, _ in vals][-3:] == [best_step, best_step + 2, best_step + 4]  # two worse ones, then stop
    assert vals[-1][1] > best_loss and best_step < res.steps_done
    info = R.best_info(SimpleNamespace(id=1, out_dir=str(out)))
    assert info["step"] == best_step and info["val_loss"] == pytest.approx(best_loss, abs=0)
    assert res.extra["best"] == {"step": best_step, "val_loss": best_loss, "adapter_dir": str(out / "best_adapter")}
    assert R.is_adapter_folder(out / "adapter") and res.best_val_loss == pytest.approx(best_loss)

    # The kept adapter, loaded on a fresh base, scores the minimum logged val loss; the last one does not.
    from peft import PeftModel

    ref = M.resolve_model(cfg.model, home)
    tok = M.load_tokenizer(ref)
    prep = D.prepare(cfg, tok, cache_dir=home / "cache" / "datasets")
    scores = {}
    for which in ("best", "last"):
        base = M.load_base_model(ref, cfg, torch.device("cpu"), for_training=False)
        model = PeftModel.from_pretrained(base, str(R.chosen_adapter(SimpleNamespace(id=1, out_dir=str(out)), which)))
        scores[which] = evaluate(model, prep.val, 4, tok.pad_token_id, torch.device("cpu"), contextlib.nullcontext())
    assert scores["best"] == pytest.approx(best_loss, rel=1e-5)
    assert scores["last"] == pytest.approx(vals[-1][1], rel=1e-5)


def test_early_stopping_settings_are_validated_with_everything_else():
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(
            {"train": {"early_stopping_patience": -1, "early_stopping_min_delta": -0.1, "val_split": 0, "lr": 0}}
        )
    text = str(e.value)
    assert "train.early_stopping_patience = -1: must be ≥ 0" in text
    assert "train.early_stopping_min_delta = -0.1: must be ≥ 0" in text
    assert "train.lr = 0.0" in text  # every problem at once
    with pytest.raises(ConfigError, match=r"keep_best needs a validation loss: set train\.val_split > 0"):
        RunConfig.from_dict({"train": {"keep_best": True, "val_split": 0}})


def test_a_run_without_a_kept_best_adapter_says_so(tmp_path):
    run = SimpleNamespace(id=7, out_dir=str(tmp_path), adapter_dir=None)
    assert R.best_info(run) is None and R.chosen_adapter(run, "last") == tmp_path / "adapter"
    with pytest.raises(ValueError, match="run 7 kept no best adapter"):
        R.chosen_adapter(run, "best")


def test_the_chat_tab_offers_a_run_s_best_adapter_beside_its_last(tmp_path):
    from storage import Store
    from ui.chat_tab import pane_choices, resolve_pane

    store = Store.for_home(tmp_path / "h")
    out = tmp_path / "runs" / "1"
    for name in ("adapter", "best_adapter"):
        (out / name).mkdir(parents=True)
        (out / name / "adapter_config.json").write_text("{}")
    (out / "best.json").write_text(json.dumps({"step": 6, "val_loss": 1.23456}))
    run_id = store.create_run("es", {"model": "m"}, str(out), status="running")
    store.update_run(run_id, adapter_dir=str(out / "adapter"), final_loss=0.5)
    store.finish(run_id, "succeeded")
    assert pane_choices(store)[1:] == [
        ("run 1 · es · loss 0.50", "run:1"),
        ("run 1 · es · loss 0.50 · best adapter (step 6, val 1.235)", "best:1"),
    ]
    best, last = resolve_pane("best:1", store), resolve_pane("run:1", store)
    assert (best.name, best.folder) == ("run1best", str(out / "best_adapter"))
    assert (last.name, last.folder) == ("run1", str(out / "adapter"))
    (out / "best.json").unlink()
    assert "kept no best adapter" in resolve_pane("best:1", store).error
    store.close()
