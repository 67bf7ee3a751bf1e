"""The Sweeps tab's functions (ui.sweeps_tab, ui.sweep_plots) on a store written in the test: the members
table, val loss against rank with one line per target set, datasets kept to the app's places, and the
Playwright test of the whole tab (launch a 4-member sweep, see the table and the plot)."""

from __future__ import annotations

import time
from functools import partial
from types import SimpleNamespace

import pytest

from storage import RunStatus, Store
from ui import sweeps_tab as T
from ui.backend import Backend


@pytest.fixture
def store(tmp_path):
    s = Store.for_home(tmp_path / "home")
    yield s
    s.close()


def fake_sweep(store, tmp_path):
    """A finished 2 × 2 sweep: val loss falls with rank, all-linear lower than q,v."""
    sid = store.create_sweep("s", {"varied": ["lora.r", "lora.targets"]})
    losses = {(1, "qv"): 2.5, (1, "all-linear"): 2.2, (4, "qv"): 2.0, (4, "all-linear"): 1.5}
    for (r, t), loss in losses.items():
        rid = store.create_run(f"s r={r} targets={t}", {"lora": {"r": r, "targets": [t]}}, tmp_path, sweep_id=sid)
        store.set_out_dir(rid, tmp_path / "home" / "runs" / str(rid))
        store.log_metrics(rid, 2, {"train/loss": loss + 0.1, "val/loss": loss})
        mem = r * (0.1 if t == "qv" else 0.5)
        store.update_run(rid, best_val_loss=loss, final_val_loss=loss, steps_done=2, total_steps=2, peak_mem_gb=mem)
        store.finish(rid, RunStatus.SUCCEEDED)
    return sid


def test_the_sweep_view_shows_members_and_val_loss_against_rank(store, tmp_path):
    sid = fake_sweep(store, tmp_path)
    md, table, xs, fig, curves = T.show_sweep(sid, None, "best_val_loss", store=store)
    assert "4 runs varying lora.r, lora.targets (4 succeeded); lowest val loss: run #4" in md
    assert table["best val"].tolist() == [2.5, 2.2, 2.0, 1.5] and table["step"].tolist() == ["2/2"] * 4
    assert xs["value"] == "lora.r"
    lines = {t.name: (list(t.x), list(t.y)) for t in fig.data}
    assert lines == {"targets=qv": ([1, 4], [2.5, 2.0]), "targets=all-linear": ([1, 4], [2.2, 1.5])}
    assert len([t for t in curves.data if t.name.endswith(" val")]) == 4
    _, _, _, fig, _ = T.show_sweep(sid, "lora.targets", "best_val_loss", store=store)
    assert {t.name: list(t.y) for t in fig.data} == {"r=1": [2.5, 2.2], "r=4": [2.0, 1.5]}
    _, _, _, fig, _ = T.show_sweep(sid, "lora.r", "peak_mem_gb", store=store)  # memory against rank
    assert {t.name: list(t.y) for t in fig.data} == {"targets=qv": [0.1, 0.4], "targets=all-linear": [0.5, 2.0]}
    assert fig.layout.yaxis.title.text == "peak memory (GB)"
    act = partial(T.sweep_action, store=store, runner=SimpleNamespace(store=store), home=tmp_path / "home")
    assert "no member is queued or running" in act("cancel", sid, False)
    assert "tick “Yes, delete its runs”" in act("delete", sid, False) and len(store.list_runs()) == 4
    assert act("delete", sid, True).endswith(f"deleted sweep {sid}") and store.list_runs() == []


def test_a_sweep_from_the_app_reads_data_only_from_its_places(tmp_path):
    backend = Backend(tmp_path / "home")
    ok = T.app_spec("base: {dataset: builtin:persona}\ngrid: {lora.r: [1, 2]}", backend)
    assert ok["base"]["dataset"] == "builtin:persona" and ok["grid"] == {"lora.r": [1, 2]}
    with pytest.raises(ValueError, match="the web app reads datasets only from its uploads"):
        T.app_spec("base: {dataset: /etc/passwd}\ngrid: {lora.r: [1]}", backend)
    with pytest.raises(ValueError, match="write the base run config inline"):
        T.app_spec("base: run.yaml\ngrid: {lora.r: [1]}", backend)
    with pytest.raises(ValueError, match="not valid YAML"):
        T.app_spec("grid: [", backend)


