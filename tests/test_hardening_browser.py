"""The UI bugs a new user hit, in a real browser (Debian's chromium through Playwright), on one app:

- History → Delete without the confirmation is a message; the table and pickers stay usable (item 12)
- a run that ends shows up in the Chat and Spectra pickers without pressing ↻ (item 13)
- launching a second run keeps the live view, and Cancel, on the running one (item 15)
- the progress bar moves and the log tail shows the end of train.log (item 17)

Training runs are the real job queue and CLI with the stand-in trainer of tests/test_reconcile.py
(FAKE_TRAIN=steps: it logs a step every FAKE_STEP_S s, then saves an adapter folder and a spectrum).
"""

from __future__ import annotations

import os
import re
import sys
import time

import pytest

from engine.core.config import RunConfig
from storage import RunStatus, Store
from tests.conftest import CHROMIUM  # noqa: F401  (the `page` fixture lives in conftest)
from tests.test_reconcile import SHIM
from tests.test_ui_api import CPU_DOCTOR, free_port

pytestmark = [pytest.mark.browser, pytest.mark.slow]

STEPS = 400  # 5 min at 0.75 s a step: still running after a second Launch (its `engine check`) on a loaded machine; cancelled by the test


def ended_run(store: Store, home, name: str) -> int:
    """A run as the training child leaves it at its end: adapter saved, spectra stored, `succeeded`."""
    run_id = store.create_run(name, RunConfig().to_dict(), "")
    adapter = home / "runs" / str(run_id) / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    store.set_out_dir(run_id, adapter.parent)
    store.mark_running(run_id, os.getpid())
    store.save_spectra(run_id, 5, {"model.layers.0.self_attn.q_proj": [1.0, 0.5]})
    store.update_run(run_id, adapter_dir=str(adapter), final_loss=1.25, steps_done=5, total_steps=5)
    store.finish(run_id, RunStatus.SUCCEEDED)
    return run_id


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from engine.core.jobs import JobRunner
    from ui import build_app, close_tabs, launch_kwargs

    root = tmp_path_factory.mktemp("ui-bugs")
    fake = root / "fake-python"
    fake.write_text(SHIM.format(python=sys.executable))
    fake.chmod(0o755)
    home = root / "home"
    store = Store.for_home(home)
    env = {"FAKE_TRAIN": "steps", "FAKE_STEPS": str(STEPS), "FAKE_STEP_S": "0.75"}
    runner = JobRunner(store, home, python=str(fake), poll_s=0.1, env=env)
    runner.start()
    ended_run(store, home, "earlier")
    demo = build_app(store, runner, home, doctor=CPU_DOCTOR)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs(home))
    yield f"http://127.0.0.1:{port}/", store, home
    demo.close()
    close_tabs(demo)
    runner.stop(cancel_running=True, timeout=10)
    store.close()


def error_overlays(page) -> int:
    """Gradio's red "Error" status over an output whose event raised."""
    return page.get_by_text("Error", exact=True).count()


def test_delete_without_confirmation_is_a_message_and_the_page_stays_usable(app, page):
    from playwright.sync_api import expect

    url, store, home = app
    victim = ended_run(store, home, "to-delete")
    page.goto(url)
    page.get_by_role("tab", name="History").click()
    row = page.locator("#runs-table [role=row]", has_text="to-delete")
    expect(row.first).to_be_visible(timeout=20_000)
    row.first.locator("[role=gridcell], td").first.click()
    expect(page.locator("#history-summary")).to_contain_text("to-delete", timeout=20_000)
    page.get_by_text("Delete this run").click()
    page.locator("#delete-btn").click()
    expect(page.locator("#delete-msg")).to_contain_text("Not deleted", timeout=20_000)
    expect(page.locator(".toast-body", has_text="Tick")).to_be_visible()
    time.sleep(1)
    assert error_overlays(page) == 0
    expect(page.locator("#runs-table")).to_contain_text("to-delete")  # the table is still there, and usable:
    page.locator("#delete-confirm input").check()
    page.locator("#delete-btn").click()
    expect(page.locator("#delete-msg")).to_contain_text(f"Deleted run #{victim}", timeout=20_000)
    expect(page.locator("#runs-table")).not_to_contain_text("to-delete")
    assert error_overlays(page) == 0 and not (home / "runs" / str(victim)).exists()


