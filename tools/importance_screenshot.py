"""Screenshot the Spectra tab's output-importance views of a run for the README.

    .venv/bin/python tools/importance_screenshot.py HOME RUN_ID [docs/screenshots/importance.png]   # needs chromium

The app is started on HOME (its runner is not started: nothing is trained), the Spectra tab opened, the run
picked and "Compute importance" pressed (the real `engine importance` child process, on the run's own data);
the heatmap and the share-by-layer plot are photographed.
"""

from __future__ import annotations

import re
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CHROMIUM = "/usr/bin/chromium"


def main(home: str, run_id: str, out: str = "docs/screenshots/importance.png") -> int:
    from playwright.sync_api import expect, sync_playwright

    from engine.core.jobs import JobRunner
    from storage import Store
    from ui import build_app, launch_kwargs

    store = Store.for_home(home)
    demo = build_app(store, JobRunner(store, Path(home)), home)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs(home))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_role("tab", name="Spectra").click()
            page.locator("#spectra-runs input").first.click()
            page.get_by_role("option", name=re.compile(rf"^#{run_id} ")).click()
            page.keyboard.press("Escape")
            page.locator("#spectra-importance").click()
            heat = page.locator("#importance-heatmap")
            expect(heat).to_contain_text("q_proj", timeout=900_000)  # the module axis: the report has arrived
            time.sleep(3)
            heat.scroll_into_view_if_needed()
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            heat.screenshot(path=out)
            browser.close()
    finally:
        demo.close()
        store.close()
    print(f"{out}: {Path(out).stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