@pytest.mark.browser
@pytest.mark.slow
def test_a_sweep_is_launched_from_the_browser_and_its_table_and_plot_appear(tmp_path, page, tiny_llama_dir, chat_jsonl):
    from playwright.sync_api import expect

    from engine.core.jobs import JobRunner
    from tests.test_ui_api import CPU_DOCTOR, free_port
    from ui import build_app, close_tabs, launch_kwargs
    from ui.backend import save_upload

    home = tmp_path / "home"
    store = Store.for_home(home)
    data = save_upload(chat_jsonl, home)
    runner = JobRunner(store, home, max_concurrent=2, env={"HF_HUB_OFFLINE": "1", "LORALAB_TRAIN_THREADS": "1"})
    runner.start()
    demo = build_app(store, runner, home, doctor=CPU_DOCTOR)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs(home))
    train = "{max_steps: 2, batch_size: 4, val_split: 0.25, eval_every: 2, save_every: 0, lr: 0.01}"
    sweep = (
        f"name: ui-sweep\nbase:\n  model: {tiny_llama_dir}\n  dataset: {data}\n  train: {train}\n"
        "grid:\n  lora.r: [1, 4]\n  lora.targets: [qv, all-linear]\n"
    )
    try:
        page.goto(f"http://127.0.0.1:{port}/")
        page.get_by_role("tab", name="Sweeps").click()
        editor = page.locator("#sweep-yaml .cm-content")
        editor.click()
        page.keyboard.press("Control+A")
        page.keyboard.press("Delete")
        editor.fill(sweep)
        page.locator("#sweep-check").click()
        expect(page.locator("#sweep-plan-msg")).to_contain_text("4 runs, all checked", timeout=120_000)
        assert store.list_runs() == []
        page.locator("#sweep-queue").click()
        expect(page.locator("#sweep-plan-msg")).to_contain_text("queued: 4 runs", timeout=120_000)
        expect(page.locator("#sweep-summary")).to_contain_text("(4 succeeded)", timeout=300_000)
        members = page.locator("#sweep-members")
        for name in ("r=1 targets=qv", "r=4 targets=all-linear"):
            expect(members).to_contain_text(name)
        expect(page.locator("#sweep-plot .legendtext", has_text="targets=qv")).to_be_visible(timeout=30_000)
        expect(page.locator("#sweep-plot .legendtext", has_text="targets=all-linear")).to_be_visible()
        time.sleep(1)
        page.locator("#sweep-plot").screenshot(path=str(tmp_path / "sweep-plot.png"))
    finally:
        demo.close()
        close_tabs(demo)
        runner.stop(cancel_running=True, timeout=10)
        store.close()


def test_the_analyses_section_asks_the_engine_and_draws_its_answer(store, tmp_path):
    from ui import sweep_analyses as A

    sid = fake_sweep(store, tmp_path)
    for rid in (1, 4):  # two members with a saved adapter
        folder = tmp_path / "home" / "runs" / str(rid) / "adapter"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
    assert [i for _, i in A.member_choices(sid, store=store)] == [1, 4]
    asked = []

    class FakeBackend:
        def run(self, args, timeout):
            asked.append(args)
            if args[0] == "phi":
                return {"mean": [[1.0, 0.5], [0.5, 0.25]], "modules": {"a": [], "b": []}}
            kind = {"modules": 2, "r": 4, "delta_fro": 1.0, "proj_fro": 0.05, "w_top_proj_fro": 3.0}
            return {
                "model": "m",
                "kinds": {"q_proj": {**kind, "random_proj_fro": 0.04, "factor": 20.0, "random_factor": 25.0}},
            }

    fig, note = A.phi_view(1, 4, "q_proj", 2, 2, backend=FakeBackend())
    assert asked[-1] == ["phi", "1", "4", "--kind", "q_proj", "--i-max", "2", "--j-max", "2", "--json"]
    assert [list(r) for r in fig.data[0].z] == [[1.0, 0.5], [0.5, 0.25]] and "φ(1, 1) = 1.000" in note
    table, note = A.amplification_view(4, backend=FakeBackend())
    assert asked[-1] == ["amplification", "4", "--json"] and table["factor"].tolist() == [20.0]
