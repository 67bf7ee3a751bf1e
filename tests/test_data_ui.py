"""The web app's side of bringing your own data: where it may read, what the preview says, the estimate's basis,
and a Launch that asks the engine first. Handlers called as plain functions (no browser, no torch)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest

from engine.core.batching import DataFacts, facts_key
from engine.core.config import RunConfig
from storage import Store
from tests.test_ui_forms import FakeRunner, form_with, tiny_anatomy
from ui import backend as B
from ui import calculator_tab as C
from ui import server
from ui import train_form as T

ROOT = Path(__file__).resolve().parent.parent


def test_the_app_reads_datasets_only_from_uploads_and_allowed_folders(tmp_path):
    home, allowed = tmp_path / "home", tmp_path / "corpora"
    (home / "datasets").mkdir(parents=True)
    allowed.mkdir()
    (allowed / "a.jsonl").write_text("{}\n")
    (home / "datasets" / "up.jsonl").write_text("{}\n")
    backend = B.Backend(home, data_dirs=[allowed])
    assert backend.readable_dataset("builtin:persona") == "builtin:persona"
    assert backend.readable_dataset("hf:org/name") == "hf:org/name"
    assert backend.readable_dataset("up.jsonl") == str((home / "datasets" / "up.jsonl").resolve())  # the uploads
    assert backend.readable_dataset(str(allowed / "a.jsonl")) == str((allowed / "a.jsonl").resolve())
    for bad in ("../../x.jsonl", str(ROOT / "requirements.txt"), str(allowed / ".." / "secret.jsonl")):
        with pytest.raises(ValueError) as e:
            backend.readable_dataset(bad)
        msg = str(e.value)
        assert "reads datasets only from its uploads" in msg and str((home / "datasets").resolve()) in msg
        assert str(allowed) in msg and "--data-dir" in msg
    (home / "datasets" / "link.jsonl").symlink_to(ROOT / "requirements.txt")  # a link out is refused too
    with pytest.raises(ValueError):
        backend.readable_dataset(str(home / "datasets" / "link.jsonl"))
    assert ("corpora/a.jsonl", str(allowed / "a.jsonl")) in T.dataset_choices(home, [allowed])


def test_data_dir_flag(tmp_path, capsys):
    args = server.build_parser().parse_args(["--data-dir", str(tmp_path), "--data-dir", str(tmp_path)])
    assert server.check_data_dirs(args.data_dir) == [tmp_path.resolve()] * 2
    assert server.main(["--data-dir", str(tmp_path / "nope")]) == 2
    assert "--data-dir" in capsys.readouterr().err


PREVIEW = {
    "format": "messages",
    "rows": 200,
    "train": 178,
    "val": 20,
    "dropped": {"no response token within max_seq_len (the prompt alone is longer)": 2},
    "tokens_total": 50_000,
    "tokens_kept": 46_000,
    "tokens_truncated": 3_000,
    "tokens_dropped": 1_000,
    "rows_truncated": 30,
    "longest": 2_048,
    "tools": "fallback rendering",
    "notes": ["test.jsonl: not read (split test; set dataset_split to use it)"],
    "len_min": 12,
    "len_p50": 180,
    "len_p95": 512,
    "len_max": 512,
    "max_seq_len": 512,
    "rendered_example": "<|im_start|>user ...",
}


def test_preview_says_what_is_dropped_and_cut_and_warns_with_the_fix():
    md = T.preview_markdown(PREVIEW)
    assert "200 rows → **178 train / 20 val**" in md
    assert "46,000 of 50,000 tokens kept, 3,000 cut by truncation (30 rows)" in md
    assert "Dropped: 2 no response token within max_seq_len" in md
    assert "fallback rendering" in md and "Note: test.jsonl: not read" in md
    assert "⚠ **8.0 % of the data's tokens would be cut: 32 of 200 rows (16 %)" in md
    assert "Raise max_seq_len to 2,048" in md
    fine = {
        **PREVIEW,
        "dropped": {},
        "tokens_truncated": 0,
        "tokens_dropped": 0,
        "rows_truncated": 0,
        "tokens_kept": 50_000,
    }
    assert "⚠" not in T.preview_markdown(fine)


def test_train_estimate_uses_the_previewed_lengths_when_they_match_the_form():
    a = tiny_anatomy()
    form = form_with(model_text=a["model"], batch_size=4, max_seq_len=512)
    values = [form[k] for k in T.FORM_FIELDS]
    cfg = T.config_from_form(form)
    facts = DataFacts(facts_key(cfg), (40, 30, 20, 50, 10), (20, 10, 5, 25, 4)).to_dict()
    doctor = {"device": "cpu", "bf16": False}
    md = T.train_estimate(a, "", doctor, facts, *values)
    assert (
        "sized on the dataset: the largest micro-batch of the data: 1 row ×" in md and "worst case (4 full rows" in md
    )
    stale = T.train_estimate(
        a, "", doctor, facts, *[form_with(model_text=a["model"], max_seq_len=256)[k] for k in T.FORM_FIELDS]
    )
    assert "worst case: 4 full rows of max_seq_len = 256; press **Preview**" in stale


class FakeBackend:
    def __init__(self, home: Path, report: dict):
        self.real, self.report, self.checked = B.Backend(home), report, []

    def readable_dataset(self, d):
        return self.real.readable_dataset(d)

    def check(self, cfg):
        self.checked.append(cfg)
        return self.report


def test_launch_asks_the_engine_and_queues_nothing_it_refuses(tmp_path):
    store = Store.for_home(tmp_path / "home")
    a = tiny_anatomy()
    doctor = {"device": "cpu", "bf16": False, "quant": {}}
    refusal = {
        "ok": False,
        "problems": ["model: cannot load model 'nobody/nothing'", "dataset: bad.jsonl line 2: not valid JSON"],
    }
    backend = FakeBackend(tmp_path / "home", refusal)
    runner = FakeRunner(store)
    form = form_with(model_text=a["model"], targets=[], dataset="builtin:persona")
    with pytest.warns(UserWarning, match="2 problems"):
        msg = T.launch_run(
            a, "qv", doctor, *(form[k] for k in T.FORM_FIELDS), runner=runner, store=store, backend=backend
        )[0]
    assert "cannot load model 'nobody/nothing'" in msg and "bad.jsonl line 2" in msg and runner.submitted == []
    # a typed path outside the allowed places is refused before the engine is asked to read it
    outside = form_with(model_text=a["model"], targets=[], dataset=str(ROOT / "requirements.txt"))
    with pytest.warns(UserWarning):
        msg = T.launch_run(
            a, "qv", doctor, *(outside[k] for k in T.FORM_FIELDS), runner=runner, store=store, backend=backend
        )[0]
    assert "reads datasets only from its uploads" in msg and len(backend.checked) == 1 and runner.submitted == []
    # accepted: queued with the engine's data-based estimate
    backend.report = {"ok": True, "problems": [], "estimate": {"total_gb": 1.25, "trainable_params": 1792}}
    msg = T.launch_run(a, "qv", doctor, *(form[k] for k in T.FORM_FIELDS), runner=runner, store=store, backend=backend)[
        0
    ]
    assert "launched" in msg and runner.submitted[0][2:] == (1.25, 1792)


def test_the_engine_check_failing_is_a_problem_not_a_crash(tmp_path):
    class Broken(FakeBackend):
        def check(self, cfg):
            raise ValueError("`check -` took longer than 300 s and was stopped")

    a = tiny_anatomy()
    form = form_with(model_text=a["model"], targets=[])
    with pytest.warns(UserWarning):
        msg = T.launch_run(
            a,
            "qv",
            {"device": "cpu", "quant": {}},
            *(form[k] for k in T.FORM_FIELDS),
            runner=FakeRunner(),
            store=None,
            backend=Broken(tmp_path, {}),
        )[0]
    assert "the engine could not check the run: `check -` took longer" in msg


def test_calculator_shows_both_bases(tiny_llama_dir, anatomy_of):
    from tests.test_insight_ui import knobs

    anatomy = anatomy_of(tiny_llama_dir)
    facts = {
        "facts": DataFacts("k", (40, 30, 20, 50), (20, 10, 5, 25)).to_dict(),
        "model": anatomy["model"],
        "dataset": "builtin:persona",
        "train_on": "responses",
        "max_seq_len": 512,
    }
    summary = C.calc_panel(anatomy, "cpu", 0, facts, *knobs(batch_size=4, max_seq_len=512))[0]
    assert "**Basis: dataset lengths** (builtin:persona, loss on responses): the largest micro-batch" in summary
    assert "worst case (4 full rows of max_seq_len = 512) →" in summary
    stale = C.calc_panel(anatomy, "cpu", 0, facts, *knobs(max_seq_len=1024))[0]
    assert "**Basis: worst case**" in stale and "press **Measure** again" in stale
    assert "**Measure** a dataset" in C.calc_panel(anatomy, "cpu", 0, None, *knobs())[0]
    with pytest.raises(gr.Error, match="Load a model first"):
        C.measure_dataset(None, "builtin:persona", "responses", 512, backend=None)


def test_run_config_keys_of_the_data():
    a = RunConfig.from_dict({"columns": "prompt=q, response=a"})
    b = RunConfig.from_dict({"columns": {"response": "a", "prompt": "q"}})
    assert facts_key(a) == facts_key(b) != facts_key(a.replace(train={"max_seq_len": 64}))
