"""The machine a run trains on: how many CPU threads, and how much memory the run has used."""

from __future__ import annotations

import os
import resource

import torch


def pick_threads(requested: int) -> int:
    """0 = auto: every core on an idle machine, one thread when something else is busy.

    Two torch threads collapse to a third of their speed when the other core is busy (stack-notes.md);
    one thread holds up. LORALAB_TRAIN_THREADS overrides. Never more than the cores.
    """
    cores = os.cpu_count() or 1
    env = os.environ.get("LORALAB_TRAIN_THREADS", "").strip()
    if env.isdigit():
        return max(1, min(int(env), cores))
    if requested:
        return min(requested, cores)  # more threads than cores only slows torch down (and 10⁵ crash it)
    busy = os.getloadavg()[0] >= 0.75 * max(1, cores - 1) if hasattr(os, "getloadavg") else False
    return 1 if busy else cores


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_rss_gb() -> float:
    """This process's own high-water RSS. Not getrusage's ru_maxrss: Linux carries that over fork and
    execve, so a job launched by a 1 GB server would report at least 1 GB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # non-Linux fallback (KiB on Linux)


def peak_mem_gb(device: torch.device, rss_base: float) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return max(0.0, peak_rss_gb() - rss_base)
