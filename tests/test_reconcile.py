"""Nothing stays `running`: the scheduler's periodic reconcile ends every run whose process is gone, with the
true cause, without a restart; the scheduler and its watchers survive database errors and failed launches.

The children are the real CLI with engine.ml.train replaced by a stand-in (FAKE_TRAIN picks what it does):
what is tested is the queue's bookkeeping, not training, and a torch start-up per case would take minutes.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pytest
from sqlalchemy.exc import OperationalError

from engine.core import jobs
from engine.core.config import RunConfig
from engine.core.jobs import JobRunner
from storage import RunStatus, Store
from tests.test_jobs import REPO_ROOT, _dead_pid, _stale_running, wait_for

SHIM = '''#!{python}
"""`python -m engine ...` with a stand-in trainer. FAKE_TRAIN=sleep trains "forever", exit3 dies with code 3,
steps logs FAKE_STEPS steps FAKE_STEP_S apart, then saves an adapter folder and a spectrum like a real run."""
import os, pathlib, runpy, sys, time, types

sys.path.insert(0, os.getcwd())
fake = types.ModuleType("engine.ml.train")


def steps(out_dir, sink, should_stop):
    total, dt = int(os.environ.get("FAKE_STEPS", "40")), float(os.environ.get("FAKE_STEP_S", "0.25"))
    sink.log(0, {{"total_steps": total}})
    for step in range(1, total + 1):
        if should_stop():
            return step - 1, "cancelled"
        time.sleep(dt)
        sink.log(step, {{"train/loss": 2.0 / step, "lr": 1e-3, "total_steps": total, "eta_s": (total - step) * dt}})
    adapter = pathlib.Path(out_dir) / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    (adapter / "adapter_config.json").write_text("{{}}")
    sink.log_spectra(total, {{"model.layers.0.self_attn.q_proj": [1.0, 0.5]}})
    sink.set_summary(steps_done=total, total_steps=total, adapter_dir=str(adapter), final_loss=2.0 / total)
    return total, "succeeded"


def train(cfg, out_dir, sink, should_stop, *, resume_from=None, home=None):
    mode = os.environ.get("FAKE_TRAIN")
    done, status = steps(out_dir, sink, should_stop) if mode == "steps" else (1, "cancelled")
    if mode != "steps":
        sink.log(1, {{"train/loss": 1.0}})
    if mode == "exit3":
        os._exit(3)  # no handler runs, nothing recorded: only the parent's watcher knows the code
    while mode != "steps" and not should_stop():
        time.sleep(0.1)
    return types.SimpleNamespace(status=status, steps_done=done, total_steps=9, final_loss=1.0,
                                 final_val_loss=None, duration_s=0.0, adapter_dir=str(out_dir))


fake.train = train
sys.modules["engine.ml.train"] = fake
sys.argv = ["engine", *sys.argv[3:]]  # drop "-m engine"
runpy.run_module("engine", run_name="__main__", alter_sys=True)
'''


@pytest.fixture
def fake_python(tmp_path) -> str:
    p = tmp_path / "fake-python"
    p.write_text(SHIM.format(python=sys.executable))
    p.chmod(0o755)
    return str(p)


@pytest.fixture
def store(home):
    s = Store.for_home(home)
    yield s
    s.close()


@pytest.fixture
def runner(store, home, fake_python):
    r = JobRunner(store, home, python=fake_python, poll_s=0.05, reconcile_s=0.1, env={"FAKE_TRAIN": "exit3"})
    yield r
    r.stop(cancel_running=True, timeout=5)


def cfg_file(tmp_path, chat_jsonl) -> str:
    p = tmp_path / "run.json"
    p.write_text(RunConfig.from_dict({"dataset": str(chat_jsonl)}).to_json())
    return str(p)


def test_a_killed_foreground_train_is_failed_by_a_running_scheduler(
    runner, store, home, fake_python, tmp_path, chat_jsonl
):
    runner.start()
    fg = subprocess.Popen(
        [fake_python, "-m", "engine", "--home", str(home), "train", cfg_file(tmp_path, chat_jsonl)],
        cwd=REPO_ROOT,
        env={**os.environ, "FAKE_TRAIN": "sleep"},
        stderr=subprocess.DEVNULL,
    )
    try:
        run = wait_for(lambda: next(iter(store.list_runs(status=RunStatus.RUNNING)), None), 30, "the run to start")
        reported = lambda: store.get_run(run.id).pid == fg.pid and store.get_run(run.id).host
        wait_for(reported, 10, "the foreground process to report in, with its host")
        assert store.get_run(run.id).host == os.uname().nodename
        os.kill(fg.pid, signal.SIGKILL)  # no handler runs: nothing records the end
        fg.wait()
        wait_for(lambda: store.get_run(run.id).is_terminal, 10, "reconcile to end the run")
    finally:
        fg.kill()
        fg.wait()
    r = store.get_run(run.id)
    assert r.status is RunStatus.FAILED and f"its training process (pid {fg.pid}) is gone" in r.error
    assert "server restarted" not in r.error and runner._thread.is_alive()


def test_a_launch_that_fails_after_the_claim_ends_failed_and_the_queue_goes_on(
    runner, store, home, monkeypatch, chat_jsonl
):
    cfg = {"dataset": str(chat_jsonl)}
    a, b = runner.submit(cfg), runner.submit(cfg)
    (home / "runs" / str(a) / "config.json").unlink()  # the launch must write it again: the disk is full
    real = jobs._write_atomic

    def full_disk(path, text):
        if path.parent.name == str(a):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, text)

    monkeypatch.setattr(jobs, "_write_atomic", full_disk)
    runner.start()
    wait_for(lambda: store.get_run(b).is_terminal, 30, "the next run to end")
    ra, rb = store.get_run(a), store.get_run(b)
    assert ra.status is RunStatus.FAILED and ra.pid is None
    assert ra.error.startswith("could not start the training process: [Errno 28] No space left on device")
    assert rb.status is RunStatus.FAILED and "exited with code 3" in rb.error  # b ran: the queue went on
    assert runner._thread.is_alive()


def test_the_watcher_survives_a_database_error_and_the_true_exit_code_is_recorded(
    runner, store, monkeypatch, chat_jsonl, capfd
):
    real, calls = store.finish, {"n": 0}

    def flaky(*args, **kw):  # the first two writes of an ending fail: a locked or full database
        calls["n"] += 1
        if calls["n"] <= 2:
            raise OperationalError("UPDATE runs", {}, Exception("database is locked"))
        return real(*args, **kw)

    monkeypatch.setattr(store, "finish", flaky)
    run_id = runner.submit({"dataset": str(chat_jsonl)})
    runner.start()
    wait_for(lambda: store.get_run(run_id).is_terminal, 30, "the run's end to be recorded")
    r = store.get_run(run_id)
    assert r.status is RunStatus.FAILED and r.exit_code == 3 and r.error.startswith("exited with code 3")
    assert calls["n"] >= 3 and runner._thread.is_alive() and runner.active() == []
    err = capfd.readouterr().err
    assert "loralab scheduler: error while recording the end of run" in err and "database is locked" in err
    assert "Traceback" not in err


def test_reconcile_judges_only_this_host_and_runs_whose_scheduler_died_before_the_launch(runner, store, home):
    dead = _dead_pid()
    orphan = _stale_running(store, home, pid=None, worker_pid=dead)  # claimed; its scheduler died at once
    elsewhere = _stale_running(store, home, pid=dead, worker_pid=dead)
    store.mark_running(elsewhere, dead, host="another-machine")  # runs.host: where its pid means something
    gone = _stale_running(store, home, pid=dead, worker_pid=dead, log="step 3/9 | loss 2.5\n")
    assert runner.reconcile() == []  # found gone once: their own watchers get to record them first
    assert sorted(runner.reconcile()) == [orphan, gone]
    assert f"the scheduler (pid {dead}) that claimed it is gone" in store.get_run(orphan).error
    g = store.get_run(gone)
    assert f"(pid {dead}) is gone without recording" in g.error and "step 3/9 | loss 2.5" in g.error
    assert store.get_run(elsewhere).status is RunStatus.RUNNING  # a pid of another machine means nothing here
    assert runner.recover() == [] and store.get_run(elsewhere).status is RunStatus.RUNNING
