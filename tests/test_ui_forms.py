"""The Train and History tabs' handlers, called as plain functions (no browser, no server, no torch)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import gradio as gr
import pytest

from engine.core import launch
from engine.core.anatomy import preset_kinds
from engine.core.config import EMBEDDED_MODEL, LoraSpec, RunConfig, TrainSpec, field_help
from storage import RunStatus, Store
from ui import backend as B
from ui import history_tab as H
from ui import live_view as L
from ui import plots
from ui import train_form as T

SHAPES = {
    "q_proj": ("attention", 32, 32),
    "k_proj": ("attention", 32, 16),
    "v_proj": ("attention", 32, 16),
    "o_proj": ("attention", 32, 32),
    "gate_proj": ("mlp", 32, 64),
    "up_proj": ("mlp", 32, 64),
    "down_proj": ("mlp", 64, 32),
}


def tiny_anatomy(model: str = "/models/tiny", layers: int = 2) -> dict:
    """What `python -m engine inspect` prints for the 2-layer tiny Llama of tests/tiny.py."""
    sub = {"attention": "self_attn", "mlp": "mlp"}
    modules = [
        {
            "name": f"model.layers.{i}.{sub[g]}.{k}",
            "kind": k,
            "group": g,
            "layer": i,
            "in": a,
            "out": b,
            "bias": False,
            "type": "Linear",
        }
        for i in range(layers)
        for k, (g, a, b) in SHAPES.items()
    ]
    kinds = [
        {"kind": k, "group": g, "count": layers, "params": layers * a * b, "in_features": a, "out_features": b}
        for k, (g, a, b) in SHAPES.items()
    ]
    return {
        "model": model,
        "architecture": "LlamaForCausalLM",
        "model_type": "llama",
        "num_layers": layers,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 130,
        "total_params": 40_000,
        "kinds": kinds,
        "modules": modules,
    }


def form_with(**changes) -> dict:
    form, _ = T.form_from_config(RunConfig().to_dict())
    form.update({"targets": ["q_proj", "v_proj"], **changes})
    return form


# Every field set away from its default. init/freeze_A/quant cannot all be non-default in one valid config
# (PiSSA needs full precision, LoRA-FA needs gaussian init), so a second form covers init.
NON_DEFAULT = dict(
    model_choice=EMBEDDED_MODEL,
    model_text="/models/tiny",
    targets=["q_proj", "v_proj"],
    dataset="/data/chat.jsonl",
    dataset_format="messages",
    columns="messages=dialog",
    dataset_split="train[:50]",
    dataset_subset="main",
    text_split="line",
    train_on="all",
    max_examples=100,
    quant="4bit",
    dtype="bf16",
    trust_remote_code=True,
    name="every-field",
    r=32,
    alpha=64.0,
    dropout=0.1,
    layers="0-1,3",
    use_rslora=True,
    use_dora=True,
    init="gaussian",
    loraplus_lr_ratio=16.0,
    freeze_A=True,
    lr=5e-4,
    scheduler="linear",
    warmup_steps=3,
    max_steps=7,
    epochs=2.5,
    batch_size=2,
    grad_accum=4,
    max_seq_len=128,
    weight_decay=0.01,
    max_grad_norm=0.5,
    val_split=0.2,
    eval_every=5,
    save_every=6,
    log_every=2,
    gradient_checkpointing=True,
    packing=False,
    seed=7,
    threads=1,
    devices="0,1",
    strategy="fsdp",
    # issue 17: AdaLoRA/VeRA settings (used only with their method) and ReLoRA's (forms 3 and 4 below)
    method="lora",
    adalora_target_r=3,
    adalora_tinit=2,
    adalora_tfinal=1,
    adalora_delta_t=5,
    adalora_orth_reg=0.1,
    vera_d_initial=0.05,
    relora_every=0,
    relora_reset=0.9,
    relora_warmup=2,
    early_stopping_patience=3,
    early_stopping_min_delta=0.01,
    keep_best=True,
    loss_chunk=256,
)


def test_config_from_form_maps_every_field():
    assert set(NON_DEFAULT) == set(T.FORM_FIELDS)
    cfg = T.config_from_form(NON_DEFAULT)
    assert cfg.model == "/models/tiny" and cfg.name == "every-field"
    assert (cfg.train.devices, cfg.train.strategy) == ("0,1", "fsdp")
    assert (cfg.dataset, cfg.dataset_format, cfg.train_on, cfg.max_examples) == (
        "/data/chat.jsonl",
        "messages",
        "all",
        100,
    )
    assert (cfg.columns, cfg.dataset_split, cfg.dataset_subset, cfg.text_split) == (
        (("messages", "dialog"),),
        "train[:50]",
        "main",
        "line",
    )
    assert (cfg.quant, cfg.dtype, cfg.trust_remote_code) == ("4bit", "bf16", True)
    assert cfg.lora == LoraSpec(
        r=32,
        alpha=64.0,
        dropout=0.1,
        targets=("q_proj", "v_proj"),
        layers=(0, 1, 3),
        use_rslora=True,
        use_dora=True,
        init="gaussian",
        loraplus_lr_ratio=16.0,
        freeze_A=True,
        adalora_target_r=3,
        adalora_tinit=2,
        adalora_tfinal=1,
        adalora_delta_t=5,
        adalora_orth_reg=0.1,
        vera_d_initial=0.05,
    )
    assert cfg.train == TrainSpec(
        lr=5e-4,
        scheduler="linear",
        warmup_steps=3,
        max_steps=7,
        epochs=2.5,
        batch_size=2,
        grad_accum=4,
        max_seq_len=128,
        weight_decay=0.01,
        max_grad_norm=0.5,
        val_split=0.2,
        eval_every=5,
        save_every=6,
        log_every=2,
        gradient_checkpointing=True,
        packing=False,
        seed=7,
        threads=1,
        devices="0,1",
        strategy="fsdp",
        relora_reset=0.9,
        relora_warmup=2,
        early_stopping_patience=3,
        early_stopping_min_delta=0.01,
        keep_best=True,
        loss_chunk=256,
    )
    cfg2 = T.config_from_form({**NON_DEFAULT, "quant": "none", "init": "pissa", "freeze_A": False})
    assert cfg2.lora.init == "pissa"
    plain = {**NON_DEFAULT, "quant": "none", "use_dora": False, "freeze_A": False}
    no_lora_extras = {"use_rslora": False, "loraplus_lr_ratio": 0.0}
    cfg3 = T.config_from_form({**plain, **no_lora_extras, "method": "adalora"})
    cfg4 = T.config_from_form({**plain, "relora_every": 4})
    assert (cfg3.lora.method, cfg4.train.relora_every) == ("adalora", 4)
    # every field of RunConfig, LoraSpec and TrainSpec differs from its default in one of the forms
    forms = (cfg, cfg2, cfg3, cfg4)
    for section in (None, "lora", "train"):
        specs = [c if section is None else getattr(c, section) for c in forms]
        for name, meta in field_help(section).items():
            assert any(getattr(spec, name) != meta["default"] for spec in specs), name


def test_form_round_trip_and_model_picker():
    cfg = T.config_from_form(NON_DEFAULT)
    form, preset = T.form_from_config(cfg.to_dict())
    assert preset == "" and T.config_from_form(form, preset) == cfg
    # the dropdown is used when the textbox is empty; a preset wins over the ticked modules
    cfg = T.config_from_form(form_with(model_text="  ", targets=["q_proj"]), preset="mlp")
    assert cfg.model == EMBEDDED_MODEL and cfg.lora.targets == ("mlp",)
    form, preset = T.form_from_config(cfg.to_dict())
    assert (preset, form["targets"], form["model_text"]) == ("mlp", [], "")


def test_gradio_number_values_are_accepted():
    # gr.Number gives floats (8.0) for whole numbers and None when emptied
    cfg = T.config_from_form(form_with(r=8.0, max_steps=6.0, batch_size=2.0))
    assert (cfg.lora.r, cfg.train.max_steps, cfg.train.batch_size) == (8, 6, 2)
    with pytest.raises(Exception) as e:
        T.config_from_form(form_with(max_steps=None))
    assert "train.max_steps" in str(e.value)


class FakeRunner:
    def __init__(self, store=None):
        self.store, self.submitted = store, []

    def submit(self, cfg, *, name=None, est_mem_gb=None, trainable_params=None, **kw):
        self.submitted.append((cfg, name, est_mem_gb, trainable_params))
        if self.store is None:
            return 1
        return self.store.create_run(name or "x", cfg.to_dict(), "", model=cfg.model, est_mem_gb=est_mem_gb)

    def log_tail(self, run_id, max_bytes=4000):
        return f"log of {run_id}"


def test_launch_lists_every_problem(tmp_path):
    bad = form_with(r=0, lr=-1.0, val_split=0.9, layers="3-1", dataset="", batch_size=0)
    runner = FakeRunner()
    with pytest.warns(UserWarning, match="The form has 6 problems"):  # gr.Warning: the toast
        msg, select, timer = T.launch_run(
            None, "all-linear", None, *(bad[k] for k in T.FORM_FIELDS), runner=runner, store=None
        )
    assert msg.startswith("**Not launched.** The form has 6 problems") and select == timer == gr.skip()
    for field in (
        "lora.r = 0",
        "train.lr = -1.0",
        "train.val_split = 0.9",
        "runs backwards",
        "dataset = ''",
        "train.batch_size = 0",
    ):
        assert field in msg, field
    assert runner.submitted == []


def test_launch_checks_modules_layers_and_quant_against_the_machine(tmp_path):
    a = tiny_anatomy()
    doctor = {
        "device": "cpu",
        "bf16": False,
        "quant": {
            "none": {"ok": True, "reason": ""},
            "8bit": {"ok": False, "reason": "no bitsandbytes"},
            "4bit": {"ok": True, "reason": "slow"},
        },
    }
    form = form_with(model_text=a["model"], targets=["c_attn"], layers="5", quant="8bit")
    with pytest.warns(UserWarning, match="3 problems"):
        msg = T.launch_run(a, "", doctor, *(form[k] for k in T.FORM_FIELDS), runner=FakeRunner(), store=None)[0]
    assert "no bitsandbytes" in msg and "'c_attn' matches no module" in msg and "no layer 5" in msg
    upd = T.quant_update(doctor)
    assert ("8bit (unavailable)", "8bit") in upd["choices"] and ("4bit (slow on CPU)", "4bit") in upd["choices"]
    assert "no bitsandbytes" in upd["info"]
    assert T.check_quant("4bit", doctor) == "4bit"


def test_launch_submits_with_exact_counts(tmp_path):
    store = Store.for_home(tmp_path)
    runner = FakeRunner(store)
    a = tiny_anatomy()
    form = form_with(model_text=a["model"], targets=[], r=4, max_steps=6, name="ok")
    msg, select, timer = T.launch_run(
        a,
        "qv",
        {"device": "cpu", "bf16": False, "quant": {}},
        *(form[k] for k in T.FORM_FIELDS),
        runner=runner,
        store=store,
    )
    cfg, name, est_gb, trainable = runner.submitted[0]
    assert cfg.lora.targets == ("qv",) and name == "ok"
    assert trainable == 2 * 4 * ((32 + 32) + (32 + 16))  # Σ r·(in + out) over q and v of 2 layers
    assert est_gb > 0 and "#1" in msg and "queue position 1" in msg
    assert select["value"] == 1 and timer.active
    md = T.estimate_markdown(a, "qv", {"device": "cpu"}, *(form[k] for k in T.FORM_FIELDS))
    assert f"Trainable: {trainable:,}" in md and "Memory ≈" in md
    md = T.estimate_markdown(None, "qv", None, *(form[k] for k in T.FORM_FIELDS))
    assert "Inspect" in md


def test_presets_select_modules():
    a = tiny_anatomy()
    assert preset_kinds(a, "qv") == ["q_proj", "v_proj"]
    assert preset_kinds(a, "attention") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert preset_kinds(a, "mlp") == ["gate_proj", "up_proj", "down_proj"]
    assert preset_kinds(a, "all-linear") == list(SHAPES)
    update, preset = T.apply_preset("mlp", a)
    assert update["value"] == ["gate_proj", "up_proj", "down_proj"] and preset == "mlp"
    assert T.clear_preset(["q_proj"]) == ""
    labels = dict((v, lab) for lab, v in T.kind_choices(a))
    assert labels["k_proj"] == "attention · k_proj ×2 · 32→16"
    assert [v for _, v in T.kind_choices(a)][:4] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert "2 layers (0–1)" in T.anatomy_markdown(a)


def test_layer_ranges():
    for text, layers in (("0-3,8", (0, 1, 2, 3, 8)), ("", ()), ("5", (5,)), ("0,2,4-6", (0, 2, 4, 5, 6))):
        cfg = T.config_from_form(form_with(layers=text))
        assert cfg.lora.layers == layers
        assert T.config_from_form(form_with(layers=T.layers_text(layers))).lora.layers == layers
    assert T.layers_text((0, 1, 2, 3, 8, 10, 11)) == "0-3,8,10-11"
    for bad, words in (("3-1", "runs backwards"), ("a-b", "cannot read")):
        with pytest.raises(ValueError) as e:
            T.config_from_form(form_with(layers=bad))
        assert words in str(e.value)


def test_upload_stays_inside_the_data_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    src = tmp_path / "up.jsonl"
    src.write_text('{"text": "hello"}\n')
    for name, expect in (
        ("../../evil.jsonl", "evil.jsonl"),
        ("..\\..\\win.JSONL", "win.jsonl"),
        ("/etc/passwd.txt", "passwd.txt"),
        (".hidden.csv", "hidden.csv"),
        ("my data (1).json", "my_data_1_.json"),
    ):
        dest = B.save_upload(src, home, name)
        assert dest.parent == (home / "datasets").resolve() and dest.name == expect
    assert not (tmp_path / "evil.jsonl").exists()
    with pytest.raises(ValueError):
        B.save_upload(src, home, "../x.py")
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "different"}\n')
    assert B.save_upload(other, home, "evil.jsonl").name == "evil-1.jsonl"  # never overwrites another upload
    assert B.save_upload(src, home, "evil.jsonl").name == "evil.jsonl"  # same content: same file
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # where Gradio puts what a browser sends
    received = tmp_path / "gradio" / "0123abcd" / "up.jsonl"
    received.parent.mkdir(parents=True)
    received.write_text(src.read_text())
    upd = T.upload_dataset(str(received), home=home)
    assert Path(upd["value"]).parent == (home / "datasets").resolve()
    assert ("uploaded: up.jsonl", upd["value"]) in upd["choices"]


def test_backend_errors_and_inspect_cache(tmp_path, monkeypatch):
    assert launch.cli_error('{"error": "no such file: x.jsonl"}', "", 2) == "no such file: x.jsonl"
    assert launch.cli_error("", "Traceback ...\nerror: model 'x' is not a folder\n", 1) == "model 'x' is not a folder"
    assert launch.cli_error("", "Traceback\nModelError: cannot load\n", 1) == "ModelError: cannot load"
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    backend = B.Backend(tmp_path / "home")
    key = B.inspect_cache_key(str(model))
    assert key == B.inspect_cache_key(str(model)) != B.inspect_cache_key(str(model), trust_remote_code=True)
    assert backend.cached_inspect(str(model)) is None
    cache = tmp_path / "home" / "cache" / "inspect" / f"{key}.json"
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps(tiny_anatomy(str(model))))
    monkeypatch.setattr(B, "run_engine_json", lambda *a, **k: pytest.fail("cached: no child process"))
    assert backend.inspect(f" {model} ")["num_layers"] == 2
    md, update, anatomy = T.restore_inspection(EMBEDDED_MODEL, str(model), False, "qv", backend=backend)
    assert "LlamaForCausalLM" in md and update["value"] == ["q_proj", "v_proj"] and anatomy["model"] == str(model)
    time.sleep(0.01)
    (model / "config.json").write_text('{"changed": true}')  # an edited folder is inspected again
    assert B.inspect_cache_key(str(model)) != key


def test_cli_errors_reach_the_ui(tmp_path, tiny_llama_dir):
    """The CLI's own error text (its JSON {"error"}) is what the UI shows."""
    backend = B.Backend(tmp_path)
    missing = tmp_path / "datasets" / "missing.jsonl"  # inside the uploads: the engine itself is asked
    md, rendered, facts = T.preview_dataset(
        EMBEDDED_MODEL, str(tiny_llama_dir), str(missing), "auto", "responses", 64, backend=backend
    )  # a message in place of the preview (and a toast), not an exception: the old preview is cleared
    assert md.startswith("⚠ Cannot preview:") and "missing.jsonl" in md and rendered["visible"] is False
    assert facts is None
    md, _, _ = T.preview_dataset(  # a path outside the allowed places never reaches the engine
        EMBEDDED_MODEL,
        str(tiny_llama_dir),
        str(tmp_path / "elsewhere.jsonl"),
        "auto",
        "responses",
        64,
        backend=backend,
    )
    assert "reads datasets only from its uploads" in md


