"""How the UI refuses: a message for the user, one line in the server log, no traceback.

    raise refuse(f"run #{run_id} has no saved adapter")

Gradio prints the whole traceback of every gr.Error to the server's console; an ordinary refusal (bad input,
a missing choice) is not a bug, so it is logged as one line and shown as it is. Tracebacks stay for bugs.
"""

from __future__ import annotations

import sys

import gradio as gr


def refuse(message: str) -> gr.Error:
    text = str(message)
    print(f"loralab ui: refused: {' '.join(text.split())[:500]}", file=sys.stderr, flush=True)
    return gr.Error(text, print_exception=False)


def warn(message: str) -> str:
    """A refusal as a toast, returned as text for a Markdown output: no exception, so the event's other
    outputs keep what they show and stay usable (an exception turns every output into an "Error" overlay)."""
    text = str(message)
    print(f"loralab ui: refused: {' '.join(text.split())[:500]}", file=sys.stderr, flush=True)
    gr.Warning(text)
    return f"⚠ {text}"
