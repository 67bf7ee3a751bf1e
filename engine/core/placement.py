"""Where the queue starts a run on this machine: its GPUs, which of them are busy, the oldest run that fits.

    placer = Placer(home, host)                      # the machine's GPUs: `engine doctor --json`, asked once
    placer = Placer(home, host, gpus=[Gpu(0, "A100", 80.0), Gpu(1, "A100", 80.0)])   # a stand-in (tests)
    got = placer.claim(store, worker_pid)            # (run, Placement) claimed, or None: nothing fits now

The database says which GPUs are busy: every `running` run of this host records its devices (runs.devices,
'cuda:0,1'), whoever started it (this scheduler, another one on this host, a foreground `engine train`). A
queued run that needs busy GPUs stays queued, and so do the runs behind it (first in, first out); a run this
machine can never run (more GPUs than it has, GPU ids it lacks) is left for a worker on another host.
Stdlib + storage only: the web server's scheduler thread runs this.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

from engine.core.devices import (
    Gpu,
    Placement,
    Unplaceable,
    gpus_from_doctor,
    gpus_of,
    may_have_gpus,
    parse_devices,
    place,
)
from engine.core.launch import EngineCommandError, run_engine_json
from storage import RunRecord, RunStatus, Store

DOCTOR_TIMEOUT_S = 180.0
PLACED_ENV = "LORALAB_DEVICES"  # set by the scheduler: the devices it gave the run (the child does not choose)
SCANNED = 200  # queued runs looked at per claim, oldest first


def discover_gpus(home: Path, python: str = sys.executable) -> list[Gpu]:
    """This machine's GPUs as `engine doctor --json` lists them; [] at once where no GPU driver is present."""
    if not may_have_gpus():
        return []
    try:
        return gpus_from_doctor(run_engine_json(["doctor", "--json"], DOCTOR_TIMEOUT_S, home=home, python=python))
    except EngineCommandError as e:
        print(f"loralab: could not list this machine's GPUs ({e}); placing runs as on a CPU", file=sys.stderr)
        return []


def needs(rec_config: dict[str, Any]) -> tuple[Any, str]:
    """(DeviceRequest, strategy) of a run's stored config."""
    tr = rec_config.get("train") or {}
    return parse_devices(str(tr.get("devices", "auto"))), str(tr.get("strategy", "ddp"))


class Placer:
    """The machine's GPUs and the rule that gives each queued run its devices (see the module docstring)."""

    def __init__(self, home: Path, host: str, *, gpus: list[Gpu] | None = None, python: str = sys.executable) -> None:
        self.home, self.host, self.python = Path(home), host, python
        self._gpus = list(gpus) if gpus is not None else None
        self._lock = threading.Lock()
        self.waiting: dict[int, str] = {}  # run id → why it is not placed here (for the queue panel)

    def gpus(self) -> list[Gpu]:
        """The machine's GPUs (asked once; a stand-in list when one was given)."""
        with self._lock:
            if self._gpus is None:
                self._gpus = discover_gpus(self.home, self.python)
            return list(self._gpus)

    def known_gpus(self) -> list[Gpu] | None:
        """The GPUs if already known, else None: never starts a process (for the UI)."""
        return None if self._gpus is None else list(self._gpus)

    def busy(self, store: Store) -> dict[int, int]:
        """GPU index → the running run of this host that holds it."""
        held: dict[int, int] = {}
        for rec in store.list_runs(status=RunStatus.RUNNING, limit=100_000):
            if rec.host in (None, self.host):
                held.update(dict.fromkeys(gpus_of(rec.devices), rec.id))
        return held

    def place(self, config: dict[str, Any], store: Store, need_gb: float | None = None) -> Placement | None:
        """The devices a run of `config` gets now, None while they are busy; Unplaceable if never here."""
        req, strategy = needs(config)
        return self._place(req, strategy, frozenset(self.busy(store)), need_gb)

    def _place(self, req, strategy: str, busy: frozenset[int], need_gb: float | None) -> Placement | None:
        return place(req, strategy, self.gpus(), busy, need_gb=need_gb)

    def claim(self, store: Store, worker_pid: int) -> tuple[RunRecord, Placement] | None:
        """Claim the oldest queued run that fits now, recording its devices and world size; None when the
        oldest run that could run here waits for busy devices, or nothing is queued."""
        busy = frozenset(self.busy(store))
        waiting: dict[int, str] = {}
        try:
            for rec in store.list_runs(status=RunStatus.QUEUED, limit=SCANNED, oldest_first=True):
                try:
                    req, strategy = needs(rec.config)
                    placed = self._place(req, strategy, busy, rec.est_mem_gb)
                except (Unplaceable, ValueError) as e:  # another host may have what it needs
                    waiting[rec.id] = f"not on this host: {e}"
                    continue
                if placed is None:
                    waiting[rec.id] = "waits for its GPUs"
                    return None
                got = store.claim_run(rec.id, worker_pid, self.host)
                if got is None:  # another scheduler took it first: look again from the start
                    return self.claim(store, worker_pid)
                store.update_run(rec.id, devices=placed.label, world_size=placed.world)
                return got, placed
            return None
        finally:
            self.waiting = waiting


def wait_for_gpus(placer: Placer, config: dict[str, Any], store: Store, timeout_s: float = 0) -> Placement:
    """A foreground run's devices now (or within timeout_s); Unplaceable with the holders when they stay busy."""
    deadline = time.monotonic() + timeout_s
    while True:
        placed = placer.place(config, store)
        if placed is not None:
            return placed
        if time.monotonic() >= deadline:
            held = placer.busy(store)
            who = ", ".join(f"GPU {g} by run #{r}" for g, r in sorted(held.items())) or "another process"
            raise Unplaceable(
                f"train.devices = {needs(config)[0]}: the GPUs it needs are busy ({who}); submit the run to the "
                "queue (`engine submit`), which starts it when they are free"
            )
        time.sleep(1.0)
