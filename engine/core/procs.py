"""Processes the job queue starts and watches: is it alive, is it one of ours, stop it, what did it say.
Stdlib + psutil (no torch)."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import psutil

from storage import this_host  # noqa: F401  (re-exported: the name runs record as their host)

OOM_ADVICE = (
    "most likely the machine ran out of memory (the kernel's OOM killer): lower train.batch_size or "
    "train.max_seq_len, raise train.grad_accum, use quant: 4bit or train.gradient_checkpointing"
)


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


# A rank that stops because another rank died exits with this code (engine.ml.distributed); the dead one counts.
PEER_LOST_EXIT = 75
# torchrun's failure report (torch.distributed.elastic's ChildFailedError), one block per failed rank:
#   rank      : 1 (local_rank: 1)
#   exitcode  : -9 (pid: 21698)  (SIGKILL)
_RANK_FAILURE = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:[^\n]*\n\s*exitcode\s*:\s*(-?\d+)")


def rank_failures(log: str) -> list[tuple[int, int]]:
    """(rank, exit status) of each rank torchrun reports failed in `log`, the root cause (first failure) first."""
    report = log[log.rfind("FAILED\n") :] if "FAILED\n" in log else ""
    root = report.find("Root Cause")
    ordered = report[root:] + report[:root] if root >= 0 else report
    return [(int(r), int(c)) for r, c in _RANK_FAILURE.findall(ordered)]


def explain_end(rc: int, log: str) -> tuple[str, int]:
    """(words, exit status) of a training process's end. Under torchrun, that of the rank that failed first:
    not one that stopped because of it (PEER_LOST_EXIT, or SIGTERMed by torchrun when the other failed)."""
    failures = rank_failures(log)
    if not failures:
        return explain_exit(rc), rc
    rank, code = next(((r, c) for r, c in failures if c not in (PEER_LOST_EXIT, -signal.SIGTERM)), failures[0])
    return f"rank {rank} {explain_exit(code)} (torchrun stopped the other ranks)", code


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


def die_with_parent() -> bool:
    """Linux: have the kernel SIGKILL this process when its parent dies (a torchrun rank whose torchrun was
    killed must not train on as an orphan). False where that cannot be set, or the parent is already gone."""
    try:
        import ctypes

        pr_set_pdeathsig = 1
        if ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return os.getppid() != 1


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
