"""Refresh the README's screenshots: run the browser test and copy its Train and History shots to docs/screenshots/.

    .venv/bin/python tools/screenshots.py        # needs Debian's chromium (apt-get install chromium)

The browser test (tests/test_browser.py) drives the real app on a temporary data home with the tiny test
model, so the pictures show a real run: filled form, live loss curve, finished status, the History table.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    env = {
        **os.environ,
        "LORALAB_DOCS_SCREENSHOTS": "1",
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "tests/test_browser.py"], cwd=ROOT, env=env)
    for name in ("train.png", "history.png"):
        p = ROOT / "docs" / "screenshots" / name
        print(f"{p.relative_to(ROOT)}: {f'{p.stat().st_size} bytes' if p.is_file() else 'missing'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
