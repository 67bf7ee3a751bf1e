"""The History tab's Compare outcomes section (ui.compare_panel) without a browser: the model choices hold a
run's last and best adapters, the engine command it builds, and the tables and CSV it shows from the result;
and History's adapter download offering the best adapter beside the last."""

from __future__ import annotations

import json

import pytest

from engine.core import compare as C
from storage import RunStatus, Store
from ui import compare_panel as P
from ui.backend import Backend


@pytest.fixture
def store(tmp_path):
    s = Store.for_home(tmp_path / "home")
    yield s
    s.close()


def finished_with_best(store, home) -> int:
    rid = store.create_run("tiny", {"model": "m", "dataset": "d.jsonl"}, home)
    out = home / "runs" / str(rid)
    for name in ("adapter", "best_adapter"):
        (out / name).mkdir(parents=True)
        (out / name / "adapter_config.json").write_text("{}")
        (out / name / "adapter_model.safetensors").write_bytes(name.encode())
    (out / "best.json").write_text(json.dumps({"step": 4, "val_loss": 1.5}))
    store.set_out_dir(rid, str(out))
    store.update_run(rid, adapter_dir=str(out / "adapter"))
    store.finish(rid, RunStatus.SUCCEEDED)
    return rid


class FakeBackend(Backend):
    def __init__(self, home, result):
        super().__init__(home)
        self.result, self.calls = result, []

    def run(self, args, timeout):
        self.calls.append(list(args))
        return self.result


def test_compare_section_offers_best_builds_the_command_and_shows_the_result(store, tmp_path):
    home = tmp_path / "home"
    rid = finished_with_best(store, home)
    choices = [v for _, v in P.refresh_models(["gone"], store=store)["choices"]]
    assert choices == ["base", f"run:{rid}", f"best:{rid}"]
    backend = Backend(home)
    args = P.compare_args(["base", f"best:{rid}"], "val", "", 8, 3, backend=backend, home=home)
    csv_path = str(home / "exports" / f"compare-runs-{rid}.csv")
    assert args == ["compare", "--runs", f"best:{rid}", "--base", "--val", "--max-new-tokens", "8", "--limit", "3"] + [
        "--csv",
        csv_path,
        "--json",
    ]
    with pytest.raises(ValueError, match="uploads"):
        P.compare_args([f"run:{rid}"], "file", "/etc/passwd", 8, 3, backend=backend, home=home)
    with pytest.raises(ValueError, match="at least one run"):
        P.compare_args(["base"], "val", "", 8, 3, backend=backend, home=home)

    keys = ["base", f"best:{rid}"]
    prompts = [
        {"prompt": "hi", "reference": "ahoy", "outputs": {k: C.score_output("ahoy", "ahoy", 1.0, 2) for k in keys}},
        {
            "prompt": "who",
            "reference": "a pirate",
            "outputs": {k: C.score_output("me", "a pirate", 3.0, 2) for k in keys},
        },
    ]
    result = {
        "base_model": "m",
        "source": "2 validation rows of d.jsonl",
        "models": keys,
        "labels": {"base": "base", f"best:{rid}": f"#{rid} tiny (best)"},
        "prompts": prompts,
        "scores": C.summarize(prompts, keys),
        "stored": [str(home / "runs" / str(rid) / "compare.json")],
        "csv": csv_path,
    }
    fake = FakeBackend(home, result)
    md, scores, side, csv = P.compare_outcomes(keys, "val", "", 8, 0, backend=fake, home=home)
    assert fake.calls[0][:3] == ["compare", "--runs", f"best:{rid}"]
    assert "**2 prompts**" in md and "compare.json" in md
    assert scores["model"].tolist() == ["base", f"#{rid} tiny (best)"]
    assert scores["exact match"].tolist() == [0.5, 0.5] and scores["perplexity"].tolist() == [2.718, 2.718]
    assert list(side.columns) == ["#", "prompt", "reference", "base", f"#{rid} tiny (best)"]
    assert side["reference"].tolist() == ["ahoy", "a pirate"] and csv["value"] == csv_path
    md, *_ = P.compare_outcomes([], "val", "", 8, 0, backend=fake, home=home)
    assert len(fake.calls) == 1  # nothing chosen: no engine call, a warning instead


def test_history_downloads_the_best_adapter_beside_the_last(store, tmp_path):
    import zipfile

    import gradio as gr

    from ui import history_tab as H

    home = tmp_path / "home"
    rid = finished_with_best(store, home)
    assert [v for _, v in H.adapter_choices(rid, store=store)["choices"]] == ["last", "best"]
    assert "step 4, val 1.500" in H.adapter_choices(rid, store=store)["choices"][1][0]
    best = H.download_adapter(rid, "best", store=store, home=home)["value"]
    last = H.download_adapter(rid, "last", store=store, home=home)["value"]
    assert best.endswith(f"run-{rid}-best-adapter.zip") and last.endswith(f"run-{rid}-adapter.zip")
    assert zipfile.ZipFile(best).read("adapter_model.safetensors") == b"best_adapter"
    assert zipfile.ZipFile(last).read("adapter_model.safetensors") == b"adapter"
    assert "best validation step" in zipfile.ZipFile(best).read("README.md").decode()
    (home / "runs" / str(rid) / "best.json").unlink()
    assert [v for _, v in H.adapter_choices(rid, store=store)["choices"]] == ["last"]
    with pytest.raises(gr.Error, match="kept no best adapter"):
        H.download_adapter(rid, "best", store=store, home=home)
