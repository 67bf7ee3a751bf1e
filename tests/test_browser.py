"""End to end in a real browser: Playwright drives Debian's chromium against the app on a temporary data home.

Fill the Train tab for the tiny model, upload the tiny chat dataset, launch, watch the loss plot and the
status until the run succeeds, find it in History; screenshots of both tabs go to
test-output/<test name>/ (and to docs/screenshots/ with LORALAB_DOCS_SCREENSHOTS=1, see tools/screenshots.py).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import CHROMIUM  # noqa: F401  (the `page` fixture lives in conftest)
from tests.test_ui_api import CPU_DOCTOR, free_port

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def app_url(tmp_path):
    from engine.core.jobs import JobRunner
    from storage import Store
    from ui import build_app, close_tabs, launch_kwargs

    home = tmp_path / "home"
    store = Store.for_home(home)
    runner = JobRunner(store, home, env={"HF_HUB_OFFLINE": "1"})
    runner.start()
    demo = build_app(store, runner, home, doctor=CPU_DOCTOR)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs(home))
    try:
        yield f"http://127.0.0.1:{port}/", store
    finally:
        demo.close()
        close_tabs(demo)
        runner.stop(cancel_running=True, timeout=10)
        store.close()


def out_dir(request) -> Path:
    d = ROOT / "test-output" / request.node.name
    d.mkdir(parents=True, exist_ok=True)
    return d


def fill_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input").first
    box.fill(str(value))
    box.press("Tab")  # blur: Gradio takes the new value


def test_train_and_history_in_the_browser(app_url, page, request, tiny_llama_dir, chat_jsonl):
    from playwright.sync_api import expect

    url, store = app_url
    shots = out_dir(request)
    t0 = time.monotonic()
    page.goto(url)
    expect(page.locator("#launch-btn")).to_be_visible()

    # model: a local folder, inspected by the engine's CLI; then the q,v preset
    page.locator("#model-text input, #model-text textarea").first.fill(str(tiny_llama_dir))
    page.locator("#inspect-btn").click()
    expect(page.get_by_text("LlamaForCausalLM")).to_be_visible(timeout=90_000)
    page.get_by_role("button", name="q,v", exact=True).click()
    expect(page.locator("#estimate")).to_contain_text("Trainable: 1,792", timeout=20_000)  # 2 layers · r 8 · (64 + 48)

    # dataset: upload the tiny chat file through the button
    with page.expect_file_chooser() as chooser:
        page.locator("#dataset-upload").click()
    chooser.value.set_files(str(chat_jsonl))
    expect(page.get_by_text("Stored as chat.jsonl")).to_be_visible()

    # an invalid form: Launch shows every problem at once and queues nothing
    fill_number(page, "train-batch_size", 0)
    fill_number(page, "train-lr", -1)
    page.locator("#launch-btn").click()
    problems = page.locator("#launch-msg")
    expect(problems).to_contain_text("The form has 2 problems")
    expect(problems).to_contain_text("train.batch_size = 0")
    expect(problems).to_contain_text("train.lr = -1")
    expect(page.locator(".toast-body", has_text="train.batch_size = 0")).to_be_visible()  # and as a toast
    page.screenshot(path=str(shots / "validation.png"))
    assert store.list_runs() == []

    for elem_id, value in (
        ("train-max_steps", 10),
        ("train-lr", 0.01),
        ("train-batch_size", 2),
        ("train-max_seq_len", 64),
        ("train-eval_every", 4),
        ("train-save_every", 4),
        ("train-val_split", 0.2),
        ("train-warmup_steps", 1),
    ):
        fill_number(page, elem_id, value)
    page.locator("#run-name input, #run-name textarea").first.fill("browser-run")

    # launch and watch: the loss plot gets a trace, the status counts steps, then says succeeded
    page.locator("#launch-btn").click()
    expect(page.locator("#launch-msg")).to_contain_text("launched", timeout=300_000)  # after `engine check`
    expect(page.locator("#loss-plot .legendtext", has_text="train loss")).to_be_visible(timeout=120_000)
    expect(page.locator("#run-status")).to_contain_text("step", timeout=30_000)
    # a second tab opened mid-run (= closing the page and coming back) re-attaches to the run
    other = page.context.browser.new_page(viewport={"width": 1500, "height": 1000})
    other.goto(url)
    expect(other.locator("#run-status")).to_contain_text("#1 browser-run", timeout=30_000)
    expect(other.locator("#loss-plot .legendtext", has_text="train loss")).to_be_visible(timeout=30_000)
    other.close()
    expect(page.locator("#run-status")).to_contain_text("succeeded", timeout=180_000)
    expect(page.locator("#run-status")).to_contain_text("step 10 / 10")
    time.sleep(2)  # the last redraw of the plots
    page.screenshot(path=str(shots / "train.png"), full_page=True)

    # history: the run is in the table; clicking its row opens it
    page.get_by_role("tab", name="History").click()
    row = page.locator("#runs-table [role=row]", has_text="browser-run")
    expect(row.first).to_be_visible(timeout=20_000)
    expect(row.first).to_contain_text("succeeded")
    row.first.locator("[role=gridcell], td").first.click()
    expect(page.locator("#history-summary")).to_contain_text("browser-run", timeout=20_000)
    page.locator("#compare-ids input").first.click()
    page.get_by_role("option", name="browser-run").first.click()
    expect(page.locator("#compare-plot .legendtext").first).to_be_visible(timeout=20_000)
    page.keyboard.press("Escape")
    page.locator("#history-summary").click()  # close the dropdown's list before the screenshot
    time.sleep(1.5)
    page.screenshot(path=str(shots / "history.png"), full_page=True)

    run = store.list_runs()[0]
    assert run.name == "browser-run" and run.status.value == "succeeded" and run.steps_done == 10
    assert run.config["lora"]["targets"] == ["qv"]
    if os.environ.get("LORALAB_DOCS_SCREENSHOTS") == "1":
        docs = ROOT / "docs" / "screenshots"
        docs.mkdir(parents=True, exist_ok=True)
        for name in ("train.png", "history.png"):
            shutil.copyfile(shots / name, docs / name)
    print(f"browser flow: {time.monotonic() - t0:.1f} s")
