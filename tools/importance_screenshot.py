"""Screenshot the Spectra tab's output-importance views of a run for the README.

    .venv/bin/python tools/importance_screenshot.py HOME RUN_ID [docs/screenshots/importance.png]   # needs chromium

The app is started on HOME (its runner is not started: nothing is trained), the Spectra tab opened, the run
picked and "Compute importance" pressed (the real `engine importance` child process, on the run's own data);
the heatmap and the share-by-layer plot are photographed.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from app_page import app_page


def main(home: str, run_id: str, out: str = "docs/screenshots/importance.png") -> int:
    from playwright.sync_api import expect

    with app_page(home) as page:
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
    print(f"{out}: {Path(out).stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