def test_plot_builders():
    fig = plots.loss_figure([(1, 2.0), (2, 1.5)], [(2, 1.7)])
    assert [t.name for t in fig.data] == ["train loss", "val loss"] and list(fig.data[0].y) == [2.0, 1.5]
    assert len(plots.loss_figure([]).data) == 0 and plots.loss_figure([]).layout.annotations
    assert [t.name for t in plots.lr_figure([(1, 1e-4)]).data] == ["lr"]
    fig = plots.compare_figure(
        {"#1": [(1, 2.0), (2, 1.0)], "#2": [(1, 3.0)]}, smoothing=0.5, val_curves={"#1": [(2, 1.5)]}, x_label="epoch"
    )
    assert [t.name for t in fig.data] == ["#1 (raw)", "#1", "#1 val", "#2 (raw)", "#2"]
    assert fig.layout.xaxis.title.text == "epoch"
    assert plots.ema([2.0, 1.0], 0.5) == pytest.approx([2.0, 2 * (0.5 * 0.5 * 2 + 0.5 * 1.0) / 1.5])
    assert plots.ema([3.0, 1.0], 0.0) == [3.0, 1.0]
    assert plots.reindex([(1, 5.0), (2, 4.0), (3, 3.0)], [(2, 0.5), (3, 0.75)]) == [(0.5, 4.0), (0.75, 3.0)]


