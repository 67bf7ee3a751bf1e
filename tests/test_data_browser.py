"""In a real browser: Launch with a malformed dataset and a model that does not resolve queues nothing and shows
both reasons (the engine's `check`, asked by the UI before queueing)."""

from __future__ import annotations

import json

import pytest

from tests.test_browser import app_url, out_dir  # noqa: F401  (the app fixture)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_launch_refuses_a_malformed_dataset_and_an_unresolvable_model(app_url, page, request, tmp_path):  # noqa: F811
    from playwright.sync_api import expect

    url, store = app_url
    bad = tmp_path / "broken.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ahoy"}]}
    bad.write_text(json.dumps(good) + "\n{not json}\n")
    page.goto(url)
    expect(page.locator("#launch-btn")).to_be_visible()
    with page.expect_file_chooser() as chooser:
        page.locator("#dataset-upload").click()
    chooser.value.set_files(str(bad))
    expect(page.get_by_text("Stored as broken.jsonl")).to_be_visible(timeout=30_000)
    page.locator("#model-text input, #model-text textarea").first.fill("nobody/no-such-model")

    page.locator("#launch-btn").click()
    msg = page.locator("#launch-msg")
    expect(msg).to_contain_text("Not launched", timeout=180_000)
    expect(msg).to_contain_text("The form has 2 problems")
    expect(msg).to_contain_text("cannot load model 'nobody/no-such-model'")
    expect(msg).to_contain_text("broken.jsonl line 2: not valid JSON")
    page.screenshot(path=str(out_dir(request) / "refused.png"), full_page=True)
    assert store.list_runs() == []  # nothing queued
