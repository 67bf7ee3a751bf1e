"""Talking to models: `generate` (one reply) and `chat` (interactive, base and adapters side by side)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from engine.cli.common import fail, home_of, key_error, open_store, say
from engine.core.config import EMBEDDED_MODEL
from engine.core.runs import adapter_dir


def cmd_generate(args) -> int:
    from engine.ml.generate import ChatModel, GenParams, adapter_base_model

    adapter, base = args.adapter, args.base
    if args.run is not None:
        try:
            r = open_store(args).get_run(args.run)
        except KeyError as e:
            return fail(key_error(e))
        adapter = str(adapter_dir(r, args.home))
        base = base or r.config.get("model", EMBEDDED_MODEL)
    if adapter and not base:
        base = adapter_base_model(adapter) or EMBEDDED_MODEL
    base = base or EMBEDDED_MODEL
    chat = ChatModel.load(base, {"adapter": adapter} if adapter else None, home=home_of(args))
    params = GenParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}
    ]
    for piece in chat.stream(messages, "adapter" if adapter else None, params):
        print(piece, end="", flush=True)
    print()
    return 0


def adapter_name(path: str, taken: Iterable[str]) -> str:
    """A short pane name for an adapter folder: run3 for <home>/runs/3/adapter, else the folder's name."""
    p = Path(path).expanduser().resolve()
    name = p.name
    if p.name == "adapter":
        name = f"run{p.parent.name}" if p.parent.name.isdigit() else p.parent.name
    taken, n, out = set(taken), 2, name
    while out in taken or out == "base":
        out, n = f"{name}-{n}", n + 1
    return out


def cmd_chat(args) -> int:
    from engine.core.chat import GenParams
    from engine.ml.generate import AdapterBaseMismatch, ChatModel, adapter_base_model

    dirs = list(args.adapter or [])
    try:
        dirs += [str(adapter_dir(open_store(args).get_run(rid), args.home)) for rid in args.run or []]
    except KeyError as e:
        return fail(key_error(e))
    base = args.base or (adapter_base_model(dirs[0]) if dirs else None) or EMBEDDED_MODEL
    names: dict[str, str] = {}
    for d in dirs:
        names[adapter_name(d, names)] = d
    say(f"loading {base} with {len(names)} adapter(s) ...")
    try:
        chat = ChatModel.load(base, quant=args.quant, home=home_of(args))
        for name, d in names.items():
            chat.add_adapter(name, d)
    except (AdapterBaseMismatch, FileNotFoundError, ValueError) as e:
        return fail(str(e))
    params = GenParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    say(
        f"chatting with {', '.join(['base', *names] if args.compare else [next(iter(names), 'base')])} on {base} "
        f"({chat.device}). Commands: /use NAME|base, /compare, /reset, /quit"
    )
    chat_loop(chat, names, params, args.system, compare=args.compare)
    return 0


def chat_loop(chat, names: dict[str, str], params, system: str | None, *, compare: bool) -> None:
    """Read prompts from stdin until /quit or end of input; answer each in every active pane."""
    panes: list[str | None] = [None, *names] if compare else [next(iter(names), None)]
    sys_msgs = [{"role": "system", "content": system}] if system else []
    history: dict[str | None, list[dict[str, str]]] = {p: list(sys_msgs) for p in [None, *names]}
    label = lambda p: p or "base"
    tty = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if tty else "").strip()
        except EOFError:
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history = {p: list(sys_msgs) for p in history}
        elif line == "/compare":
            panes = [None, *names]
        elif line.startswith("/use"):
            want = line.split(maxsplit=1)[1] if " " in line else ""
            if want not in ("base", *names):
                print(f"error: no pane {want!r}; choose base or {', '.join(names) or '(no adapters)'}", file=sys.stderr)
            else:
                panes = [None if want == "base" else want]
        else:
            for p in panes:
                history[p].append({"role": "user", "content": line})
                print(f"[{label(p)}] " if len(panes) > 1 else "", end="", flush=True)
                pieces = []
                for piece in chat.stream(history[p], p, params):
                    pieces.append(piece)
                    print(piece, end="", flush=True)
                print(flush=True)
                history[p].append({"role": "assistant", "content": "".join(pieces)})


def register(sub) -> None:
    g = sub.add_parser("generate", help="one chat reply from a base model, an adapter or a run")
    g.add_argument("--run", type=int, help="use this run's adapter (and its base model)")
    g.add_argument("--adapter", help="a PEFT adapter folder")
    g.add_argument("--base", help=f"base model (default: the run's, the adapter's, or {EMBEDDED_MODEL})")
    g.add_argument("--prompt", required=True)
    g.add_argument("--system", help="an optional system message")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with a base model and adapters, streamed")
    c.add_argument("--base", help=f"base model (default: the first adapter's base, else {EMBEDDED_MODEL})")
    c.add_argument("--adapter", action="append", help="a PEFT adapter folder (repeat for several)")
    c.add_argument("--run", type=int, action="append", help="the adapter of this run (repeatable)")
    c.add_argument("--compare", action="store_true", help="answer every prompt with the base and each adapter")
    c.add_argument("--quant", default="none", choices=["none", "8bit", "4bit"])
    c.add_argument("--system", help="a system message at the start of every conversation")
    c.add_argument("--max-new-tokens", type=int, default=128)
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    c.add_argument("--top-p", type=float, default=0.95)
    c.add_argument("--seed", type=int, default=0, help="the same seed for every pane")
    c.set_defaults(fn=cmd_chat)