# ---- live view and history, on a real Store ----------------------------------------------------------


def make_run(store, name="r", status=None, r=8, **figures):
    cfg = RunConfig.from_dict({"name": name, "lora": {"r": r}}).to_dict()
    run_id = store.create_run(name, cfg, "", model=cfg["model"])
    if status == "running":
        store.mark_running(run_id, os.getpid())
    elif status:
        store.mark_running(run_id, os.getpid())
        store.finish(run_id, status)
    if figures:
        store.update_run(run_id, **figures)
    return run_id


def test_poll_draws_only_what_is_new(tmp_path):
    store, runner = Store.for_home(tmp_path), FakeRunner()
    run_id = make_run(store, "live", "running")
    store.log_metrics(
        run_id,
        1,
        {
            "train/loss": 2.0,
            "lr": 1e-4,
            "total_steps": 4,
            "epoch": 0.25,
            "eta_s": 30,
            "tokens_per_s": 800.0,
            "mem/peak_gb": 0.2,
        },
    )
    cursor, series, status, loss, lr, log, queue, timer, *_ = L.poll_run(run_id, 0, {}, store=store, runner=runner)
    assert cursor > 0 and [t.name for t in loss.data] == ["train loss"] and [t.name for t in lr.data] == ["lr"]
    assert "step 1 / 4" in status and "ETA 0:30" in status and "800 tok/s" in status and "running" in queue
    assert log == f"log of {run_id}" and timer.active
    again = L.poll_run(run_id, cursor, series, store=store, runner=runner)
    assert again[0] == cursor and again[2:7] == (gr.skip(),) * 5  # status, plots, log, queue: all unchanged
    store.log_metrics(run_id, 2, {"train/loss": 1.5, "val/loss": 1.6})
    store.finish(run_id, RunStatus.SUCCEEDED)
    cursor2, series, status, loss, *_, timer, _, _ = L.poll_run(run_id, cursor, again[1], store=store, runner=runner)
    assert cursor2 > cursor and [t.name for t in loss.data] == ["train loss", "val loss"]
    assert "succeeded" in status and not timer.active  # over, and nothing else queued: stop polling
    # another run selected with a stale cursor: starts over from its first point
    other = make_run(store, "other", "succeeded")
    store.log_metrics(other, 1, {"train/loss": 3.0})
    out = L.poll_run(other, cursor2, series, store=store, runner=runner)
    assert list(out[3].data[0].y) == [3.0]


