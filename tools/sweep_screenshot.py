"""Screenshot the Sweeps tab of a data home for the README: its newest sweep's table and val-loss plot.

    .venv/bin/python tools/sweep_screenshot.py HOME [docs/screenshots/sweep.png]   # needs Debian's chromium

The app is started on HOME (nothing is trained: its runner is not started), the Sweeps tab opened and the
members table with the plot below it photographed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from app_page import app_page


def main(home: str, out: str = "docs/screenshots/sweep.png") -> int:
    from playwright.sync_api import expect

    with app_page(home) as page:
        page.get_by_role("tab", name="Sweeps").click()
        expect(page.locator("#sweep-plot .legendtext").first).to_be_visible(timeout=60_000)
        time.sleep(2)
        box = page.locator("#sweep-summary").bounding_box()
        plot = page.locator("#sweep-plot").bounding_box()
        clip = {"x": 0, "y": box["y"] - 10, "width": 1400, "height": plot["y"] + plot["height"] - box["y"] + 20}
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=out, clip=clip, full_page=True)
    print(f"{out}: {Path(out).stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
