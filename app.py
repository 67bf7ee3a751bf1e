"""LoRA Lab web app: open the store, start the job queue, serve the UI (ui/server.py does the work).

    python app.py                                   # http://127.0.0.1:7860, data in $LORALAB_HOME or ~/.loralab
    python app.py --home /data --port 8080
    python app.py --host 0.0.0.0 --auth alice:secret   # or --auth users.txt (one user:pass per line)
    loralab app --port 8080                         # the same, after `pip install -e .`

This process never imports torch; training runs in child processes (`python -m engine train ...`).
"""

import sys

from ui.server import main

if __name__ == "__main__":
    sys.exit(main())