def test_attach_picks_the_newest_active_run(tmp_path):
    store = Store.for_home(tmp_path)
    make_run(store, "old", "succeeded")
    running = make_run(store, "running", "running")
    make_run(store, "done", "failed")
    select, timer = L.attach(store=store)
    assert select["value"] == running and timer.active
    queued = make_run(store, "queued")
    store.finish(running, RunStatus.CANCELLED)
    assert L.default_run(store) == queued
    assert f"1. #{queued} queued" in L.queue_markdown(*L.active_runs(store))


def test_history_table_filters_and_diff(tmp_path):
    store = Store.for_home(tmp_path)
    a = make_run(store, "alpha", "succeeded", r=8, final_loss=1.23456, peak_mem_gb=0.5)
    b = make_run(store, "beta", "failed", r=16)
    table = H.runs_table(store.list_runs())
    assert list(table.columns) == H.COLUMNS and list(table["id"]) == [b, a]
    assert table.loc[table["id"] == a, "final loss"].item() == 1.2346
    assert list(H.runs_table(store.list_runs(), ["failed"])["id"]) == [b]
    assert list(H.runs_table(store.list_runs(), None, "ALPHA")["id"]) == [a]
    diff = H.config_diff({"#a": store.get_run(a).config, "#b": store.get_run(b).config})
    assert set(diff["field"]) == {"lora.r", "name"}
    store.log_metrics(a, 1, {"train/loss": 2.0, "epoch": 0.5, "tokens_seen": 100})
    store.log_metrics(a, 2, {"train/loss": 1.0, "epoch": 1.0, "tokens_seen": 200})
    fig, diff = H.compare_runs([a, b], "tokens seen", 0.0, store=store)
    assert list(fig.data[0].x) == [100, 200] and len(diff) == 2
    config, summary, loss, lr = H.show_run(a, store=store)
    assert config["lora"]["r"] == 8 and "final loss 1.2346" in summary and len(loss.data) == 1


