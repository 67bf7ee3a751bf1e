"""The machine a run trains on: how many CPU threads, whether bf16 is fast here, and how much memory
the run has used."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from engine.core.home import bf16_probe_file, data_home

# ---- threads ------------------------------------------------------------------------------------

SAMPLE_S = 0.3  # the first choice samples CPU use this long; re-checks use the time since the last one
RECHECK_S = 30.0  # re-check at most this often during a run (at the log points of a step)


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    why: str


def _our_training_processes() -> int:
    """Other `python -m engine train` processes running now (not this one or its parent)."""
    me = os.getpid()
    skip = {me, os.getppid()}
    n = 0
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info.get("cmdline") or []
        if p.info["pid"] in skip or "engine" not in cmd or "train" not in cmd:
            continue
        if cmd.index("train") > cmd.index("engine"):
            n += 1
    return n


def _cpu_snapshot() -> tuple[float, float]:
    """(time, CPU seconds used by every process but this one) now."""
    s, me = psutil.cpu_times(), psutil.Process().cpu_times()
    busy = sum(getattr(s, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal"))
    return time.monotonic(), busy - (me.user + me.system)


def _busy_since(start: tuple[float, float]) -> tuple[float, tuple[float, float]]:
    """(cores kept busy by other processes since the `start` snapshot, a new snapshot)."""
    end = _cpu_snapshot()
    return max(0.0, (end[1] - start[1]) / max(1e-3, end[0] - start[0])), end


def _sample_others() -> float:
    start = _cpu_snapshot()
    time.sleep(SAMPLE_S)
    return _busy_since(start)[0]


def choose_threads(requested: int, *, others: float | None = None, ours: int | None = None) -> ThreadChoice:
    """0 = auto: every core minus the ones other work keeps busy now (at least one thread).

    "Busy" is what runs now: a short sample of CPU use by other processes (not the load average, which
    still counts work that has just ended), and at least one core per other training run of ours.
    Two torch threads collapse to a third of their speed when the other core is busy (stack-notes.md);
    one thread holds up. LORALAB_TRAIN_THREADS overrides. Never more than the cores.
    """
    cores = os.cpu_count() or 1
    env = os.environ.get("LORALAB_TRAIN_THREADS", "").strip()
    if env.isdigit():
        return ThreadChoice(max(1, min(int(env), cores)), f"LORALAB_TRAIN_THREADS={env}")
    if requested:
        # more threads than cores only slows torch down (and 10⁵ crash it)
        return ThreadChoice(min(requested, cores), f"train.threads = {requested}")
    if others is None:
        others = _sample_others()
    if ours is None:
        ours = _our_training_processes()
    taken = max(int(others + 0.5), ours)
    n = max(1, cores - taken)
    return ThreadChoice(
        n, f"auto: {cores} cores, other processes use {others:.1f} now, {ours} other training run(s) of ours"
    )


def pick_threads(requested: int) -> int:
    return choose_threads(requested).threads


class ThreadWatch:
    """A trainer hook (engine.ml.hooks.TrainHook's moments): re-checks the thread choice during a CPU run,
    at most every RECHECK_S, from the CPU use since the last check (no pause), and logs every choice to
    the run's log (stderr → train.log), its metrics (`threads`) and its summary."""

    def __init__(self, requested: int) -> None:
        self.requested = requested
        self.choice = choose_threads(requested)
        torch.set_num_threads(self.choice.threads)
        self.history: list[dict] = []
        self._snap = _cpu_snapshot()
        self._last = time.monotonic()

    def _record(self, step: int, state) -> None:
        self.history.append({"step": step, "threads": self.choice.threads, "why": self.choice.why})
        print(f"threads: {self.choice.threads} at step {step} ({self.choice.why})", file=sys.stderr, flush=True)
        state.sink.log(step, {"threads": self.choice.threads})

    def on_start(self, state) -> None:
        self._record(state.step, state)

    def loss_term(self, state):
        return None

    def after_step(self, state) -> None:
        if self.requested or os.environ.get("LORALAB_TRAIN_THREADS") or time.monotonic() - self._last < RECHECK_S:
            return
        others, self._snap = _busy_since(self._snap)
        self._last = time.monotonic()
        # this run's own threads are not "others"; its child processes (none while training) would be
        new = choose_threads(0, others=others)
        if new.threads != self.choice.threads:
            self.choice = new
            torch.set_num_threads(new.threads)
            self._record(state.step, state)

    def after_eval(self, state, val_loss: float) -> None:
        pass

    def on_end(self, state) -> None:
        state.summary["threads"] = self.history


# ---- bf16: is it fast here? ---------------------------------------------------------------------

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of native bf16 matmul support
PROBE_SHAPE = (256, 576, 1536)  # m × k × n of the probe matmul (a small model's MLP)
PROBE_MIN_SPEEDUP = 1.2  # bf16 must beat fp32 by this much to be chosen
_CHOICES: dict[tuple[str, str], tuple[bool, str]] = {}


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_gflops(dtype: torch.dtype, shape: tuple[int, int, int] = PROBE_SHAPE, reps: int = 3) -> float:
    """Best-of-`reps` GFLOP/s of one (m × k) @ (k × n) matmul in `dtype` on the CPU, after a warm-up."""
    m, k, n = shape
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def _cpu_bf16(home: Path) -> tuple[bool, str]:
    flags = sorted(f for f in CPU_BF16_FLAGS if f in cpu_flags())
    torch_says = [
        name
        for name, check in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx", "_is_amx_tile_supported"))
        if getattr(torch.cpu, check, lambda: False)()
    ]
    cap = torch.backends.cpu.get_cpu_capability()
    if not flags and not torch_says:
        return False, (
            f"fp32: this CPU ({cpu_name()}, torch capability {cap}) has no AVX512-BF16 or AMX, so bf16 "
            "matmuls are emulated and far slower than fp32"
        )
    path = bf16_probe_file(home)
    key = {"cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    probe = None
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        probe = cached if {k: cached.get(k) for k in key} == key else None
    except (OSError, ValueError):
        pass
    if probe is None:
        probe = {**key, "fp32_gflops": matmul_gflops(torch.float32), "bf16_gflops": matmul_gflops(torch.bfloat16)}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(probe, indent=1), encoding="utf-8")
    fp32, bf16 = probe["fp32_gflops"], probe["bf16_gflops"]
    has = ", ".join(flags or torch_says)
    if bf16 >= PROBE_MIN_SPEEDUP * fp32:
        return True, f"bf16: this CPU has {has}; matmul probe {bf16:.0f} GFLOP/s bf16 vs {fp32:.0f} fp32 ({path})"
    return (
        False,
        f"fp32: this CPU has {has}, but the matmul probe measured {bf16:.0f} GFLOP/s bf16 vs {fp32:.0f} fp32 ({path})",
    )


def bf16_choice(device: torch.device, home: Path | None = None) -> tuple[bool, str]:
    """(fast bf16 on this device, why): what `dtype: auto` resolves with (engine.core.anatomy.resolve_dtype).

    CUDA: the GPU supports bf16. CPU: AVX512-BF16 or AMX in the CPU flags (or torch's own checks) and a
    short fp32-vs-bf16 matmul probe, cached as JSON in the data home, that shows bf16 really is faster.
    """
    home = Path(home) if home else data_home()
    key = (device.type, str(home))
    if key not in _CHOICES:
        if device.type == "cuda":
            ok = torch.cuda.is_bf16_supported()
            name = torch.cuda.get_device_name(device)
            _CHOICES[key] = (ok, f"{'bf16' if ok else 'fp32'}: {name} {'supports' if ok else 'has no'} bf16")
        else:
            _CHOICES[key] = _cpu_bf16(home)
    return _CHOICES[key]


# ---- memory --------------------------------------------------------------------------------------


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
