"""Chat tab: 2–4 panes side by side, each the base model or an adapter, all on ONE copy of the base model
held by the chat worker process (engine.core.chat.ChatWorker; this server never imports torch).

One prompt goes to every visible pane; the panes stream at once (the worker takes one token per pane in
turn) and each keeps its own conversation. The same seed is used in every pane, so what differs between
panes comes from the weights. Under each pane: tokens, tokens/s and time to the first token. The status
line says what the worker holds (base, adapters, device, memory), and what happens when a training job
is running: the chat model then loads on the CPU, so it takes no GPU memory from the job.

The "Export" accordion below the panes (ui/export_panel.py) zips a run's adapter, merges it into its base
(never replacing a folder it did not write), pushes it to the Hugging Face Hub, or writes the merged model or
the adapter as GGUF for llama.cpp / Ollama / LM Studio (its GGUF row, ui/gguf_panel.py).

Handlers are module-level functions; the store, the worker and the data home are bound with partial.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr

from engine.core.chat import ChatError, ChatWorker, GenParams, PaneStats, WorkerDied, adapter_base_model
from engine.core.config import EMBEDDED_MODEL
from engine.core.runs import adapter_dir, best_info, chosen_adapter, is_adapter_folder
from storage import RunStatus
from ui.errors import refuse
from ui.export_panel import export_choices, export_panel, finished_runs, run_label

MAX_PANES = 4
BASE = "base"
AUTO = "auto"
YIELD_EVERY_S = 0.05  # at most ~20 screen updates a second however fast tokens come


# ---- what the panes show -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pane:
    """One pane's choice resolved: the adapter's name in the worker and its folder (None = the base)."""

    label: str
    name: str | None = None
    folder: str | None = None
    base: str | None = None  # the base model the adapter was trained on
    error: str | None = None  # why this pane cannot run


def pane_choices(store) -> list[tuple[str, str]]:
    """The base, each finished run's last adapter, and its best validation step's where it kept one."""
    out = [("base model (no adapter)", BASE)]
    for r in finished_runs(store):
        out.append((run_label(r), f"run:{r.id}"))
        best = best_info(r)
        if best is not None:
            out.append(
                (f"{run_label(r)} · best adapter (step {best['step']}, val {best['val_loss']:.3f})", f"best:{r.id}")
            )
    return out


def base_choices(store) -> list[str]:
    seen = [AUTO, EMBEDDED_MODEL]
    for r in finished_runs(store):
        m = str(r.config.get("model", ""))
        if m and m not in seen:
            seen.append(m)
    return seen


def resolve_pane(choice: str | None, store) -> Pane:
    choice = (choice or BASE).strip()
    if choice == BASE:
        return Pane(label="base")
    if choice.startswith(("run:", "best:")):
        which, _, rid = choice.partition(":")
        try:
            r = store.get_run(int(rid))
            folder = chosen_adapter(r, "best") if which == "best" else adapter_dir(r)
        except (KeyError, ValueError) as e:
            return Pane(
                label=choice, error=str(e) if isinstance(e, ValueError) and rid.isdigit() else f"{choice}: no such run"
            )
        suffix = " best" if which == "best" else ""
        return Pane(
            label=f"run {r.id}{suffix}",
            name=f"run{r.id}{suffix.strip()}",
            folder=str(folder),
            base=str(r.config.get("model", "")),
        )
    folder = str(Path(choice).expanduser())
    if not is_adapter_folder(folder):
        return Pane(
            label=Path(folder).name or choice, error=f"{choice} is not an adapter folder (no adapter_config.json)"
        )
    digest = hashlib.sha1(str(Path(folder).resolve()).encode()).hexdigest()[:8]
    return Pane(label=Path(folder).name, name=f"folder-{digest}", folder=folder, base=adapter_base_model(folder))


def pick_base(base_choice: str | None, panes: list[Pane]) -> str:
    """The base model: as chosen, else the base of the first adapter pane, else the embedded model."""
    choice = (base_choice or AUTO).strip()
    if choice and choice != AUTO:
        return choice
    return next((p.base for p in panes if p.base), None) or EMBEDDED_MODEL


def stats_text(s: PaneStats | None) -> str:
    if s is None:
        return ""
    if s.error:
        return f"⚠ {s.error}"
    first = f" · first token {s.first_token_s:.2f} s" if s.first_token_s is not None else ""
    stopped = " · stopped" if s.stopped else ""
    return f"{s.tokens} tokens · {s.tokens_per_s:.1f} tok/s{first} · {s.seconds:.2f} s{stopped}"


def gb(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f} GB"


def size(n: int | None) -> str:
    n = n or 0
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def training_note(store, info: dict[str, Any]) -> str:
    """What a running training job means for the chat (said in the status line)."""
    running = store.list_runs(status=RunStatus.RUNNING.value)
    if not running:
        return ""
    ids = ", ".join(f"#{r.id}" for r in running)
    if not info:
        return (
            f"Training run {ids} is running: the chat model will load on the CPU so it takes no GPU memory "
            "from the job (slower)."
        )
    if info.get("device", "").startswith("cuda"):
        return (
            f"Training run {ids} is running while the chat model holds {gb(info.get('cuda_allocated_gb'))} of "
            "GPU memory; if the job runs short of memory, press Unload."
        )
    if info.get("cuda_available"):
        return (
            f"Training run {ids} is using the GPU: the chat runs on the CPU (slower). Unload and send again "
            "after the job ends to chat on the GPU."
        )
    return f"Training run {ids} is running on this CPU too: both share the cores, so both are slower."


def status_text(info: dict[str, Any], note: str = "") -> str:
    if not info:
        text = "**Chat worker:** not running (it starts with the first message; Unload ends it and frees its memory)."
    else:
        adapters = ", ".join(info.get("adapters") or {}) or "none"
        mem = f"RSS {gb(info.get('rss_gb'))} (peak {gb(info.get('peak_rss_gb'))})"
        if info.get("cuda_allocated_gb") is not None:
            mem += f" · GPU {gb(info.get('cuda_allocated_gb'))} (peak {gb(info.get('cuda_max_allocated_gb'))})"
        text = (
            f"**Chat worker:** `{info.get('base')}` on {info.get('device')} ({info.get('dtype')}"
            f"{', ' + info['quant'] if info.get('quant') not in (None, 'none') else ''}) · adapters: {adapters} · "
            f"base weights held once: {size(info.get('base_bytes'))}, LoRA {size(info.get('lora_bytes'))} · {mem}"
        )
        if info.get("note"):
            text += f"  \n{info['note']}"
    return text + (f"  \n{note}" if note else "")


# ---- handlers -----------------------------------------------------------------------------------------


class Session:
    """Per-browser-session Stop flags (keyed by Gradio's session hash), shared by the handlers."""

    def __init__(self) -> None:
        self.cancels: dict[str, threading.Event] = {}
        self.lock = threading.Lock()

    def begin(self, key: str) -> threading.Event:
        with self.lock:
            ev = self.cancels[key] = threading.Event()
            return ev

    def stop(self, key: str) -> None:
        with self.lock:
            ev = self.cancels.get(key)
        if ev is not None:
            ev.set()


def _key(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"


class _Frames:
    """What the panes show during one send: each pane's history, the prompt, and the reply being written."""

    def __init__(self, c: ChatTab, n: int, histories: list[list[dict]], prompt: str):
        self.c, self.n, self.histories = c, n, histories
        turn = [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]
        self.shown = [list(h) + list(turn) for h in histories[:n]]
        self.texts = {i: "" for i in range(n)}
        self.stats: dict[int, PaneStats] = {}

    def __call__(self, status: str | None = None, final: bool = False) -> dict:
        c = self.c
        out: dict = {c.prompt: ""} if final or status is not None else {}  # cleared once sent
        for i in range(self.n):
            self.shown[i][-1] = {"role": "assistant", "content": self.texts[i]}
            out[c.bots[i]] = self.shown[i]
            out[c.stats[i]] = stats_text(self.stats.get(i))
        if status is not None:
            out[c.status] = status
        if final:
            out[c.histories] = self.histories
        return out


def attach_panes(worker: ChatWorker, store, base: str, panes: list[Pane]) -> list[Pane]:
    """Hold `base` in the worker (on the CPU while a training job runs) and attach every pane's adapter; a
    pane whose adapter cannot be used gets its error. Raises ChatError when the worker itself fails."""
    running_job = bool(store.list_runs(status=RunStatus.RUNNING.value))
    worker.start(base, device="cpu" if running_job else "auto", threads=1 if running_job else 0)
    out = list(panes)
    for i, p in enumerate(panes):
        if p.error is None and p.name:
            try:
                worker.ensure_adapter(p.name, p.folder)
            except WorkerDied:
                raise
            except ChatError as e:
                out[i] = Pane(label=p.label, error=str(e))
    return out


def send(
    prompt,
    n_panes,
    base_choice,
    system,
    max_new_tokens,
    temperature,
    top_p,
    seed,
    choices,
    histories,
    request: gr.Request = None,
    *,
    store,
    worker: ChatWorker,
    sessions: Session,
    c: ChatTab,
):
    """Generator: append the prompt to every visible pane, then stream all panes together."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise refuse("Type a message first")
    n = int(n_panes)
    histories = [list(h) for h in (histories or [[] for _ in range(MAX_PANES)])]
    panes = [resolve_pane(choices[i], store) for i in range(n)]
    base = pick_base(base_choice, panes)
    frame = _Frames(c, n, histories, prompt)
    note = training_note(store, worker.info if worker.running else {})
    if not worker.running or worker.base != base:
        yield frame(f"Loading `{base}` in the chat worker (the first start imports torch: 10–30 s)…  \n{note}")
    try:
        panes = attach_panes(worker, store, base, panes)
    except ChatError as e:  # WorkerDied included: its message says the next message restarts it
        frame.texts.update({i: f"⚠ {e}" for i in range(n)})
        yield frame(status_text({}, f"⚠ {e}"), final=True)
        return
    frame.texts.update({i: f"⚠ {p.error}" for i, p in enumerate(panes) if p.error})
    runnable = [i for i, p in enumerate(panes) if not p.error]
    params = GenParams(
        max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p), seed=int(seed or 0)
    )
    prefix = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    requests = [(i, prefix + histories[i] + [{"role": "user", "content": prompt}], panes[i].name) for i in runnable]
    cancel = sessions.begin(_key(request))
    yield frame(status_text(worker.info, note))
    last = time.monotonic()
    try:
        for i, delta in worker.stream_many(requests, params, on_done=frame.stats.__setitem__, cancel=cancel):
            frame.texts[i] += delta
            if time.monotonic() - last >= YIELD_EVERY_S:
                last = time.monotonic()
                yield frame()
    except ChatError as e:
        for i in runnable:
            frame.texts[i] += f"\n\n⚠ {e}"
        yield frame(status_text({}, f"⚠ {e}"), final=True)
        return
    for i in runnable:  # keep the turn in this pane's own history (an error reply is not kept)
        histories[i] = [
            *histories[i],
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": frame.texts[i]},
        ]
    yield frame(status_text(worker.info, training_note(store, worker.info)), final=True)


def stop(request: gr.Request = None, *, sessions: Session) -> None:
    sessions.stop(_key(request))


def clear(*, c: ChatTab) -> dict:
    out: dict = {c.histories: [[] for _ in range(MAX_PANES)]}
    for i in range(MAX_PANES):
        out[c.bots[i]] = []
        out[c.stats[i]] = ""
    return out


def clear_pane(i: int, histories, *, c: ChatTab) -> dict:
    """A pane switched to another model starts a new conversation."""
    histories = [list(h) for h in (histories or [[] for _ in range(MAX_PANES)])]
    histories[i] = []
    return {c.histories: histories, c.bots[i]: [], c.stats[i]: ""}


def show_panes(n) -> list:
    return [gr.update(visible=i < int(n)) for i in range(MAX_PANES)]


def refresh_choices(base_choice, export_run=None, *, store, worker: ChatWorker | None = None) -> list:
    """[4 pane pickers, base, export run, status] with the runs now; what is chosen stays (a pane keeps its
    chat). The status says what the worker holds (no call to it: its last report) and which run trains."""
    runs = export_choices(store)
    ids = [i for _, i in runs]
    keep = export_run if export_run in ids else (ids[0] if ids else None)
    info = worker.info if worker is not None and worker.running else {}
    return [
        *(gr.update(choices=pane_choices(store)) for _ in range(MAX_PANES)),
        gr.update(choices=base_choices(store), value=base_choice),
        gr.update(choices=runs, value=keep),
        status_text(info, training_note(store, info)),
    ]


def report(*, store, worker: ChatWorker) -> str:
    info = worker.report()
    return status_text(info, training_note(store, info))


def unload(*, store, worker: ChatWorker) -> str:
    worker.close()
    return status_text({}, "Unloaded: the worker process ended and its memory was freed.")


# ---- layout --------------------------------------------------------------------------------------------


@dataclass
class ChatTab:
    prompt: Any = None
    bots: list = None  # type: ignore[assignment]
    stats: list = None  # type: ignore[assignment]
    status: Any = None
    histories: Any = None
    worker: ChatWorker | None = None
    refresh: Any = None  # (fn, inputs, outputs): runs into the pickers, the status; on load and when runs change


def build_chat_tab(store, runner, home: Path, backend=None) -> ChatTab:
    home = Path(home)
    if backend is None:
        from ui.backend import Backend

        backend = Backend(home, db_url=store.url)
    c = ChatTab(worker=ChatWorker(home))
    w = SimpleNamespace()
    panes_layout(c, w, store)
    with gr.Accordion("Generation settings (the same in every pane)", open=False):
        with gr.Row():
            w.max_new = gr.Slider(1, 1024, 128, step=1, label="Max new tokens")
            w.temperature = gr.Slider(0, 2, 0.7, step=0.05, label="Temperature", info="0 = greedy")
            w.top_p = gr.Slider(0.05, 1, 0.95, step=0.05, label="Top-p")
            w.seed = gr.Number(0, precision=0, label="Seed", info="reset per pane: differences come from the weights")
        w.system = gr.Textbox(label="System prompt (optional)", lines=2)
    with gr.Row():
        c.status = gr.Markdown(status_text({}, training_note(store, {})), elem_id="chat-status")
        status_btn = gr.Button("Worker status", size="sm", scale=0, min_width=120)
        unload_btn = gr.Button("Unload", size="sm", scale=0, min_width=90, elem_id="chat-unload")
    export_run = export_panel(store, home, backend)
    c.histories = gr.State([[] for _ in range(MAX_PANES)])
    wire_chat(c, w, store, Session())
    c.refresh = (
        partial(refresh_choices, store=store, worker=c.worker),
        [w.base_choice, export_run],
        [*w.pickers, w.base_choice, export_run, c.status],
    )
    w.refresh_btn.click(*c.refresh, api_name=False)
    status_btn.click(partial(report, store=store, worker=c.worker), None, [c.status], api_name="chat_status")
    unload_btn.click(partial(unload, store=store, worker=c.worker), None, [c.status], api_name="chat_unload")
    return c


def panes_layout(c: ChatTab, w, store) -> None:
    """The base model, 2–4 panes (a model picker, a chatbot and stats each) and the prompt row."""
    opts = pane_choices(store)
    first_run = opts[1][1] if len(opts) > 1 else BASE
    with gr.Row():
        w.n_panes = gr.Radio([2, 3, 4], value=2, label="Panes", scale=1, elem_id="chat-n-panes")
        w.base_choice = gr.Dropdown(
            base_choices(store),
            value=AUTO,
            allow_custom_value=True,
            scale=3,
            label="Base model (all panes share it)",
            elem_id="chat-base",
            info="auto = the base of the first run chosen below, else the embedded model",
        )
        w.refresh_btn = gr.Button("↻ Runs", size="sm", scale=0, min_width=80)
    w.columns, w.pickers, c.bots, c.stats = [], [], [], []
    with gr.Row(equal_height=False):
        for i in range(MAX_PANES):
            with gr.Column(visible=i < 2, min_width=240) as col:
                w.pickers.append(
                    gr.Dropdown(
                        opts,
                        value=BASE if i == 0 else first_run,
                        allow_custom_value=True,
                        label=f"Pane {i + 1}",
                        elem_id=f"chat-pane-{i}",
                        info="base, a finished run, or an adapter folder",
                    )
                )
                c.bots.append(
                    gr.Chatbot(
                        label=f"Pane {i + 1}",
                        height=380,
                        elem_id=f"chat-bot-{i}",
                        feedback_options=None,
                        buttons=["copy"],
                    )
                )
                c.stats.append(gr.Markdown(elem_id=f"chat-stats-{i}"))
            w.columns.append(col)
    with gr.Row():
        c.prompt = gr.Textbox(
            placeholder="One message, sent to every pane", show_label=False, scale=6, elem_id="chat-prompt", lines=1
        )
        w.send_btn = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        w.stop_btn = gr.Button("Stop", scale=1, elem_id="chat-stop")
        w.clear_btn = gr.Button("Clear", scale=1, elem_id="chat-clear")


def wire_chat(c: ChatTab, w, store, sessions: Session) -> None:
    send_fn = partial(send, store=store, worker=c.worker, sessions=sessions, c=c)

    def send_handler(prompt, n, base, sys_prompt, mx, temp, tp, sd, histories, p0, p1, p2, p3, request: gr.Request):
        yield from send_fn(prompt, n, base, sys_prompt, mx, temp, tp, sd, [p0, p1, p2, p3], histories, request)

    send_inputs = [
        c.prompt,
        w.n_panes,
        w.base_choice,
        w.system,
        w.max_new,
        w.temperature,
        w.top_p,
        w.seed,
        c.histories,
        *w.pickers,
    ]
    gr.on(
        [w.send_btn.click, c.prompt.submit],
        send_handler,
        send_inputs,
        [c.prompt, *c.bots, *c.stats, c.status, c.histories],
        api_name="chat_send",
        show_progress="hidden",
    )
    w.stop_btn.click(partial(stop, sessions=sessions), None, None, api_name="chat_stop", queue=False)
    w.clear_btn.click(partial(clear, c=c), None, [*c.bots, *c.stats, c.histories], api_name="chat_clear")
    w.n_panes.change(show_panes, [w.n_panes], w.columns, api_name=False)
    for i, picker in enumerate(w.pickers):  # another model in the pane, or its own 🗑: a new conversation there
        gr.on(
            [picker.change, c.bots[i].clear],
            partial(clear_pane, i, c=c),
            [c.histories],
            [c.histories, c.bots[i], c.stats[i]],
            api_name=False,
        )
