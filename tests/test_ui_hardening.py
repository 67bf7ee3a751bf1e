"""The web server's hardening: auth endpoints, uploads from the upload folder only, refusals logged as one line,
and the handlers behind the live view, the form's validation, the calculator's device and the plots."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import gradio as gr
import pytest

from engine.core.config import RunConfig
from storage import RunStatus, Store
from tests.test_ui_api import CPU_DOCTOR, free_port
from ui import live_view as L
from ui import plots
from ui import train_form as T

AUTH = ("ada", "s3cret-pass")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The whole app with --auth, on a fresh data home: (url, store, home)."""
    from engine.core.jobs import JobRunner
    from ui import build_app, close_tabs, launch_kwargs

    home = tmp_path_factory.mktemp("hardening") / "home"
    store = Store.for_home(home)
    runner = JobRunner(store, home, env={"HF_HUB_OFFLINE": "1"})
    demo = build_app(store, runner, home, doctor=CPU_DOCTOR)
    port = free_port()
    demo.launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        auth=[AUTH],
        **launch_kwargs(home),
    )
    yield f"http://127.0.0.1:{port}", store, home
    demo.close()
    close_tabs(demo)
    store.close()


def status_of(url: str, data: dict | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, json.dumps(data).encode() if data is not None else None)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_with_auth_no_schema_or_api_answers_without_a_login(app):
    url, _, _ = app
    assert status_of(f"{url}/openapi.json")[0] == 404  # FastAPI's own schema: turned off
    for path in ("/gradio_api/openapi.json", "/gradio_api/info", "/config"):
        assert status_of(url + path)[0] == 401, path
    code, body = status_of(f"{url}/gradio_api/call/launch", {"data": []})
    assert code == 401
    # documented as harmless: Gradio 6's reset is a no-op that answers success and touches nothing
    assert status_of(f"{url}/gradio_api/reset", {"event_id": "nothing"}) == (200, '{"success":true}')


def test_an_upload_is_taken_only_from_gradios_upload_folder_and_moved(app, tmp_path, monkeypatch, capfd):
    from gradio_client import Client, handle_file

    url, _, home = app
    foreign = Path(__file__).resolve().parent.parent / "requirements.txt"
    with pytest.raises(gr.Error, match="not a file uploaded through this page"):
        T.upload_dataset(str(foreign), home=home)
    assert not list((home / "datasets").glob("requirements*"))
    assert "loralab ui: refused: refusing" in capfd.readouterr().err

    client = Client(url + "/", auth=AUTH, verbose=False)
    data = tmp_path / "mine.jsonl"
    data.write_text('{"text": "hello there"}\n')
    stored = client.predict(handle_file(str(data)), api_name="/upload_dataset")
    stored = Path(stored["value"] if isinstance(stored, dict) else stored)
    assert stored == (home / "datasets" / "mine.jsonl").resolve() and stored.read_text() == data.read_text()
    from gradio.utils import get_upload_folder

    left = [p for p in Path(get_upload_folder()).rglob("mine.jsonl")]
    assert left == []  # our copy's source was removed from Gradio's temp folder


def test_a_refusal_is_one_line_in_the_server_log_not_a_traceback(app, capfd):
    from gradio_client import Client

    url, store, _ = app
    run_id = store.create_run("kept", RunConfig().to_dict(), "")
    store.mark_running(run_id, os.getpid())
    store.finish(run_id, RunStatus.SUCCEEDED)
    client = Client(url + "/", auth=AUTH, verbose=False)
    client.predict([], "", api_name="/history")  # the run picker's choices, as the page load fills them
    msg = client.predict(run_id, False, [], "", api_name="/delete_run")[0]
    assert msg.startswith("**Not deleted.**") and store.get_run(run_id).name == "kept"
    with pytest.raises(Exception, match="Choose a run first"):
        client.predict(None, api_name="/download_adapter")
    err = capfd.readouterr().err
    refusals = [line for line in err.splitlines() if line.startswith("loralab ui: refused:")]
    assert len(refusals) == 2 and "Traceback" not in err


# ---- handlers -------------------------------------------------------------------------------------------