def test_delete_needs_confirmation_and_stays_in_runs(tmp_path):
    store, home = Store.for_home(tmp_path), tmp_path
    run_id = make_run(store, "gone", "succeeded")
    folder = home / "runs" / str(run_id)
    (folder / "adapter").mkdir(parents=True)
    store.set_out_dir(run_id, folder)
    # a refusal is a message and leaves the table, pickers and checkbox as they are (no exception)
    msg, *rest = H.delete_run(run_id, False, [], "", store=store, home=home)
    assert msg.startswith("**Not deleted.**") and rest == [gr.skip()] * 4 and folder.exists()
    busy = make_run(store, "busy", "running")
    msg, *rest = H.delete_run(busy, True, [], "", store=store, home=home)
    assert "cancel it" in msg and rest == [gr.skip()] * 4
    outside = make_run(store, "outside", "failed")
    store.set_out_dir(outside, tmp_path / "elsewhere")
    assert "is not inside" in H.delete_run(outside, True, [], "", store=store, home=home)[0]
    assert "no run with id 999" in H.delete_run(999, True, [], "", store=store, home=home)[0]
    msg, table, *_, confirm = H.delete_run(run_id, True, [], "", store=store, home=home)
    assert not folder.exists() and run_id not in list(table["id"]) and confirm is False


