"""The job queue with real child processes: SIGKILL, a killed server, cancel → resume, FIFO, refusals.

The training runs are real `python -m engine train --run-id` children on the tiny Llama. The ten-job FIFO
test uses the real CLI with a two-step stand-in for engine.ml.train (see SHIM): ten torch start-ups would
take two minutes on two cores, and the queue, not the trainer, is what it tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.core import disk, jobs
from engine.core.config import ConfigError, RunConfig
from engine.core.jobs import JobRunner, latest_checkpoint, pid_alive
from storage import RunStatus, Store

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV = {"LORALAB_TRAIN_THREADS": "1"}  # the machine is shared: one torch thread per child


def run_cfg(model_dir, data, steps: int, **train) -> dict:
    t = {"max_steps": steps, "batch_size": 2, "save_every": 5, "val_split": 0, "lr": 1e-2, **train}
    return {"model": str(model_dir), "dataset": str(data), "train": t}


def wait_for(pred, timeout: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def loss_steps(store: Store, run_id: int) -> list[int]:
    return [step for step, _ in store.metric_series(run_id, "train/loss")]


def wait_steps(store: Store, run_id: int, n: int, timeout: float = 90) -> None:
    def reached():
        if store.get_run(run_id).is_terminal:
            raise AssertionError(f"run {run_id} ended before step {n}: {store.get_run(run_id).error}")
        return max(loss_steps(store, run_id), default=0) >= n

    wait_for(reached, timeout, f"run {run_id} to reach step {n}")


def start_lines(home: Path, run_id: int) -> int:
    log = (home / "runs" / str(run_id) / "train.log").read_text()
    return sum(line.startswith(jobs.START_MARK) for line in log.splitlines())


@pytest.fixture
def store(home):
    s = Store.for_home(home)
    yield s
    s.close()


@pytest.fixture
def runners(store, home):
    """make(**kw) → a JobRunner on the test's home; every child still alive at the end is killed."""
    made: list[JobRunner] = []

    def make(**kw) -> JobRunner:
        r = JobRunner(store, home, env=ENV, poll_s=0.1, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()
        for run_id in r.active():
            pid = store.get_run(run_id).pid
            if pid and pid_alive(pid):
                jobs.signal_group(pid, signal.SIGKILL)


# ---- real training children --------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkilled_child_fails_with_signal_and_log_tail_and_next_run_starts(runners, store, tiny_llama_dir, chat_jsonl):
    runner = runners()
    runner.start()
    a = runner.submit(run_cfg(tiny_llama_dir, chat_jsonl, 400))
    b = runner.submit(run_cfg(tiny_llama_dir, chat_jsonl, 2))
    wait_steps(store, a, 3)
    assert runner.active() == [a] and store.get_run(b).status is RunStatus.QUEUED  # one at a time
    os.killpg(store.get_run(a).pid, signal.SIGKILL)  # what the kernel's OOM killer does

    assert runner.wait_idle(90)  # the next queued run starts and finishes
    ra, rb = store.get_run(a), store.get_run(b)
    assert ra.status is RunStatus.FAILED and ra.exit_code == -9
    assert "killed by SIGKILL (exit -9)" in ra.error and "out of memory" in ra.error
    assert "--- last lines of train.log ---" in ra.error and "/400 | loss" in ra.error  # the log tail
    assert rb.status is RunStatus.SUCCEEDED and rb.steps_done == 2, rb.error
    assert rb.started_at >= ra.finished_at
    assert runner._thread.is_alive() and runner.active() == []  # the parent is unaffected


@pytest.mark.slow
def test_server_killed_mid_run_then_recover_leaves_nothing_running(
    runners, store, home, tiny_llama_dir, chat_jsonl, tmp_path
):
    submitter = runners()  # never started: only writes rows
    a = submitter.submit(run_cfg(tiny_llama_dir, chat_jsonl, 150))
    b = submitter.submit(run_cfg(tiny_llama_dir, chat_jsonl, 2))
    with open(tmp_path / "worker.log", "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "engine", "--home", str(home), "worker"],
            cwd=REPO_ROOT,
            env={**os.environ, **ENV},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_steps(store, a, 3)
        assert store.get_run(a).worker_pid == worker.pid
    finally:
        worker.kill()  # SIGKILL: no handler runs, the child is orphaned mid-run
        worker.wait()
    child = store.get_run(a).pid
    assert pid_alive(child) and store.get_run(a).status is RunStatus.RUNNING

    runner = runners()
    assert runner.recover() == [] and runner.active() == [a]  # adopted, not failed: it is still training
    runner.start()
    assert runner.wait_idle(120), (tmp_path / "worker.log").read_text()
    ra, rb = store.get_run(a), store.get_run(b)
    assert store.list_runs(status=RunStatus.RUNNING) == []
    assert ra.status is RunStatus.SUCCEEDED and ra.steps_done == 150, ra.error
    assert rb.status is RunStatus.SUCCEEDED, rb.error
    assert rb.started_at >= ra.finished_at  # the adopted run held the one slot until it ended
    assert not pid_alive(child)


@pytest.mark.slow
def test_cancel_saves_checkpoint_and_resume_continues_the_same_loss(runners, store, home, tiny_llama_dir, chat_jsonl):
    runner = runners(max_concurrent=2)
    runner.start()
    cfg = run_cfg(tiny_llama_dir, chat_jsonl, 400)
    a = runner.submit(cfg)
    ref = runner.submit(cfg)  # the same config and seed, uninterrupted past a's checkpoint
    wait_steps(store, a, 3)
    assert "asked the training process" in runner.cancel(a)
    wait_for(lambda: store.get_run(a).is_terminal, 60, "the cancelled run to end")
    ra = store.get_run(a)
    assert ra.status is RunStatus.CANCELLED, ra.error
    out = home / "runs" / str(a)
    assert (out / "adapter" / "adapter_config.json").is_file()
    ckpt = latest_checkpoint(out)
    k = int(ckpt.name.removeprefix("step-"))
    assert k == max(loss_steps(store, a)) >= 3  # the checkpoint is where it stopped
    assert "already ended (cancelled)" in runner.cancel(a)

    wait_steps(store, ref, k + 1)
    runner.cancel(ref, grace_s=10)
    want = dict(store.metric_series(ref, "train/loss"))[k + 1]

    cursor = store.metrics_since(a)[-1].id
    assert runner.resume(a) == a
    wait_steps(store, a, k + 1)
    runner.cancel(a)
    new = [p for p in store.metrics_since(a, cursor, names=["train/loss"])]
    assert new[0].step == k + 1  # the step count continues
    assert new[0].value == pytest.approx(want, rel=1e-4)  # optimizer, schedule, data order and RNG restored
    wait_for(lambda: store.get_run(a).is_terminal, 60, "the resumed run to end")
    assert store.get_run(a).status is RunStatus.CANCELLED and latest_checkpoint(out) != ckpt
    assert start_lines(home, a) == 2  # the log was appended to

    runner.stop()
    b = runner.resume(a, as_new=True)
    rb = store.get_run(b)
    assert rb.parent_id == a and rb.resume_from == str(latest_checkpoint(out)) and rb.status is RunStatus.QUEUED
    assert runner.cancel(b) == f"run {b} was queued: cancelled"


# ---- the queue, with a stand-in trainer ---------------------------------------------------------------------

SHIM = '''#!{python}
"""Stand-in for `python -m engine ...`: the real CLI, with engine.ml.train replaced by a two-step fake."""
import os, runpy, sys, types

sys.path.insert(0, os.getcwd())
fake = types.ModuleType("engine.ml.train")


def train(cfg, out_dir, sink, should_stop, *, resume_from=None, home=None):
    for step in (1, 2):
        sink.log(step, {{"train/loss": 1.0 / step}})
    sink.set_summary(steps_done=2, total_steps=2)
    return types.SimpleNamespace(status="succeeded", steps_done=2, total_steps=2, final_loss=0.5,
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


def test_ten_quick_submissions_run_once_each_in_fifo_order(
    runners, store, home, fake_python, tiny_llama_dir, chat_jsonl
):
    # Two schedulers share the database (the app and a worker): claiming is atomic, so none runs twice.
    said: list[str] = []
    app, worker = runners(python=fake_python, log=said.append), runners(python=fake_python, log=said.append)
    app.start()
    worker.start()
    ids = [app.submit(run_cfg(tiny_llama_dir, chat_jsonl, 2)) for _ in range(10)]
    assert app.wait_idle(120) and worker.wait_idle(10)  # each waits for its own children too
    runs = sorted(store.list_runs(), key=lambda r: r.id)
    assert [r.id for r in runs] == ids  # all recorded, nothing extra
    assert all(r.status is RunStatus.SUCCEEDED for r in runs), [(r.id, r.status, r.error) for r in runs]
    assert [r.id for r in sorted(runs, key=lambda r: r.started_at)] == ids  # claimed oldest first
    assert [start_lines(home, i) for i in ids] == [1] * 10  # each launched exactly once
    assert [loss_steps(store, i) for i in ids] == [[1, 2]] * 10
    assert {r.worker_pid for r in runs} == {os.getpid()}
    assert app.active() == worker.active() == []
    started = sorted(int(m.split(":")[0].removeprefix("run ")) for m in said if ": started (pid" in m)
    assert started == ids


def test_cli_submit_cancel_resume(store, home, tiny_llama_dir, chat_jsonl, tmp_path):
    cfg_path = tmp_path / "run.json"
    cfg_path.write_text(RunConfig.from_dict(run_cfg(tiny_llama_dir, chat_jsonl, 2)).to_json())

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "engine", "--home", str(home), *args],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=240,  # submit checks the model and the dataset first (imports torch: seconds)
        )

    done = cli("submit", str(cfg_path))
    assert done.returncode == 0, done.stderr
    run_id = int(done.stdout.strip())
    assert store.get_run(run_id).status is RunStatus.QUEUED and "position 1" in done.stderr
    done = cli("cancel", str(run_id))
    assert done.stdout.strip() == f"run {run_id} was queued: cancelled"
    done = cli("resume", str(run_id))
    assert done.returncode == 2 and "no checkpoint to resume from" in done.stderr


# ---- refusals and recovery, without training ------------------------------------------------------------------


def test_invalid_config_is_refused_with_every_problem_and_nothing_written(runners, store, home):
    bad = {"model": " ", "lora": {"r": 0, "dropout": 2.0}, "train": {"lr": -1, "batch_size": 0}, "typo": 1}
    with pytest.raises(ConfigError) as e:
        runners().submit(bad)
    text = str(e.value)
    for field in ("model", "lora.r", "lora.dropout", "train.lr", "train.batch_size", "typo"):
        assert field in text, (field, text)
    assert len(e.value.problems) >= 6
    assert store.list_runs() == [] and not (home / "runs").exists()


def test_disk_space_refusal_says_how_much_and_what_to_do(runners, store, home, monkeypatch, tiny_llama_dir, chat_jsonl):
    runner = runners()
    cfg = run_cfg(tiny_llama_dir, chat_jsonl, 2)
    monkeypatch.setattr(disk, "free_bytes", lambda path: 300 * 10**6)
    with pytest.raises(jobs.DiskSpaceError) as e:
        runner.submit(cfg)
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and "0.30 GB free" in msg and "needs about 1.40 GB" in msg
    assert "delete old runs" in msg and str(home) in msg
    assert store.list_runs() == []
    # a known, small parameter count fits: 2 checkpoints × 12 B + 4 B per parameter, plus the margin
    assert runner.submit(cfg, trainable_params=1_000_000) == 1
    # the embedded model adds its one-time conversion until it exists under home/models
    need = jobs.disk_need_bytes(RunConfig(), home, 1_000_000)
    assert need == {"checkpoints": 24_000_000, "adapter": 4_000_000, "embedded model, converted once": 600 * 10**6}


def _stale_running(store: Store, home: Path, *, pid: int | None, worker_pid: int, log: str = "") -> int:
    run_id = store.create_run("stale", RunConfig().to_dict(), "")
    out = home / "runs" / str(run_id)
    out.mkdir(parents=True)
    store.set_out_dir(run_id, out)
    (out / "train.log").write_text(log)
    assert store.claim_next_queued(worker_pid).id == run_id
    if pid is not None:
        store.mark_running(run_id, pid)
    return run_id


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_recover_fails_dead_runs_adopts_live_children_and_leaves_others_alone(runners, store, home):
    sleeper = subprocess.Popen(["sleep", "60"])  # alive, but not a training child (a reused pid)
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "engine", "train"])
    try:
        dead = _dead_pid()
        gone = _stale_running(store, home, pid=dead, worker_pid=dead, log="step 7/50 | loss 1.2345\n")
        reused = _stale_running(store, home, pid=sleeper.pid, worker_pid=dead)
        starting = _stale_running(store, home, pid=None, worker_pid=sleeper.pid)  # another live runner's
        alive = _stale_running(store, home, pid=trainer.pid, worker_pid=dead)
        queued = store.create_run("waiting", RunConfig().to_dict(), "")

        runner = runners()
        assert sorted(runner.recover()) == [gone, reused]
        r = store.get_run(gone)
        assert r.status is RunStatus.FAILED and "server restarted" in r.error and "step 7/50 | loss 1.2345" in r.error
        assert store.get_run(reused).status is RunStatus.FAILED
        assert store.get_run(starting).status is RunStatus.RUNNING
        assert store.get_run(queued).status is RunStatus.QUEUED
        assert runner.active() == [alive] and store.get_run(alive).status is RunStatus.RUNNING
        assert runner.recover() == []  # idempotent

        trainer.kill()
        trainer.wait()
        wait_for(lambda: store.get_run(alive).is_terminal, 10, "the adopted run to be recorded")
        assert "ended while the server was down" in store.get_run(alive).error
        assert runner.active() == []
    finally:
        for p in (sleeper, trainer):
            p.kill()
            p.wait()


def test_cancel_and_resume_outside_running(runners, store, home, tiny_llama_dir, chat_jsonl):
    runner = runners()  # not started: runs stay queued
    a = runner.submit(run_cfg(tiny_llama_dir, chat_jsonl, 2), name="first")
    assert runner.cancel(a) == f"run {a} was queued: cancelled"
    assert store.get_run(a).status is RunStatus.CANCELLED
    assert runner.cancel(a) == f"run {a} already ended (cancelled); nothing to cancel"
    with pytest.raises(ValueError, match="no checkpoint to resume from"):
        runner.resume(a)
    b = runner.submit(run_cfg(tiny_llama_dir, chat_jsonl, 2))
    with pytest.raises(ValueError, match="only a failed or cancelled run"):
        runner.resume(b)
    # a checkpoint folder is found without torch, the newest complete one
    ck = home / "runs" / str(a) / "checkpoints"
    for step, complete in ((5, True), (10, True), (15, False)):
        (ck / f"step-{step:07d}").mkdir(parents=True)
        if complete:
            (ck / f"step-{step:07d}" / "trainer_state.json").write_text("{}")
    assert runner.resume(a) == a
    r = store.get_run(a)
    assert r.status is RunStatus.QUEUED and r.resume_from == str(ck / "step-0000010") and r.error is None
    assert store.queue_position(a) == 1  # the oldest queued run goes first
