"""The web server's side of chat: a client for the chat worker process. Stdlib only (no torch here).

    worker = ChatWorker(home)
    worker.start("embedded:SmolLM2-135M-Instruct")          # spawns `python -m engine.ml.generate`, loads the base once
    worker.ensure_adapter("run3", "~/.loralab/runs/3/adapter")  # adapters attach to that one base, by name
    for pane, delta in worker.stream_many([("left", msgs, None), ("right", msgs, "run3")], GenParams(seed=7)):
        ...                                                   # both panes grow together, token by token
    worker.stop()                                             # ends the current generation early
    worker.close()                                            # ends the process: every byte of it is freed

The worker holds ONE base model; every pane runs on it, the base pane with the adapters disabled. It
generates the panes of one request round-robin, one token per pane in turn (engine.ml.generate explains
why not as a batch), so all panes fill at once and each pane's text is exactly what that adapter alone
would produce with the same seed.

Protocol: JSON lines. Requests go to the worker's stdin as {"op", "id", ...}; replies come back on its
stdout, each tagged with the request id: {"event": "ok" | "error" | "delta" | "pane_done" | "done"}.
If the worker dies (crash, out of memory, killed), the next call raises WorkerDied with its exit code,
and the call after that starts a new worker with the same base model and adapters.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from engine.core.launch import spawn_engine

WORKER_MODULE = "engine.ml.generate"
BASE_PANE = None  # the adapter value that means "the base model, adapters disabled"


@dataclass(frozen=True)
class GenParams:
    """Generation settings, the same for every pane so that differences come from the weights."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 0.95
    seed: int = 0  # the sampler is reseeded with this for every pane of every request
    repetition_penalty: float = 1.1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> GenParams:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in known})


def adapter_base_model(adapter_dir: str | os.PathLike) -> str | None:
    """The base model an adapter was trained on (our loralab.json first, then peft's config)."""
    d = Path(adapter_dir)
    ours = d / "loralab.json"
    if ours.is_file():
        return json.loads(ours.read_text())["run_config"]["model"]
    cfg = d / "adapter_config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text()).get("base_model_name_or_path")
    raise FileNotFoundError(f"{d} is not an adapter folder (no adapter_config.json)")


class ChatError(RuntimeError):
    """Something the worker refused or failed to do; the message is meant for the user as it is."""


class WorkerDied(ChatError):
    """The worker process is gone; the next call starts a new one."""

    def __init__(self, exit_code: int | None, log_tail: str = ""):
        self.exit_code = exit_code
        why = f"exit code {exit_code}"
        if exit_code is not None and exit_code < 0:
            try:
                why += f", killed by {signal.Signals(-exit_code).name}"
            except ValueError:
                pass
        last = f" Last log line: {log_tail}" if log_tail else ""
        super().__init__(f"the chat worker stopped ({why}); it will restart on the next message.{last}")