def test_export_adapter_zip(tmp_path):
    import zipfile

    store = Store.for_home(tmp_path)
    run_id = make_run(store, "zip", "succeeded")
    adapter = tmp_path / "runs" / str(run_id) / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    store.update_run(run_id, adapter_dir=str(adapter))
    path = H.export_adapter(run_id, store=store, home=tmp_path)
    assert path.parent == tmp_path / "exports"
    # the one adapter zip of the project (the same as `export --zip` and the Chat tab's): with its model card
    assert path == tmp_path / "exports" / f"run-{run_id}-adapter.zip"
    assert sorted(zipfile.ZipFile(path).namelist()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert "# zip" in zipfile.ZipFile(path).read("README.md").decode()
    empty = make_run(store, "none", "failed")
    with pytest.raises(gr.Error):
        H.download_adapter(empty, store=store, home=tmp_path)


def test_relaunch_prefills_the_form(tmp_path):
    store = Store.for_home(tmp_path)
    cfg = T.config_from_form(NON_DEFAULT)
    run_id = store.create_run("x", cfg.to_dict(), "", model=cfg.model)
    out = T.prefill_form(run_id, None, store=store)
    values = dict(zip(T.FORM_FIELDS, out))
    values["targets"] = values["targets"]["value"]
    assert T.config_from_form(values, out[len(T.FORM_FIELDS)]) == cfg
    assert out[-1].selected == "train"


def test_status_line_shows_progress_eta_throughput_and_padding():
    from types import SimpleNamespace

    from storage import RunStatus
    from ui.live_view import status_markdown

    run = SimpleNamespace(
        id=3, name="pirate", status=RunStatus.RUNNING, total_steps=40, peak_mem_gb=None, error=None, adapter_dir=None
    )
    last = {
        "total_steps": 40,
        "epoch": 0.5,
        "eta_s": 75,
        "tokens_per_s": 812.4,
        "pad_frac": 0.0,
        "mem/peak_gb": 1.234,
        "train/loss": 1.5,
        "val/loss": 1.6,
    }
    text = status_markdown(run, last, 20, None)
    for needle in (
        "#3 pirate · running",
        "step 20 / 40",
        "epoch 0.50",
        "ETA 1:15",
        "812 tok/s",
        "padding 0%",
        "peak 1.23 GB",
        "loss 1.5000",
        "val 1.6000",
    ):
        assert needle in text, (needle, text)
    queued = SimpleNamespace(**{**run.__dict__, "status": RunStatus.QUEUED})
    assert status_markdown(queued, {}, 0, 2).endswith("position 2 in the queue")
