"""How LoRA Lab starts its other processes: always `python -m engine ...` (or an engine worker module) from
the project root, with one environment. Stdlib only.

    argv = engine_argv(["train", "runs/3/config.json", "--run-id", "3"], home=home)
    argv = torchrun_argv(["train", "runs/3/config.json", "--run-id", "3"], nproc=2, home=home)
    data = run_engine_json(["inspect", "embedded:SmolLM2-135M-Instruct", "--json"], home=home, timeout=180)

The job queue (engine.core.jobs), the chat client (engine.core.chat) and the web UI (ui.backend) go through
here, so a child always finds the code, the data home and the database its parent uses. A database URL
travels in the environment (LORALAB_DB_URL), never on the command line, where `ps` would show a password.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds engine/, ui/, storage/
DB_URL_ENV = "LORALAB_DB_URL"


class EngineCommandError(ValueError):
    """An engine command failed; the message is the command's own one-line error."""


def engine_env(extra: Mapping[str, str] | None = None, *, db_url: str | None = None) -> dict[str, str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}
    if db_url:
        env[DB_URL_ENV] = db_url
    env.update(extra or {})
    return env


def engine_argv(
    args: Sequence[str], *, home: str | os.PathLike | None = None, python: str = sys.executable, module: str = "engine"
) -> list[str]:
    """`python -m engine [--home HOME] ARGS...` as an argument list."""
    return [python, "-m", module, *(["--home", os.fspath(home)] if home is not None else []), *map(str, args)]


def torchrun_argv(
    args: Sequence[str],
    nproc: int,
    *,
    home: str | os.PathLike | None = None,
    python: str = sys.executable,
    nnodes: int = 1,
    node_rank: int = 0,
    master: str | None = None,
) -> list[str]:
    """torchrun around exactly the engine command: `python -m torch.distributed.run --standalone
    --nproc_per_node N -m engine [--home HOME] ARGS...`; with nnodes > 1 the multi-node form
    (`--nnodes 2 --node_rank R --master_addr HOST --master_port PORT`, master = 'HOST:PORT')."""
    if nnodes > 1:
        addr, _, port = (master or "").rpartition(":")
        where = ["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--master_addr", addr, "--master_port", port]
    else:
        where = ["--standalone"]
    inner = engine_argv(args, home=home, python=python)[1:]  # -m engine [--home HOME] ARGS...
    return [python, "-m", "torch.distributed.run", *where, "--nproc_per_node", str(nproc), *inner]


def cli_error(stdout: str, stderr: str, code: int) -> str:
    """The most useful line of a failed command: its JSON {"error"}, its 'error:' line, or its last line."""
    try:
        data = json.loads(stdout)
        if isinstance(data, dict) and data.get("error"):
            return str(data["error"])
    except json.JSONDecodeError:
        pass
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("error:"):  # with the lines that continue it (a list of config problems)
            more = [ln for ln in lines[i + 1 :] if ln.startswith("- ")]
            return "\n".join([lines[i][len("error:") :].strip(), *more])
    return lines[-1] if lines else f"the engine command exited with code {code} and said nothing"


def run_engine(
    args: Sequence[str],
    timeout: float,
    *,
    home: str | os.PathLike,
    db_url: str | None = None,
    python: str = sys.executable,
    env: Mapping[str, str] | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess:
    """Run one engine command to its end; EngineCommandError with its error line if it fails or times out."""
    try:
        proc = subprocess.run(
            engine_argv(args, home=home, python=python),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO_ROOT,
            env=engine_env(env, db_url=db_url),
            input=stdin,
        )
    except subprocess.TimeoutExpired:
        raise EngineCommandError(
            f"`{' '.join(map(str, args[:2]))}` took longer than {timeout:.0f} s and was stopped"
        ) from None
    if proc.returncode != 0:
        raise EngineCommandError(cli_error(proc.stdout, proc.stderr, proc.returncode))
    return proc


def run_engine_json(args: Sequence[str], timeout: float, **kw: Any) -> Any:
    """run_engine() and parse the JSON it printed on stdout."""
    proc = run_engine(args, timeout, **kw)
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise EngineCommandError(f"the engine printed something that is not JSON: {proc.stdout[:300]!r}") from None
    if isinstance(data, dict) and "error" in data and len(data) == 1:
        raise EngineCommandError(str(data["error"]))
    return data


def spawn_engine(
    args: Sequence[str],
    *,
    home: str | os.PathLike | None = None,
    module: str = "engine",
    python: str = sys.executable,
    db_url: str | None = None,
    env: Mapping[str, str] | None = None,
    nproc: int = 1,
    **popen: Any,
) -> subprocess.Popen:
    """Start a long-running engine process (a training run, the chat worker) in its own session; with
    nproc > 1, torchrun starting that many processes of it (torchrun_argv)."""
    argv = (
        torchrun_argv(args, nproc, home=home, python=python)
        if nproc > 1
        else engine_argv(args, home=home, python=python, module=module)
    )
    return subprocess.Popen(
        argv,
        cwd=REPO_ROOT,
        env=engine_env(env, db_url=db_url),
        start_new_session=True,
        **popen,
    )
