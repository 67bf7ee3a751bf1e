"""The README screenshot tools' shared start-up: the app on a data home (its runner not started: nothing is
trained) and a headless chromium page on it."""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CHROMIUM = "/usr/bin/chromium"


@contextlib.contextmanager
def app_page(home: str, width: int = 1400, height: int = 1000) -> Iterator:
    """A Playwright page on the app served from `home`; the server and the browser are closed afterwards."""
    from playwright.sync_api import sync_playwright

    from engine.core.jobs import JobRunner
    from storage import Store
    from ui import build_app, launch_kwargs

    store = Store.for_home(home)
    demo = build_app(store, JobRunner(store, Path(home)), home)  # the Train tab asks `engine doctor` itself
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs(home))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(f"http://127.0.0.1:{port}/")
            yield page
            browser.close()
    finally:
        demo.close()
        store.close()
