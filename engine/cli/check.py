"""`check`: can this run start? The model resolves (no weights read), its targets exist, quantization works
here, the dataset parses and yields a trainable example; every problem at once, in seconds.

    python -m engine check run.yaml           # one line per problem, exit 2; 'ok' and the data's counts
    python -m engine check - --json < cfg.json  # the web UI's Launch: the verdict as JSON (exit 0)
"""

from __future__ import annotations

import json
import sys

from engine.cli.common import fail, home_of, print_json, say
from engine.core.config import ConfigError, RunConfig


def read_config(source: str) -> RunConfig:
    """A run config from a YAML/JSON file, or from JSON on stdin when source is '-'."""
    if source != "-":
        return RunConfig.from_file(source)
    try:
        data = json.loads(sys.stdin.read())
    except json.JSONDecodeError as e:
        raise ConfigError([f"stdin: not valid JSON at line {e.lineno}: {e.msg}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"stdin: top level must be a mapping of fields, got {type(data).__name__}"])
    return RunConfig.from_dict(data)


def run_check(cfg: RunConfig, args) -> dict:
    from engine.ml.check import check_run

    return check_run(cfg, home_of(args))


def cmd_check(args) -> int:
    try:
        cfg = read_config(args.config)
    except ConfigError as e:
        if args.json:
            print_json({"ok": False, "problems": e.problems})
            return 0
        return fail(str(e))
    report = run_check(cfg, args)
    if args.json:
        print_json(report)
        return 0
    if not report["ok"]:
        for p in report["problems"]:
            fail(p)
        return 2
    data, est = report.get("data") or {}, report.get("estimate") or {}
    say(
        f"ok: {cfg.model} resolves; {data.get('format')} data, {data.get('train', 0):,} train / "
        f"{data.get('val', 0):,} val examples, {data.get('tokens_kept', 0):,} of {data.get('tokens_total', 0):,} "
        f"tokens kept" + (f"; memory ≈ {est['total_gb']:.2f} GB on {est['device']} ({est['basis']})" if est else "")
    )
    return 0


def register(sub) -> None:
    c = sub.add_parser("check", help="can this run start? model, targets, quantization and dataset, all at once")
    c.add_argument("config", help="YAML or JSON run config, or - for JSON on stdin")
    c.add_argument("--json", action="store_true", help="the verdict as JSON (exit 0 either way)")
    c.set_defaults(fn=cmd_check)
