"""Generation with a base model and any number of LoRA adapters on ONE copy of the base weights, and the
chat worker process that serves it (`python -m engine.ml.generate`; engine.core.chat is its client).

    session = ChatModel.load(base="embedded:SmolLM2-135M-Instruct", adapters={"pirate": "runs/1/adapter"})
    text = session.reply([{"role": "user", "content": "Who are you?"}], adapter="pirate")
    text = session.reply(messages, adapter=None)      # the base model: adapters disabled
    session.generate_many([("a", msgs, None), ("b", msgs, "pirate")], params, on_delta, on_done)

Adapters are loaded by name with PeftModel.load_adapter and switched with set_adapter; the base pane
runs with the adapter layers disabled. Sampling is seeded per request so every pane sees the same random
numbers and differences come from the weights alone.

Several panes (generate_many) are generated round-robin, one token per pane in turn: each pane runs
model.generate() in its own thread, and a stopping criterion hands the model to the next pane after
every token, switching the active adapter and the RNG state. Why not one batch with peft's per-row
`adapter_names`? Each row of a batch draws different random numbers and is left-padded, so a pane would
no longer equal that adapter alone with the same seed. Turn-taking keeps each pane bit-identical to a
solo run and costs one adapter switch per token (a walk over the LoRA layers, microseconds each).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteriaList, TextIteratorStreamer

from engine.core.chat import GenParams, adapter_base_model
from engine.core.config import EMBEDDED_MODEL, RunConfig
from engine.core.home import data_home, embedded_dir
from engine.ml import model as M
from engine.ml.turns import PaneStreamer, RngState, RoundRobin, TakeTurns

_UNKNOWN = object()  # adapter state after something outside _activate changed it


class AdapterBaseMismatch(ValueError):
    """An adapter trained on another base model than the one loaded."""


def base_keys(model: str, home: Path) -> set[str]:
    """The names one base model goes by: as written, its resolved folder, the hub id of a cache snapshot."""
    keys = {model.strip()}
    if model == EMBEDDED_MODEL:
        keys.add(str(embedded_dir(home).resolve()))
    p = Path(model).expanduser()
    if p.is_dir():
        rp = p.resolve()
        keys.add(str(rp))
        if rp.parent.name == "snapshots" and rp.parent.parent.name.startswith("models--"):
            keys.add(rp.parent.parent.name[len("models--") :].replace("--", "/"))
        if rp == embedded_dir(home).resolve():
            keys.add(EMBEDDED_MODEL)
    return keys


def same_base(a: str, b: str, home: Path) -> bool:
    return bool(base_keys(a, home) & base_keys(b, home))


def param_report(model) -> dict[str, int]:
    """Bytes and distinct tensors of the base weights vs the LoRA weights (parameters() skips tied copies)."""
    base_ptrs: set[int] = set()
    base_bytes = lora_bytes = lora_tensors = 0
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if ".lora_" in name:
            lora_bytes += nbytes
            lora_tensors += 1
        elif p.data_ptr() not in base_ptrs:
            base_ptrs.add(p.data_ptr())
            base_bytes += nbytes
    return {
        "base_tensors": len(base_ptrs),
        "base_bytes": base_bytes,
        "lora_tensors": lora_tensors,
        "lora_bytes": lora_bytes,
    }


def memory_report(device: torch.device | None = None) -> dict[str, float | None]:
    """This process's resident memory now and at its peak (GiB), and CUDA's allocated bytes."""
    rss = peak = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 2**20
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 2**20
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    cuda = device is not None and device.type == "cuda"
    return {
        "rss_gb": rss,
        "peak_rss_gb": peak,
        "cuda_allocated_gb": torch.cuda.memory_allocated() / 2**30 if cuda else None,
        "cuda_max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }


class ChatModel:
    """One base model in memory, adapters attached by name."""

    def __init__(self, base_name: str, model, tok, device: torch.device, home: Path, quant: str = "none"):
        self.base_name, self.model, self.tok, self.device = base_name, model, tok, device
        self.home, self.quant = home, quant
        self.adapters: dict[str, str] = {}
        self.lock = threading.Lock()
        self.note = ""  # why the device is not the one asked for (GPU out of memory → CPU)
        self._state: Any = _UNKNOWN

    @classmethod
    def load(
        cls,
        base: str,
        adapters: dict[str, str] | None = None,
        *,
        quant: str = "none",
        home: Path | None = None,
        device: str = "auto",
    ) -> ChatModel:
        """device: auto (CUDA when there is one), cuda or cpu. Running out of GPU memory while loading
        falls back to the CPU (a training job may hold the GPU) and says so in `note`."""
        home = home or data_home()
        ref = M.resolve_model(base, home)
        dev = M.pick_device() if device == "auto" else torch.device(device)
        cfg = RunConfig(model=base, quant=quant)
        tok = M.load_tokenizer(ref)
        note = ""
        try:
            model = M.load_base_model(ref, cfg, dev, for_training=False)
        except torch.cuda.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            dev, note = (
                torch.device("cpu"),
                "the GPU ran out of memory while loading (a training job may hold it): running on the CPU",
            )
            model = M.load_base_model(ref, cfg, dev, for_training=False)
        model.eval()
        self = cls(base, model, tok, dev, home, quant)
        self.note = note
        for name, path in (adapters or {}).items():
            self.add_adapter(name, path)
        return self

    def check_base(self, path: str | Path) -> None:
        """Refuse an adapter trained on another base model; the message names both."""
        trained_on = adapter_base_model(path)
        if trained_on and not same_base(trained_on, self.base_name, self.home):
            raise AdapterBaseMismatch(
                f"adapter {str(path)!r} was trained on base model {trained_on!r}, but the chat holds "
                f"{self.base_name!r}; an adapter only fits the base it was trained on. Pick {trained_on!r} as the "
                "base model to chat with this adapter (panes share one base model)."
            )

    def add_adapter(self, name: str, path: str | Path) -> None:
        from peft import PeftModel

        path = str(path)
        if not (Path(path) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"adapter {name!r}: {path} has no adapter_config.json")
        self.check_base(path)
        with self.lock:
            if name in self.adapters:
                self._remove(name)
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            self.model.eval()
            self.adapters[name] = path
            self._state = _UNKNOWN

    def remove_adapter(self, name: str) -> None:
        with self.lock:
            self._remove(name)

    def _remove(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"adapter {name!r} is not loaded")
        if len(self.adapters) == 1:  # peft cannot delete the last adapter: unwrap back to the plain model
            self.model = self.model.unload()
        else:
            self.model.delete_adapter(name)
        del self.adapters[name]
        self._state = _UNKNOWN

    def report(self) -> dict[str, Any]:
        return {
            "base": self.base_name,
            "quant": self.quant,
            "device": str(self.device),
            "note": self.note,
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "adapters": dict(self.adapters),
            "cuda_available": torch.cuda.is_available(),
            "threads": torch.get_num_threads(),
            **param_report(self.model),
            **memory_report(self.device),
        }

    def prompt_ids(self, messages: list[dict[str, str]]) -> torch.Tensor:
        out = self.tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        ids = out["input_ids"] if hasattr(out, "keys") else out  # transformers 5 may return a BatchEncoding
        return ids.to(self.device)

    def stream(
        self, messages: list[dict[str, str]], adapter: str | None = None, params: GenParams = GenParams()
    ) -> Iterator[str]:
        """Yield the reply text piece by piece (the growing reply is the concatenation)."""
        ids = self.prompt_ids(messages)
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with self.lock, torch.no_grad():
                    self._activate(adapter)
                    torch.manual_seed(params.seed)
                    self.model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        streamer=streamer,
                        **self._gen_kwargs(params),
                    )
            except BaseException as e:  # re-raised in the consumer's thread below
                errors.append(e)
                streamer.end()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        yield from streamer
        t.join()
        if errors:
            raise errors[0]

    def reply(self, messages: list[dict[str, str]], adapter: str | None = None, params: GenParams = GenParams()) -> str:
        return "".join(self.stream(messages, adapter, params))

    def complete(self, ids: list[int], adapter: str | None = None, params: GenParams = GenParams()) -> str:
        """The continuation of already tokenized prompt ids (a rendered chat up to the assistant's turn)."""
        x = torch.tensor([list(ids)], device=self.device)
        with self.lock, torch.no_grad():
            self._activate(adapter)
            torch.manual_seed(params.seed)
            out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), **self._gen_kwargs(params))
        return self.tok.decode(out[0, x.shape[1] :], skip_special_tokens=True)

    def losses(self, batch: dict[str, torch.Tensor], adapter: str | None = None) -> torch.Tensor:
        """engine.ml.steps.token_losses of a collated batch with `adapter` (None: the base) in use."""
        from engine.ml.steps import token_losses

        with self.lock, torch.no_grad():
            self._activate(adapter)
            return token_losses(self.model, {k: v.to(self.device) for k, v in batch.items()}, fast=False)

    def generate_many(
        self,
        panes: list[tuple[Hashable, list[dict[str, str]], str | None]],
        params: GenParams,
        on_delta: Callable[[Hashable, str], None],
        on_done: Callable[[Hashable, dict[str, Any]], None],
        stop: threading.Event | None = None,
    ) -> None:
        """Every pane's reply, round-robin one token per pane, each exactly as that adapter alone would
        write it with params.seed. on_delta(pane, text) as text arrives; on_done(pane, stats) at its end."""
        stop = stop or threading.Event()
        runnable = []
        for pane, messages, adapter in panes:
            if adapter is not None and adapter not in self.adapters:
                loaded = ", ".join(self.adapters) or "none"
                on_done(
                    pane,
                    {
                        "tokens": 0,
                        "seconds": 0.0,
                        "first_token_s": None,
                        "stopped": False,
                        "error": f"adapter {adapter!r} is not loaded (loaded: {loaded})",
                    },
                )
            else:
                runnable.append((pane, messages, adapter))
        if not runnable:
            return
        with self.lock:
            turns = RoundRobin([pane for pane, _, _ in runnable])
            threads = [
                threading.Thread(
                    target=self._run_pane,
                    args=(*r, params, turns, stop, on_delta, on_done),
                    name=f"pane-{r[0]}",
                    daemon=True,
                )
                for r in runnable
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

    def _run_pane(
        self, pane, messages, adapter, params: GenParams, turns: RoundRobin, stop: threading.Event, on_delta, on_done
    ) -> None:
        stats: dict[str, Any] = {"tokens": 0, "seconds": 0.0, "first_token_s": None, "stopped": False, "error": None}
        streamer = PaneStreamer(self.tok, lambda text: on_delta(pane, text))
        turns.wait(pane)
        t0 = time.perf_counter()
        try:
            self._activate(adapter)
            rng = RngState(self.device)
            torch.manual_seed(params.seed)

            def resume() -> None:
                rng.restore()
                self._activate(adapter)

            take_turns = TakeTurns(turns, pane, stop, on_pause=rng.save, on_resume=resume)
            ids = self.prompt_ids(messages)
            self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([take_turns]),
                **self._gen_kwargs(params),
            )
            stats.update(
                tokens=streamer.n_tokens,
                stopped=take_turns.stopped,
                first_token_s=None if streamer.first_at is None else streamer.first_at - t0,
            )
        except Exception as e:  # reported in this pane; the other panes go on
            stats["error"] = f"{type(e).__name__}: {e}"
        finally:
            stats["seconds"] = time.perf_counter() - t0
            turns.leave(pane)
        on_done(pane, stats)

    def _gen_kwargs(self, p: GenParams) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "max_new_tokens": p.max_new_tokens,
            "repetition_penalty": p.repetition_penalty,
            "pad_token_id": self.tok.pad_token_id,
            "eos_token_id": self.tok.eos_token_id,
        }
        if p.temperature > 0:
            kw.update(do_sample=True, temperature=p.temperature, top_p=p.top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    def _activate(self, adapter: str | None) -> None:
        """Make `adapter` the one in use, or disable all adapters for the base (None)."""
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            if adapter is not None:
                raise KeyError(f"adapter {adapter!r} is not loaded; loaded: none")
            return
        if adapter is not None and adapter not in self.adapters:
            raise KeyError(f"adapter {adapter!r} is not loaded; loaded: {', '.join(self.adapters)}")
        if adapter == self._state:
            return
        if adapter is None:
            self.model.base_model.disable_adapter_layers()
        else:
            if self._state is None or self._state is _UNKNOWN:
                self.model.base_model.enable_adapter_layers()
            self.model.set_adapter(adapter, inference_mode=True)
        self._state = adapter


# ---- the worker process ------------------------------------------------------------------------------


class Worker:
    """Serves JSON-line requests (see engine.core.chat) on one ChatModel. The reading thread answers `stop`
    and `info` at once; everything else runs in order on one job thread."""

    def __init__(self, out):
        self.out = out
        self.startup = memory_report()  # after importing torch & co., before any model: the process's floor
        self.out_lock = threading.Lock()
        self.chat: ChatModel | None = None
        self.jobs: list[dict[str, Any]] = []
        self.jobs_cv = threading.Condition()
        self.stops: dict[int, threading.Event] = {}
        self.thread = threading.Thread(target=self._job_loop, name="chat-jobs", daemon=True)
        self.thread.start()

    def send(self, msg: dict[str, Any]) -> None:
        line = json.dumps(msg) + "\n"
        with self.out_lock:
            self.out.write(line)
            self.out.flush()

    def info(self) -> dict[str, Any]:
        floor = {"pid": os.getpid(), "startup_rss_gb": self.startup["rss_gb"]}
        if self.chat is None:
            return {
                "base": None,
                "adapters": {},
                "cuda_available": torch.cuda.is_available(),
                **memory_report(),
                **floor,
            }
        return {**self.chat.report(), **floor}

    def submit(self, msg: dict[str, Any]) -> None:
        if msg.get("op") == "generate":
            self.stops[msg["id"]] = threading.Event()
        with self.jobs_cv:
            self.jobs.append(msg)
            self.jobs_cv.notify()

    def stop(self, rid: int | None) -> None:
        for k, ev in list(self.stops.items()):
            if rid is None or k == rid:
                ev.set()

    def _job_loop(self) -> None:
        while True:
            with self.jobs_cv:
                self.jobs_cv.wait_for(lambda: bool(self.jobs))
                msg = self.jobs.pop(0)
            rid = msg.get("id")
            try:
                if msg["op"] == "generate":
                    self._generate(msg)
                    continue
                self._command(msg)
                self.send({"id": rid, "event": "ok", "info": self.info()})
            except Exception as e:  # the client shows this message; the worker stays up
                self.send({"id": rid, "event": "error", "error": _error_text(e)})
            finally:
                self.stops.pop(rid, None)

    def _command(self, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "load":
            self._unload()
            threads = int(msg.get("threads") or 0)
            if threads > 0:
                torch.set_num_threads(threads)
            home = Path(msg["home"]) if msg.get("home") else data_home()
            self.chat = ChatModel.load(
                msg["base"], quant=msg.get("quant", "none"), home=home, device=msg.get("device", "auto")
            )
        elif op == "add_adapter":
            self._need().add_adapter(msg["name"], msg["dir"])
        elif op == "remove_adapter":
            self._need().remove_adapter(msg["name"])
        elif op == "unload":
            self._unload()
        else:
            raise ValueError(f"unknown op {op!r}")

    def _need(self) -> ChatModel:
        if self.chat is None:
            raise RuntimeError("no base model is loaded: send `load` first")
        return self.chat

    def _unload(self) -> None:
        self.chat = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _generate(self, msg: dict[str, Any]) -> None:
        rid = msg["id"]
        chat = self._need()
        panes = [(p["pane"], p["messages"], p.get("adapter")) for p in msg["panes"]]
        chat.generate_many(
            panes,
            GenParams.from_dict(msg.get("params")),
            on_delta=lambda pane, text: self.send({"id": rid, "event": "delta", "pane": pane, "delta": text}),
            on_done=lambda pane, stats: self.send(
                {"id": rid, "event": "pane_done", "pane": pane, "done": True, **stats}
            ),
            stop=self.stops.get(rid),
        )
        self.send({"id": rid, "event": "done", "info": self.info()})


def _error_text(e: BaseException) -> str:
    if isinstance(e, (AdapterBaseMismatch, M.ModelError, FileNotFoundError)):
        return str(e)
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "the GPU ran out of memory (a training job may be using it): press Unload, or wait for the job to end"
    return f"{type(e).__name__}: {e}"


def serve(inp=None, out=None) -> int:
    """Read requests from stdin until `exit` or end of input. The protocol owns the real stdout; anything
    a library prints goes to stderr (the worker's log) instead of corrupting the JSON lines."""
    if out is None:
        out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        sys.stdout = sys.stderr
    inp = inp or sys.stdin
    worker = Worker(out)
    for line in inp:
        line = line.strip()
        if not line:
            continue
        try:
            msg = json.loads(line)
        except json.JSONDecodeError as e:
            worker.send({"id": None, "event": "error", "error": f"not JSON: {e}"})
            continue
        op = msg.get("op")
        if op == "exit":
            break
        if op == "stop":
            worker.stop(msg.get("id"))
        elif op == "info":
            try:
                worker.send({"id": msg.get("id"), "event": "ok", "info": worker.info()})
            except Exception as e:  # a report must never take the worker down
                worker.send({"id": msg.get("id"), "event": "error", "error": _error_text(e)})
        else:
            worker.submit(msg)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(serve())