def run_with(store, status: str | None, name: str = "r") -> int:
    run_id = store.create_run(name, RunConfig().to_dict(), "")
    if status:
        store.mark_running(run_id, os.getpid())
        if status != "running":
            store.finish(run_id, status)
    return run_id


class LogRunner:
    def log_tail(self, run_id, max_bytes=4000):
        return "\n".join(["=== run starts: python -m engine train", *(f"step {i}/30 | loss 1.0" for i in range(30))])


def test_the_live_view_keeps_the_running_run_and_follows_the_next(tmp_path):
    store = Store.for_home(tmp_path)
    a = run_with(store, "running", "first")
    b = run_with(store, None, "second")  # queued behind a
    assert L.followed_after_launch(store, b) == a  # launching b keeps the view (and Cancel) on a
    assert L.followed_after_launch(Store.for_home(tmp_path / "empty"), 1) == 1
    store.log_metrics(a, 3, {"train/loss": 1.0, "total_steps": 10, "eta_s": 70})
    out = L.poll_run(a, 0, {}, store=store, runner=LogRunner())
    progress, follow = out[8], out[9]
    assert 'aria-valuenow="3"' in progress and 'aria-valuemax="10"' in progress and "width: 30.0%" in progress
    assert "step 3 / 10 · 30% · ETA 1:10" in progress and follow == gr.skip()
    log = out[5]
    assert log.splitlines()[-1] == "step 29/30 | loss 1.0" and len(log.splitlines()) == L.LOG_LINES
    assert "=== run starts" not in log  # the end of the log, not its head
    store.finish(a, RunStatus.SUCCEEDED)
    out = L.poll_run(a, out[0], out[1], store=store, runner=LogRunner())
    assert out[9]["value"] == b and "succeeded" in out[8]  # a ended: the view moves to the next run
    again = L.poll_run(a, out[0], out[1], store=store, runner=LogRunner())
    assert again[9] == gr.skip()  # only once: looking back at a finished run is not yanked away


def test_resume_says_what_happens(tmp_path):
    store = Store.for_home(tmp_path)

    class Resumer:
        def resume(self, run_id):
            return run_id

    msg, select, _ = L.resume_run(4, runner=Resumer(), store=store)
    assert msg == "Run #4 is queued again; it continues from its latest checkpoint." and select["value"] == 4


def test_rank_zero_is_refused_by_validation_and_the_estimate_drops_the_old_figure(tmp_path):
    from tests.test_ui_forms import FakeRunner, form_with, tiny_anatomy

    anatomy = tiny_anatomy("/models/tiny")
    form = form_with(model_text="/models/tiny", r=0)
    values = [form[k] for k in T.FORM_FIELDS]
    text = T.estimate_markdown(anatomy, "qv", CPU_DOCTOR, *values)
    assert text.startswith("Estimate waits for a valid form: lora.r = 0") and "Trainable" not in text
    runner = FakeRunner(Store.for_home(tmp_path))
    msg = T.launch_run(anatomy, "qv", CPU_DOCTOR, *values, runner=runner, store=runner.store)[0]
    assert "Not launched" in msg and "lora.r = 0" in msg and runner.submitted == []


def test_the_calculator_estimates_for_this_machine(tmp_path):
    from ui.backend import Backend
    from ui.calculator_tab import machine_device

    backend = Backend(tmp_path)
    backend.remember_doctor(CPU_DOCTOR)
    assert machine_device(backend=backend)["value"] == "cpu"
    with gr.Blocks():
        from ui.calculator_tab import build_calculator_tab

        tab = build_calculator_tab(Store.for_home(tmp_path), None, tmp_path, backend)
    assert tab.on_load[2][0].value == "cpu"


def test_one_point_is_visible_and_the_lr_axis_starts_at_zero():
    loss = plots.loss_figure([(1, 2.5)])
    assert loss.data[0].mode == "lines+markers" and loss.layout.xaxis.range == (0, 2)
    lr = plots.lr_figure([(1, 0.0)])
    assert lr.layout.yaxis.range[0] == 0 and lr.layout.yaxis.range[1] > 0
    lr = plots.lr_figure([(1, 1e-4), (2, 2e-4)])
    assert lr.data[0].mode == "lines" and lr.layout.yaxis.range == (0, pytest.approx(2.2e-4))
