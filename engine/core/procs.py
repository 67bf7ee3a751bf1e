"""Processes the job queue starts and watches: is it alive, is it one of ours, stop it, what did it say.
Stdlib + psutil (no torch)."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import psutil

OOM_ADVICE = (
    "most likely the machine ran out of memory (the kernel's OOM killer): lower train.batch_size or "
    "train.max_seq_len, raise train.grad_accum, use quant: 4bit or train.gradient_checkpointing"
)


def this_host() -> str:
    """The name runs record as where their process lives: pids mean something only on the same host."""
    return socket.gethostname()


def tail_text(path: Path, max_bytes: int = 4000, max_lines: int = 40) -> str:
    """The last lines of a text file ('' if it does not exist); progress bars' \\r count as line ends."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return ""
    lines = data.decode("utf-8", "replace").splitlines()
    if size > max_bytes and lines:
        lines = lines[1:]  # the first one is cut
    return "\n".join(line for line in lines[-max_lines:] if line.strip())


def explain_exit(rc: int) -> str:
    """An exit status as words: signal name (with OOM advice for SIGKILL) or the exit code."""
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        msg = f"killed by {name} (exit {rc})"
        return f"{msg}: {OOM_ADVICE}" if -rc == signal.SIGKILL else msg
    return f"exited with code {rc}"


def pid_alive(pid: int | None) -> bool:
    """True if the process exists and has not exited; a zombie (dead, not yet reaped) counts as gone."""
    if not pid or pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # exists, owned by someone else
        return True


def is_training_child(pid: int | None) -> bool:
    """True if `pid` is alive and runs `... -m engine ... train ...`: pids get reused after a reboot or crash."""
    if not pid_alive(pid):
        return False
    try:
        argv = psutil.Process(pid).cmdline()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return False
    return "engine" in argv and "train" in argv


def signal_group(pid: int, sig: int) -> bool:
    """Send `sig` to the process group led by `pid` (our children start their own session), or to the
    process alone if it leads none (a foreground `python -m engine train`). False if it is gone."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False
