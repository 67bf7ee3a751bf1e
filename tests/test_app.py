"""app.py: no torch in the server process, a safe bind by default, auth parsing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ui import server as app

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1"}


def test_fresh_interpreter_builds_the_app_without_torch(tmp_path):
    code = f"""
import sys
import app, ui
from engine.core.jobs import JobRunner
from storage import Store
from ui import build_app, launch_kwargs
home = {str(tmp_path)!r}
store = Store.for_home(home)
demo = build_app(store, JobRunner(store, home), home, doctor={{"device": "cpu", "quant": {{}}}})
launch_kwargs(home)
heavy = sorted(m for m in ("torch", "transformers", "peft", "bitsandbytes", "accelerate") if m in sys.modules)
print("HEAVY", heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HEAVY []" in out.stdout, out.stdout


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_needs_no_auth(host):
    assert app.check_bind(host, None, False) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "myhost.example.org"])
def test_public_bind_needs_auth_or_insecure(host):
    msg = app.check_bind(host, None, False)
    assert msg and "--auth" in msg and "--insecure" in msg
    assert app.check_bind(host, "alice:secret", False) is None
    assert app.check_bind(host, None, True) is None


def test_main_refuses_public_bind_without_auth(capsys):
    assert app.main(["--host", "0.0.0.0", "--home", "/nonexistent/never-created"]) == 2
    assert "refusing to bind '0.0.0.0' without --auth" in capsys.readouterr().err
    assert not Path("/nonexistent/never-created").exists()  # refused before touching anything


def test_cli_refuses_public_bind_in_a_real_process(tmp_path):
    out = subprocess.run(
        [sys.executable, "app.py", "--host", "0.0.0.0", "--home", str(tmp_path / "h")],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "refusing to bind" in out.stderr
    assert not (tmp_path / "h").exists()


def test_auth_parsing(tmp_path):
    assert app.read_auth(None) is None
    assert app.read_auth("alice:s3:cret") == [("alice", "s3:cret")]  # the password may contain a colon
    f = tmp_path / "users.txt"
    f.write_text("# team\nalice:one\n\nbob:two\n")
    assert app.read_auth(str(f)) == [("alice", "one"), ("bob", "two")]
    f.write_text("alice:one\nbob\n")
    with pytest.raises(ValueError, match=r"users.txt:2: expected user:pass"):
        app.read_auth(str(f))
    with pytest.raises(ValueError):
        app.read_auth("no-colon")
    with pytest.raises(ValueError):
        app.read_auth(":nouser")


def test_bad_auth_file_exits_2(tmp_path, capsys):
    f = tmp_path / "users.txt"
    f.write_text("# nobody\n")
    assert app.main(["--auth", str(f), "--home", str(tmp_path / "h")]) == 2
    assert "no user:pass lines" in capsys.readouterr().err


def test_flags_and_defaults():
    a = app.build_parser().parse_args([])
    # max_concurrent None: one run per GPU (on disjoint GPUs), one on a machine without GPUs (JobRunner.limit)
    assert (a.host, a.port, a.auth, a.insecure, a.max_concurrent) == ("127.0.0.1", 7860, None, False, None)
    a = app.build_parser().parse_args(
        [
            "--host",
            "0.0.0.0",
            "--port",
            "9000",
            "--home",
            "/h",
            "--db-url",
            "sqlite://",
            "--auth",
            "u:p",
            "--insecure",
            "--max-concurrent",
            "2",
        ]
    )
    assert (a.port, a.home, a.db_url, a.auth, a.insecure, a.max_concurrent) == (9000, "/h", "sqlite://", "u:p", True, 2)
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
