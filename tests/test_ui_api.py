"""The whole Train → live view → History flow through the app's HTTP API (gradio_client), with the real
job queue training the tiny model in a child process."""

from __future__ import annotations

import socket
import time
import zipfile
from pathlib import Path

import pytest

from engine.core.config import EMBEDDED_MODEL

pytestmark = pytest.mark.slow

CPU_DOCTOR = {
    "device": "cpu",
    "bf16": False,
    "quant": {
        "none": {"ok": True, "reason": "full-precision base weights"},
        "8bit": {"ok": True, "reason": "LLM.int8 on CPU (slow)"},
        "4bit": {"ok": True, "reason": "NF4 on CPU (slow)"},
    },
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tmp_path):
    """The app on a temporary data home: (url, store, runner, home)."""
    from engine.core.jobs import JobRunner
    from storage import Store
    from ui import build_app, close_tabs, launch_kwargs

    home = tmp_path / "home"
    store = Store.for_home(home)
    runner = JobRunner(store, home, env={"HF_HUB_OFFLINE": "1"})
    runner.recover()
    runner.start()
    demo = build_app(store, runner, home, doctor=CPU_DOCTOR)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs(home))
    try:
        yield f"http://127.0.0.1:{port}/", store, runner, home
    finally:
        demo.close()
        close_tabs(demo)
        runner.stop(cancel_running=True, timeout=10)
        store.close()


def value_of(output):
    return output["value"] if isinstance(output, dict) and "__type__" in output else output


def form_values(**changes) -> list:
    from engine.core.config import RunConfig
    from ui.train_form import FORM_FIELDS, form_from_config

    form, _ = form_from_config(RunConfig().to_dict())
    form.update(changes)
    return [form[k] for k in FORM_FIELDS]


def test_train_flow_through_the_api(served, tiny_llama_dir, chat_jsonl, tmp_path):
    from gradio_client import Client, handle_file

    url, store, runner, home = served
    client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
    t0 = time.monotonic()

    # 1) inspect the model (the engine's CLI in a child process) and pick the q,v preset
    anatomy_md, targets = client.predict(EMBEDDED_MODEL, str(tiny_llama_dir), False, api_name="/inspect")
    assert "LlamaForCausalLM" in anatomy_md and "2 layers" in anatomy_md
    ticks = client.predict(api_name="/preset_qv")  # a component update: {"__type__": "update", "value": [...]}
    assert value_of(ticks) == ["q_proj", "v_proj"] and len(value_of(targets)) == 7  # default preset all-linear

    # 2) upload the dataset: it lands inside the data home
    dataset = value_of(client.predict(handle_file(str(chat_jsonl)), api_name="/upload_dataset"))
    assert Path(dataset).parent == (home / "datasets").resolve()
    summary, rendered = client.predict(
        EMBEDDED_MODEL, str(tiny_llama_dir), dataset, "auto", "responses", 64, api_name="/preview"
    )
    assert "messages" in summary and "train" in summary and "assistant" in value_of(rendered)

    # 3) the estimate next to Launch, then an invalid launch shows every problem
    values = form_values(
        model_text=str(tiny_llama_dir),
        dataset=dataset,
        targets=["q_proj", "v_proj"],
        r=4,
        alpha=8,
        max_steps=6,
        batch_size=2,
        max_seq_len=64,
        eval_every=3,
        save_every=3,
        val_split=0.2,
        threads=1,
        warmup_steps=1,
        name="api-run",
    )
    estimate = client.predict(*values, api_name="/estimate")
    assert f"Trainable: {2 * 4 * ((32 + 32) + (32 + 16)):,}" in estimate
    bad = list(values)
    from ui.train_form import FORM_FIELDS

    bad[FORM_FIELDS.index("batch_size")] = 0
    bad[FORM_FIELDS.index("lr")] = -1
    message = client.predict(*bad, api_name="/launch")[0]
    assert "Not launched" in message and "train.batch_size = 0" in message and "train.lr = -1" in message
    assert store.list_runs() == []

    # 4) launch, then poll the live view until the run succeeds
    message, selected = client.predict(*values, api_name="/launch")[:2]
    run_id = value_of(selected)
    assert f"#{run_id}" in message and store.get_run(run_id).trainable_params == 2 * 4 * 112
    statuses, loss_seen = [], False
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        # [status, loss plot, lr plot, log tail, queue, timer]; what did not change comes back as a bare update
        status, loss, lr, log, queue = client.predict(run_id, api_name="/poll")[:5]
        statuses.append(status)
        loss_seen |= "train loss" in str(loss)
        if isinstance(status, str) and "succeeded" in status:
            break
        time.sleep(1.0)
    run = store.get_run(run_id)
    assert run.status.value == "succeeded", f"{run.status}: {run.error}\n{runner.log_tail(run_id)}"
    assert loss_seen and any(isinstance(s, str) and "step" in s for s in statuses)
    assert run.steps_done == 6 and run.final_loss is not None

    # 5) history: the run is listed, its details, the adapter zip, and relaunch prefills the form
    table = client.predict([], "", api_name="/history")[0]
    rows = {row[0]: row for row in table["data"]}
    assert (
        rows[run_id][1] == "api-run" and rows[run_id][2] == "succeeded" and rows[run_id][4] == "qv"
    )  # the q,v preset button was pressed
    config, summary, *_ = client.predict(run_id, api_name="/show_run")
    assert config["lora"]["r"] == 4 and "succeeded" in summary
    zip_path = value_of(client.predict(run_id, api_name="/download_adapter"))
    assert "adapter_config.json" in zipfile.ZipFile(zip_path).namelist()
    assert (home / "exports" / f"run-{run_id}-adapter.zip").is_file()
    prefilled = client.predict(run_id, api_name="/relaunch")
    assert prefilled[FORM_FIELDS.index("r")] == 4 and prefilled[FORM_FIELDS.index("model_text")] == str(tiny_llama_dir)
    print(f"API flow: {time.monotonic() - t0:.1f} s")