def test_a_run_that_ends_appears_in_chat_and_spectra_without_refresh(app, page):
    from playwright.sync_api import expect

    url, store, home = app
    before = ended_run(store, home, "before-load")  # ended after the app was built, before the page opened
    page.goto(url)
    page.get_by_role("tab", name="Chat").click()
    expect(page.locator("#chat-send")).to_be_visible()
    after = ended_run(store, home, "while-open")  # ends while the page is open
    page.locator("#chat-pane-1 input").first.click()
    for run_id, name in ((before, "before-load"), (after, "while-open")):
        option = page.get_by_role("option", name=re.compile(rf"^run {run_id} · {name}"))
        expect(option).to_be_visible(timeout=20_000)
    page.keyboard.press("Escape")
    page.get_by_role("tab", name="Spectra").click()
    page.locator("#spectra-runs input").first.click()
    for run_id, name in ((before, "before-load"), (after, "while-open")):
        expect(page.get_by_role("option", name=re.compile(rf"^#{run_id} {name}"))).to_be_visible(timeout=20_000)
    page.keyboard.press("Escape")


def test_a_second_launch_keeps_the_live_view_on_the_running_run_and_the_bar_moves(app, page):
    from playwright.sync_api import expect

    url, store, _ = app
    page.goto(url)
    msg, status = page.locator("#launch-msg"), page.locator("#run-status")
    newest = store.list_runs(limit=1)[0]
    expect(status).to_contain_text(f"#{newest.id} {newest.name}", timeout=20_000)  # the page load has attached
    page.locator("#launch-btn").click()
    expect(msg).to_contain_text("launched", timeout=300_000)
    first = int(re.search(r"#(\d+)", msg.inner_text()).group(1))
    expect(status).to_contain_text(f"#{first}", timeout=20_000)
    expect(status).to_contain_text("running", timeout=30_000)
    bar = page.locator("#run-progress [role=progressbar]")
    expect(bar).to_have_attribute("aria-valuemax", str(STEPS), timeout=20_000)
    expect(bar).to_have_attribute("aria-valuenow", re.compile(r"^[1-9]\d*$"), timeout=20_000)
    seen = int(bar.get_attribute("aria-valuenow"))

    page.locator("#launch-btn").click()  # a second run, queued behind the first
    expect(msg).to_contain_text(f"stays on the running run #{first}", timeout=300_000)
    second = int(re.search(r"#(\d+)", msg.inner_text()).group(1))
    assert second != first and store.get_run(second).status is RunStatus.QUEUED
    expect(page.locator("#queue")).to_contain_text(f"#{second}")
    expect(page.locator("#run-select input").first).to_have_value(re.compile(rf"^#{first} "))
    expect(status).to_contain_text(f"#{first}")

    deadline = time.monotonic() + 30  # the bar moves with the steps, and says how long is left
    target = max(seen + 3, 15)  # past the first 12 log lines too
    while int(bar.get_attribute("aria-valuenow")) <= target and time.monotonic() < deadline:
        time.sleep(0.5)
    assert int(bar.get_attribute("aria-valuenow")) > target and "ETA" in bar.inner_text()
    width = float(re.search(r"width: ([\d.]+)%", bar.inner_html()).group(1))
    assert 0 < width < 100
    # the log tail is the end of train.log: the newest step lines, not the launch command at its head
    log = page.locator("#log-tail textarea")
    expect(log).to_have_value(re.compile(rf"step \d+/{STEPS} \| loss [\d.]+[^\n]*$"), timeout=20_000)
    expect(log).not_to_have_value(re.compile("=== "), timeout=10_000)
    assert len(log.input_value().splitlines()) == 12

    page.locator("#cancel-btn").click()  # Cancel targets the run in view: the running one
    expect(page.locator("#run-action")).to_contain_text(f"run {first}", timeout=20_000)
    expect(status).to_contain_text(f"#{first}", timeout=20_000)
    deadline = time.monotonic() + 30
    while not store.get_run(first).is_terminal and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (
        store.get_run(first).status is RunStatus.CANCELLED and store.get_run(second).status is not RunStatus.CANCELLED
    )
    expect(status).to_contain_text(f"#{second}", timeout=30_000)  # the first ended: the view follows the next
