"""The Chat tab in a real browser: two panes (the base model and a run's adapter) on one base model, one
prompt, both panes fill with exactly what that model alone answers. Playwright drives Debian's chromium;
the screenshot goes to test-output/chat/chat.png (and docs/screenshots/chat.png, see below)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import CHROMIUM  # noqa: F401  (the `page` fixture lives in conftest)
from tests.test_chat import finished_run
from tests.test_ui_api import CPU_DOCTOR, free_port

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent

PROMPT = "what is the capital of france ?"


@pytest.fixture
def chat_app(tmp_path, tiny_llama_dir, chat_jsonl):
    """The app on a temporary data home holding one finished tiny run: (url, store, run id, home, chat tab)."""
    from engine.core.jobs import JobRunner
    from storage import Store
    from ui import build_app, launch_kwargs

    home = tmp_path / "home"
    store = Store.for_home(home)
    run_id = finished_run(store, home, tiny_llama_dir, chat_jsonl, name="pirate", lr=3e-2, steps=6)
    runner = JobRunner(store, home, env={"HF_HUB_OFFLINE": "1"})
    built = {}
    import ui.chat_tab as chat_tab

    real_build = chat_tab.build_chat_tab

    def build_and_keep(*args, **kwargs):  # keep the tab's worker to end it after the test
        built["tab"] = real_build(*args, **kwargs)
        return built["tab"]

    chat_tab.build_chat_tab = build_and_keep
    try:
        demo = build_app(store, runner, home, doctor=CPU_DOCTOR)
    finally:
        chat_tab.build_chat_tab = real_build
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs(home))
    try:
        yield f"http://127.0.0.1:{port}/", store, run_id, home, built.get("tab")
    finally:
        demo.close()
        if built.get("tab") is not None:
            built["tab"].worker.close()
        store.close()


def test_two_panes_base_and_adapter_fill_in_the_browser(chat_app, page, tiny_llama_dir):
    from playwright.sync_api import expect

    from engine.core.chat import GenParams
    from engine.ml.generate import ChatModel

    url, store, run_id, home, tab = chat_app
    t0 = time.monotonic()
    page.goto(url)
    page.get_by_role("tab", name="Chat").click()
    expect(page.locator("#chat-send")).to_be_visible()
    expect(page.locator("#chat-bot-2")).to_be_hidden()  # 2 panes by default

    # pane 1: the base model; pane 2: the run's adapter, picked from the dropdown by its label
    label = f"run {run_id} · pirate · loss {store.get_run(run_id).final_loss:.2f}"
    for i, option in ((0, "base model (no adapter)"), (1, label)):
        page.locator(f"#chat-pane-{i} input").first.click()
        page.get_by_role("option", name=option).first.click()
        expect(page.locator(f"#chat-pane-{i} input").first).to_have_value(option)

    page.locator("#chat-prompt textarea").first.fill(PROMPT)
    page.locator("#chat-send").click()
    for i in (0, 1):  # both panes fill (the worker starts, loads the base once, streams both)
        expect(page.locator(f"#chat-stats-{i}")).to_contain_text("tok/s", timeout=180_000)

    # what each pane shows is what that model alone answers with the same settings (UI defaults)
    params = GenParams(max_new_tokens=128, temperature=0.7, top_p=0.95, seed=0)
    messages = [{"role": "user", "content": PROMPT}]
    adapter = store.get_run(run_id).adapter_dir
    base_reply = ChatModel.load(str(tiny_llama_dir), home=home).reply(messages, None, params)
    adapter_reply = ChatModel.load(str(tiny_llama_dir), {"a": adapter}, home=home).reply(messages, "a", params)
    assert base_reply.strip() and adapter_reply.strip() and base_reply != adapter_reply
    expect(page.locator("#chat-bot-0")).to_contain_text(base_reply.strip())
    expect(page.locator("#chat-bot-1")).to_contain_text(adapter_reply.strip())
    expect(page.locator("#chat-bot-0")).to_contain_text(PROMPT)
    expect(page.locator("#chat-status")).to_contain_text(f"adapters: run{run_id}")
    expect(page.locator("#chat-status")).to_contain_text(str(tiny_llama_dir))

    shots = ROOT / "test-output" / "chat"
    shots.mkdir(parents=True, exist_ok=True)
    time.sleep(1)
    page.screenshot(path=str(shots / "chat.png"), full_page=True)
    docs = ROOT / "docs" / "screenshots" / "chat.png"
    if os.environ.get("LORALAB_DOCS_SCREENSHOTS") == "1" or not docs.exists():
        docs.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shots / "chat.png", docs)

    # Unload ends the worker process
    assert tab is not None and tab.worker.running
    page.locator("#chat-unload").click()
    expect(page.locator("#chat-status")).to_contain_text("Unloaded")
    assert not tab.worker.running
    print(f"chat browser flow: {time.monotonic() - t0:.1f} s")
