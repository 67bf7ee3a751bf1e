"""The engine's command line: everything the UI does, the CLI does too (the UI launches these commands).

    python -m engine train examples/quickstart.yaml        # or `loralab train ...` after `pip install -e .`
    python -m engine runs [--json]                         # list runs
    python -m engine show ID [--json]                      # one run: config, status, losses, paths
    python -m engine generate --run ID --prompt "Who are you?"
    python -m engine inspect MODEL [--json]                # architecture and LoRA-able modules
    python -m engine importance ID [--dataset D] [--json]  # LoRA-drop's output importance per module
    python -m engine compare --runs 3 best:3 --base --val  # outputs and scores side by side
    loralab app [--port 8080 ...]                          # the web app (app.py, ui/server.py)

Global flags: --home DIR (data home, default $LORALAB_HOME or ~/.loralab), --db-url URL (another
database, default $LORALAB_DB_URL or SQLite in the data home). This module only parses and dispatches;
each subcommand lives in its own module and imports torch only when it needs it, so `runs` and `show`
answer instantly.
"""

from __future__ import annotations

import argparse
import os
import sys

from engine.cli import analyses, chat, check, compare, hub, importance, insight, model, queue, sweep, train
from engine.cli.common import fail, internal_error, is_user_error

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SUBCOMMANDS = (
    train,
    queue,
    model,
    check,
    chat,
    insight,
    importance,
    hub,
    sweep,
    analyses,
    compare,
)  # each has register(subparsers)


def cmd_app(args) -> int:
    """`loralab app ...`: the web app, with the global --home/--db-url passed on."""
    from ui import server as app

    argv = list(args.app_args)
    if args.home and "--home" not in argv:
        argv = ["--home", args.home, *argv]
    if args.db_url and "--db-url" not in argv:
        argv = ["--db-url", args.db_url, *argv]
    return app.main(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loralab",
        description="LoRA Lab: fine-tune causal LMs with LoRA and see what "
        "the adapter learned (same commands as `python -m engine`)",
    )
    p.add_argument("--home", help="data home (default $LORALAB_HOME or ~/.loralab)")
    p.add_argument("--db-url", default=os.environ.get("LORALAB_DB_URL"), help="SQLAlchemy URL of another database")
    sub = p.add_subparsers(dest="cmd", required=True)
    for module in SUBCOMMANDS:
        module.register(sub)
    # `app` takes app.py's own flags (--port, --auth, --help, ...): parse_known_args hands them over.
    a = sub.add_parser("app", help="start the web app (same flags as app.py; `loralab app --help`)", add_help=False)
    a.set_defaults(fn=cmd_app)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "app":
        args.app_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except Exception as e:  # every command: bad input is one line, a bug's traceback goes to the log
        if is_user_error(e):
            return fail(str(e))
        return internal_error(args, e)


if __name__ == "__main__":
    sys.exit(main())
