"""Screenshot the Sweeps tab of a data home for the README: its newest sweep's table and val-loss plot.

    .venv/bin/python tools/sweep_screenshot.py HOME [docs/screenshots/sweep.png]   # needs Debian's chromium

The app is started on HOME (nothing is trained: its runner is not started), the Sweeps tab opened and the
members table with the plot below it photographed.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CHROMIUM = "/usr/bin/chromium"


def main(home: str, out: str = "docs/screenshots/sweep.png") -> int:
    from playwright.sync_api import expect, sync_playwright

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
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_role("tab", name="Sweeps").click()
            expect(page.locator("#sweep-plot .legendtext").first).to_be_visible(timeout=60_000)
            time.sleep(2)
            box = page.locator("#sweep-summary").bounding_box()
            plot = page.locator("#sweep-plot").bounding_box()
            clip = {"x": 0, "y": box["y"] - 10, "width": 1400, "height": plot["y"] + plot["height"] - box["y"] + 20}
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=out, clip=clip, full_page=True)
            browser.close()
    finally:
        demo.close()
        store.close()
    print(f"{out}: {Path(out).stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