@dataclass
class PaneStats:
    """How one pane's reply went: tokens generated, seconds from its first turn to its end, time to
    its first token, whether Stop cut it short, or the error that ended it."""

    tokens: int = 0
    seconds: float = 0.0
    first_token_s: float | None = None
    stopped: bool = False
    error: str | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class _Process:
    """One running worker: the Popen, a reader thread routing replies by request id, a write lock."""

    def __init__(self, popen: subprocess.Popen, log_path: Path):
        self.popen = popen
        self.log_path = log_path
        self.queues: dict[int, queue.Queue] = {}
        self.lock = threading.Lock()
        self.eof = threading.Event()
        self.ended_on_purpose = False  # close() or a new base model, not a crash
        self.reader = threading.Thread(target=self._read, name=f"chat-reader-{popen.pid}", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue  # the worker only writes JSON here; anything else is not ours to route
            with self.lock:
                q = self.queues.get(msg.get("id"))
            if q is not None:
                q.put(msg)
        self.eof.set()
        with self.lock:
            for q in self.queues.values():
                q.put({"event": "dead"})

    def open(self, rid: int) -> queue.Queue:
        q: queue.Queue = queue.Queue()
        with self.lock:
            self.queues[rid] = q
            if self.eof.is_set():
                q.put({"event": "dead"})
        return q

    def close_queue(self, rid: int) -> None:
        with self.lock:
            self.queues.pop(rid, None)

    def send(self, msg: dict[str, Any]) -> bool:
        line = json.dumps(msg) + "\n"
        try:
            with self.lock:
                assert self.popen.stdin is not None
                self.popen.stdin.write(line)
                self.popen.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def alive(self) -> bool:
        return self.popen.poll() is None and not self.eof.is_set()


def log_tail_line(path: Path, max_bytes: int = 8000) -> str:
    """The last line of the worker's log that names an error (MemoryError, a traceback's last line), or ''."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ("Error" in ln or "error:" in ln or "Killed" in ln) and "Warning" not in ln]
    return errors[-1][:300] if errors else ""


class ChatWorker:
    """Client of one chat worker process. Thread-safe; requests are served one after another."""

    def __init__(
        self,
        home: str | os.PathLike | None = None,
        *,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        load_timeout_s: float = 900.0,
        reply_timeout_s: float = 300.0,
    ):
        self.home = Path(home) if home else None
        self.python = python
        self.env = dict(env or {})
        self.load_timeout_s = load_timeout_s
        self.reply_timeout_s = reply_timeout_s
        self._p: _Process | None = None
        self._ids = iter(range(1, 1 << 62))
        self._lock = threading.RLock()  # guards spawning, loading and the fields below
        self._want: dict[str, Any] | None = None  # what start() asked for, restored after a crash
        self._want_adapters: dict[str, str] = {}
        self.info: dict[str, Any] = {}  # the worker's last report: base, adapters, device, memory
        self._active: set[int] = set()  # generate requests in flight

    # ---- lifecycle ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._p is not None and self._p.alive()

    @property
    def base(self) -> str | None:
        return self._want["base"] if self._want else None

    @property
    def adapters(self) -> dict[str, str]:
        return dict(self._want_adapters)

    @property
    def log_path(self) -> Path:
        folder = (self.home / "logs") if self.home else Path(tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        return folder / "chat-worker.log"

    def start(self, base: str, quant: str = "none", *, device: str = "auto", threads: int = 0) -> dict[str, Any]:
        """Hold `base` in the worker (spawning it if needed). A different base or quantization ends the
        current worker first: one base model in memory at a time. `device` (auto, cpu, cuda) and
        `threads` apply when a worker starts; a running worker with the same base is kept as it is.
        Returns the worker's report."""
        want = {"base": base, "quant": quant, "device": device, "threads": int(threads)}
        with self._lock:
            self._raise_if_died()
            if self.running and self._want and (self._want["base"], self._want["quant"]) == (base, quant):
                return self.info
            if self._p is not None:
                self._end_process()
            self._want, self._want_adapters = want, {}
            return self._spawn()

    def ensure_adapter(self, name: str, adapter_dir: str | os.PathLike) -> dict[str, Any]:
        """Attach the adapter folder under `name` (no-op when it is already there). Raises ChatError
        when it cannot be used, e.g. it was trained on another base model (the message names both)."""
        adapter_dir = str(adapter_dir)
        with self._lock:
            self._raise_if_died()
            self._ensure_running()
            if self._want_adapters.get(name) == adapter_dir:
                return self.info
            self.info = self._call("add_adapter", self.load_timeout_s, name=name, dir=adapter_dir)
            self._want_adapters[name] = adapter_dir
            return self.info

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self._want_adapters:
                return
            self._raise_if_died()
            self._ensure_running()
            self.info = self._call("remove_adapter", 60.0, name=name)
            self._want_adapters.pop(name, None)

    def report(self) -> dict[str, Any]:
        """What the worker holds now (base, adapters, device, memory), asked fresh; {} when none runs."""
        p = self._p
        if p is None or not p.alive():
            return {}
        try:
            self.info = self._call("info", 30.0, proc=p)
        except ChatError:
            return {}
        return self.info

    def close(self) -> None:
        """End the worker process (frees all of its memory, GPU included) and forget the base model."""
        with self._lock:
            self._want, self._want_adapters, self.info = None, {}, {}
            if self._p is not None:
                self._end_process()

    def _spawn(self) -> dict[str, Any]:
        assert self._want is not None
        log = self.log_path
        with open(log, "w") as log_f:  # the child keeps its own descriptor; ours can close
            popen = spawn_engine(
                [],
                module=WORKER_MODULE,
                python=self.python,
                env=self.env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_f,
                text=True,
                bufsize=1,
            )
        self._p = _Process(popen, log)
        home = str(self.home) if self.home else None
        try:
            self.info = self._call("load", self.load_timeout_s, home=home, **self._want)
        except WorkerDied:
            raise  # _want stays: the next call tries again
        except ChatError:  # the model cannot load (not found, offline, bad quant): nothing to keep
            self._end_process()
            self._want, self._want_adapters = None, {}
            raise
        for name, adapter_dir in list(self._want_adapters.items()):
            try:
                self.info = self._call("add_adapter", self.load_timeout_s, name=name, dir=adapter_dir)
            except WorkerDied:
                raise
            except ChatError:
                self._want_adapters.pop(name, None)  # it loaded before the crash; if it no longer does, drop it
        return self.info

    def _ensure_running(self) -> None:
        if self._p is None:
            if self._want is None:
                raise ChatError("no base model is loaded: start the chat worker with a base model first")
            self._spawn()

    def _end_process(self) -> None:
        p, self._p = self._p, None
        if p is None:
            return
        p.ended_on_purpose = True
        p.send({"op": "exit"})
        try:
            p.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait(timeout=10)
        for stream in (p.popen.stdin, p.popen.stdout):
            try:
                stream and stream.close()
            except OSError:
                pass

    def _raise_if_died(self, p: _Process | None = None) -> None:
        """If the worker is gone, forget it and raise WorkerDied; the next call spawns a new one."""
        p = p or self._p
        if p is None or p.alive():
            return
        if p.ended_on_purpose:
            raise ChatError(
                "the chat worker was stopped while this request was running (Unload, or another base model was loaded)"
            )
        try:
            code = p.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:  # stdout closed but the process lingers: finish it
            p.popen.kill()
            code = p.popen.wait(timeout=5)
        if self._p is p:
            self._p = None
            self.info = {}
        raise WorkerDied(code, log_tail_line(p.log_path))

    # ---- requests -------------------------------------------------------------------------------

    def _call(self, op: str, timeout: float, *, proc: _Process | None = None, **fields_: Any) -> dict[str, Any]:
        """One request with one reply: the worker's report on success, ChatError with its message otherwise."""
        p = proc or self._p
        if p is None:
            raise ChatError("the chat worker is not running")
        rid = next(self._ids)
        q = p.open(rid)
        try:
            if not p.send({"op": op, "id": rid, **fields_}):
                self._raise_if_died(p)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    msg = q.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
                except queue.Empty:
                    if not p.alive():
                        self._raise_if_died(p)
                    if time.monotonic() > deadline:
                        raise ChatError(f"the chat worker did not answer {op!r} within {timeout:.0f} s") from None
                    continue
                if msg.get("event") == "dead":
                    self._raise_if_died(p)
                if msg.get("event") == "error":
                    raise ChatError(msg.get("error") or f"{op} failed")
                if msg.get("event") == "ok":
                    return msg.get("info") or {}
        finally:
            p.close_queue(rid)

    def stream_many(
        self,
        requests: Iterable[tuple[Hashable, list[dict[str, str]], str | None]],
        params: GenParams = GenParams(),
        on_done: Callable[[Hashable, PaneStats], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[tuple[Hashable, str]]:
        """Yield (pane_id, text delta) for every pane, interleaved as the worker produces them.

        `requests` are (pane_id, messages, adapter name or None for the base). When a pane ends,
        on_done(pane_id, PaneStats) is called (its `error` says why when it could not run, e.g. an
        adapter that is not loaded). Setting `cancel` stops this request only (a Stop button); the
        panes end after their current token and report stopped=True. Closing the iterator early
        stops the generation in the worker too.
        """
        requests = list(requests)
        panes = {i: pid for i, (pid, _, _) in enumerate(requests)}  # the wire carries indices, not user ids
        with self._lock:
            self._raise_if_died()
            self._ensure_running()
            p = self._p
            assert p is not None
            rid = next(self._ids)
            q = p.open(rid)
            self._active.add(rid)
        finished = False
        try:
            body = [{"pane": i, "messages": m, "adapter": a} for i, (_, m, a) in enumerate(requests)]
            if not p.send({"op": "generate", "id": rid, "panes": body, "params": params.to_dict()}):
                self._raise_if_died(p)
            stop_sent = False
            quiet_since = time.monotonic()
            while True:
                if cancel is not None and cancel.is_set() and not stop_sent:
                    stop_sent = p.send({"op": "stop", "id": rid})
                try:
                    msg = q.get(timeout=0.1 if cancel is not None else self.reply_timeout_s)
                except queue.Empty:
                    if cancel is not None and time.monotonic() - quiet_since < self.reply_timeout_s:
                        continue
                    self._raise_if_died(p)
                    raise ChatError(f"the chat worker sent nothing for {self.reply_timeout_s:.0f} s") from None
                quiet_since = time.monotonic()
                ev = msg.get("event")
                if ev == "delta":
                    yield panes[msg["pane"]], msg["delta"]
                elif ev == "pane_done":
                    if on_done is not None:
                        on_done(
                            panes[msg["pane"]],
                            PaneStats(
                                tokens=msg.get("tokens", 0),
                                seconds=msg.get("seconds", 0.0),
                                first_token_s=msg.get("first_token_s"),
                                stopped=bool(msg.get("stopped")),
                                error=msg.get("error"),
                            ),
                        )
                elif ev == "done":
                    finished = True
                    self.info = msg.get("info") or self.info
                    return
                elif ev == "error":
                    finished = True
                    raise ChatError(msg.get("error") or "generation failed")
                elif ev == "dead":
                    finished = True
                    with self._lock:
                        self._raise_if_died(p)
        finally:
            with self._lock:
                self._active.discard(rid)
            if not finished and p.alive():
                p.send({"op": "stop", "id": rid})  # abandoned (Stop pressed, page closed): stop generating
            p.close_queue(rid)

    def stream(
        self, messages: list[dict[str, str]], adapter: str | None = None, params: GenParams = GenParams()
    ) -> Iterator[str]:
        """One reply, as text deltas; adapter None = the base model."""
        errors: list[str] = []

        def done(_pane: Hashable, stats: PaneStats) -> None:
            if stats.error:
                errors.append(stats.error)

        for _pane, delta in self.stream_many([(0, messages, adapter)], params, on_done=done):
            yield delta
        if errors:
            raise ChatError(errors[0])

    def reply(self, messages: list[dict[str, str]], adapter: str | None = None, params: GenParams = GenParams()) -> str:
        return "".join(self.stream(messages, adapter, params))

    def stop(self) -> None:
        """Stop every generation in flight; each pane ends after its current token."""
        p = self._p
        if p is not None and p.alive():
            p.send({"op": "stop"})
