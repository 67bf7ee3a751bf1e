"""The web server behind app.py and `loralab app`: flags, safe bind, auth, the store, the job queue, the UI.

Binding anything but a loopback address needs --auth (or an explicit --insecure): the app launches
training jobs and reads files on this machine. No share links, no analytics. This process never
imports torch; training runs in child processes (`python -m engine train ...`).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
import threading
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="app.py", description="LoRA Lab web app (also `loralab app`)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--home", help="data home (default $LORALAB_HOME or ~/.loralab)")
    p.add_argument(
        "--db-url",
        default=os.environ.get("LORALAB_DB_URL"),
        help="SQLAlchemy URL of another database (default: SQLite in the data home)",
    )
    p.add_argument("--auth", help="'user:pass', or a file with one user:pass per line; required off loopback")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without --auth")
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="training jobs at once (default: one per GPU, on disjoint GPUs; 1 without GPUs)",
    )
    p.add_argument(
        "--data-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder the app may read datasets from, besides its uploads (repeatable); typed paths elsewhere "
        "are refused",
    )
    return p


def check_data_dirs(dirs: list[str]) -> list[Path]:
    """The --data-dir folders, resolved; ValueError for one that is not a folder."""
    out = []
    for d in dirs:
        p = Path(d).expanduser().resolve()
        if not p.is_dir():
            raise ValueError(f"--data-dir {d!r} is not a folder")
        out.append(p)
    return out


def is_loopback(host: str) -> bool:
    if host.strip().lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(host: str, auth: str | None, insecure: bool) -> str | None:
    """The refusal message for an unsafe bind, or None when it is fine."""
    if is_loopback(host) or auth or insecure:
        return None
    return (
        f"refusing to bind {host!r} without --auth: anyone who can reach this address could launch jobs and "
        "read files on this machine. Give --auth user:pass (or a file of user:pass lines), bind 127.0.0.1 "
        "and use an SSH tunnel, or pass --insecure if the network is trusted."
    )


def read_auth(value: str | None) -> list[tuple[str, str]] | None:
    """'user:pass' or a path to a file of 'user:pass' lines (blank lines and # comments skipped)."""
    if not value:
        return None
    p = Path(value).expanduser()
    lines = p.read_text(encoding="utf-8").splitlines() if p.is_file() else [value]
    pairs = []
    for n, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            where = f"{p}:{n}" if p.is_file() else "--auth"
            raise ValueError(
                f"{where}: expected user:pass, got {'a line without a colon' if not sep else 'an empty part'}"
            )
        pairs.append((user, password))
    if not pairs:
        raise ValueError(f"{value}: no user:pass lines")
    return pairs


def _warm_doctor(backend) -> None:
    try:
        backend.doctor()
    except ValueError as e:  # the page says it again when it loads; the server keeps going
        print(f"warning: could not ask the engine what this machine can do: {e}", file=sys.stderr, flush=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    refusal = check_bind(args.host, args.auth, args.insecure)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    try:
        auth = read_auth(args.auth)
    except (OSError, ValueError) as e:
        print(f"error: --auth: {e}", file=sys.stderr)
        return 2
    try:
        data_dirs = check_data_dirs(args.data_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from engine.core.home import data_home, open_store
    from engine.core.jobs import JobRunner
    from ui import build_app, close_tabs, launch_kwargs
    from ui.backend import Backend

    home = data_home(args.home)
    store = open_store(home, args.db_url)
    runner = JobRunner(store, home, max_concurrent=args.max_concurrent, db_url=args.db_url)
    recovered = runner.recover()
    if recovered:
        print(f"recovered runs after a restart: {', '.join(f'#{i}' for i in recovered)}")
    runner.start()
    backend = Backend(home, db_url=store.url, data_dirs=data_dirs)
    # Ask the engine what this machine can do (imports torch: seconds) while the server starts.
    threading.Thread(target=_warm_doctor, args=(backend,), name="doctor", daemon=True).start()
    demo = build_app(store, runner, home, backend=backend)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"LoRA Lab: http://{shown}:{args.port}  (data home {home})", flush=True)
    if data_dirs:
        print(f"datasets readable from: {', '.join(map(str, backend.allowed_places()))}", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the server like Ctrl+C; training jobs go on
    try:
        demo.launch(
            server_name=args.host,
            server_port=args.port,
            auth=auth,
            show_error=True,
            share=False,
            quiet=True,
            **launch_kwargs(home),
        )
    finally:
        close_tabs(demo)
        runner.stop()  # running training jobs go on; the next start adopts them
    return 0
