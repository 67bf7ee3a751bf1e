"""The Calculator and Spectra tabs: their handlers called as plain functions on real data (anatomies of
the tiny models, a store filled by real tiny training runs, adapter folders through the real CLI), and
the plot builders. No browser, no server."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

from engine.core import estimate as E
from engine.core.config import RunConfig
from ui import calculator_tab as C
from ui import insight_plots as P
from ui import spectra_tab as S

ROOT = Path(__file__).resolve().parents[1]


def knobs(**changes) -> list:
    k = {**C.KNOB_DEFAULTS, **changes}
    return [k[name] for name in C.KNOBS]


# ---- calculator: the estimate panel -----------------------------------------------------------------


def test_estimate_panel_shows_the_engine_estimate(tiny_llama_dir, anatomy_of):
    anatomy = anatomy_of(tiny_llama_dir)
    summary, bar, table, fits, advice = C.estimate_panel(anatomy, "cuda", 16, *knobs(r=4, batch_size=2))
    est = E.estimate(
        anatomy,
        RunConfig.from_dict(
            {"model": str(tiny_llama_dir), "lora": {"r": 4, "alpha": 16}, "train": {"batch_size": 2}, "train_on": "all"}
        ),
        "cuda",
    )
    assert f"{est.trainable_params:,}" in summary and f"{est.trainable_pct:.3f} %" in summary
    assert f"{est.adapter_file_bytes / 2**20:.2f} MiB" in summary and f"{est.total_gb:.2f} GB" in summary
    rows = est.table_rows()
    assert list(table["term"]) == [label for label, _, _ in rows]
    assert [t.name for t in bar.data] == [label for label, n, _ in rows[:-1] if n > 0]
    assert sum(t.x[0] for t in bar.data) == pytest.approx(E.gb(est.total_bytes))
    assert all(f"{g} GB ✅" in fits for g in C.GPUS)  # a 2-layer toy fits everywhere
    assert advice == "Fits in the 16 GB budget."


def test_estimate_panel_counts_equal_peft_for_custom_kinds_layers_and_dora(tiny_gpt2_dir, anatomy_of):
    """GPT-2's two c_proj kinds are told apart by the checklist's target names (attn.c_proj, mlp.c_proj)."""
    from peft import get_peft_model

    from engine.ml.model import describe, load_base_model, lora_config, pick_device

    anatomy = anatomy_of(tiny_gpt2_dir)
    targets = [t for _, t in C.kind_choices(anatomy)]
    assert "attn.c_proj" in targets and "mlp.c_proj" in targets
    k = dict(r=3, targets=C.CUSTOM, kinds=["c_attn", "mlp.c_proj"], layers="1", use_dora=True)
    cfg = C.calc_config(anatomy, dict(zip(C.KNOBS, knobs(**k))))
    assert cfg.lora.targets == ("c_attn", "mlp.c_proj") and cfg.lora.layers == (1,)
    summary = C.estimate_panel(anatomy, "cpu", 0, *knobs(**k))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = load_base_model(str(tiny_gpt2_dir), cfg, pick_device())
        peft_model = get_peft_model(base, lora_config(cfg, describe(base)))
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert f"**Trainable: {trainable:,}** parameters" in summary and f"of {total:,})" in summary
    assert "in 2 modules" in summary


def test_estimate_panel_suggests_when_over_budget_and_reports_bad_knobs(tiny_llama_dir, anatomy_of):
    anatomy = anatomy_of(tiny_llama_dir)
    _, _, _, _, advice = C.estimate_panel(anatomy, "cuda", 0.001, *knobs(batch_size=16, max_seq_len=2048))
    assert advice.startswith("**Over the 0.001 GB budget.**") and "gradient checkpointing" in advice
    summary, bar, table, fits, advice = C.estimate_panel(anatomy, "cuda", 16, *knobs(layers="7"))
    assert summary.startswith("⚠") and "no layer 7" in summary and table.empty and not bar.data
    summary = C.estimate_panel(anatomy, "cuda", 16, *knobs(targets=C.CUSTOM, kinds=[]))[0]
    assert "tick at least one module kind" in summary
    assert C.estimate_panel(None, "cuda", 16, *knobs())[0].startswith("Pick a model")


def test_device_packing_and_target_share_change_the_estimate(tiny_llama_dir, anatomy_of):
    anatomy = anatomy_of(tiny_llama_dir)

    def est(device="cuda", **k):
        cfg = C.calc_config(anatomy, dict(zip(C.KNOBS, knobs(**k))))
        frac = k.get("target_frac", 1.0)
        return E.estimate(anatomy, cfg, device, target_frac=frac if frac < 1 else None)

    assert est().n_targets == 4 * 511 and est(target_frac=0.25).n_targets == 511
    assert est(packing=False).logits_bytes >= est().logits_bytes
    cpu = C.estimate_panel(anatomy, "cpu", 16, *knobs())
    assert "RAM" in cpu[3] and "peak RSS growth" in cpu[0]
    assert not [s for s in cpu[1].layout.shapes]  # no GPU lines on CPU
    assert est("cpu").framework_bytes > 0 and est("cuda").framework_bytes == 0


def test_past_runs_show_estimated_vs_measured(tmp_path):
    from storage import RunStatus, Store

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    cfg = RunConfig.from_dict({"model": "/models/x", "lora": {"r": 16}, "train": {"batch_size": 2}}).to_dict()
    a = store.create_run("a", cfg, "", model="/models/x", status=RunStatus.SUCCEEDED)
    store.update_run(a, est_mem_gb=1.10, peak_mem_gb=1.00, device="cpu")
    b = store.create_run("b", cfg, "", model="/models/x", status=RunStatus.SUCCEEDED)
    store.update_run(b, est_mem_gb=2.0, peak_mem_gb=2.5, device="cuda:0")
    store.create_run("queued", cfg, "", model="/models/x")  # no measurement yet: left out
    other = store.create_run("other", cfg, "", model="/models/y", status=RunStatus.SUCCEEDED)
    store.update_run(other, est_mem_gb=1.0, peak_mem_gb=1.0, device="cpu")
    table, points = C.past_runs(store, "/models/x")
    assert list(table["run"]) == ["#2 b", "#1 a"]
    assert list(table["error %"]) == [-20.0, 10.0]
    assert list(table["measured as"]) == ["max_memory_allocated", "peak RSS growth"]
    assert table["setup"][0] == "r16 all-linear · 2×512"
    assert points == [("#2", 2.0, 2.5), ("#1", 1.1, 1.0)]
    df, fig, note = C.runs_panel({"model": "/models/x"}, store=store)
    assert "mean |error| 15.0 %, worst 20.0 %" in note and len(fig.data) == 2
    assert C.runs_panel({"model": "/models/none"}, store=store)[2].startswith("No finished run")


# ---- spectra: a store filled by real training runs ---------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir, chat_jsonl):
    """Two real 4-step runs in one store: r = 8 LoRA, and r = 4 DoRA on q,v; spectra at steps 2 and 4."""
    from engine.ml.train import train
    from storage import RunStatus, Store, StoreSink

    home = tmp_path_factory.mktemp("spectra-home")
    store = Store.for_home(home)
    ids = {}
    for name, lora in (
        ("lora8", {"r": 8, "targets": "all-linear"}),
        ("dora4", {"r": 4, "targets": "qv", "use_dora": True}),
    ):
        cfg = RunConfig.from_dict(
            {
                "model": str(tiny_llama_dir),
                "dataset": str(chat_jsonl),
                "name": name,
                "lora": {"alpha": 16, **lora},
                "train": {
                    "lr": 1e-2,
                    "max_steps": 4,
                    "save_every": 2,
                    "eval_every": 100,
                    "batch_size": 4,
                    "warmup_steps": 0,
                    "val_split": 0.0,
                },
            }
        )
        out = home / "runs" / name
        run_id = store.create_run(name, cfg.to_dict(), out, model=cfg.model, status=RunStatus.RUNNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(cfg, out, StoreSink(store, run_id), home=home)
        store.finish(run_id, RunStatus.SUCCEEDED)
        ids[name] = run_id
    return store, ids, home


def test_run_sources_and_summary(trained):
    store, ids, _ = trained
    assert {rid for _, rid in S.run_choices(store)} == set(ids.values())
    out = S.load_runs([ids["lora8"], ids["dora4"]], {}, store=store)
    sources = out[0]
    lora8 = next(v for v in sources.values() if v["run_id"] == ids["lora8"])
    assert lora8["steps"] == [2, 4] and lora8["step"] == 4 and len(lora8["modules"]) == 14
    assert Path(lora8["adapter_dir"], "adapter_config.json").is_file()
    assert all(len(m["sigma"]) == 8 for m in lora8["modules"].values())
    summary = out[1]
    assert "14 modules · r 8" in summary and "4 modules · r 4" in summary and "DoRA" in summary
    assert S.DORA_NOTE.splitlines()[0] in summary
    assert out[2]["choices"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_sigma_view_filters_by_kind_and_layer(trained):
    store, ids, _ = trained
    sources = S.load_runs([ids["lora8"]], {}, store=store)[0]
    fig, note = S.sigma_view(sources, ["q_proj", "v_proj"], "1", True, "normalised")
    assert [t.name for t in fig.data] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert all(t.y[0] == pytest.approx(1.0) for t in fig.data) and fig.layout.yaxis.type == "log"
    assert note == "2 module(s)"
    fig, _ = S.sigma_view(sources, None, "", False, "energy")
    assert len(fig.data) == 14 and all(t.y[-1] == pytest.approx(1.0) for t in fig.data)
    assert S.sigma_view(sources, None, "x-y", False, "sigma")[1].startswith("⚠")


def test_heatmap_cells_are_the_norms_of_the_saved_adapter(trained):
    """Each cell of the ‖ΔW‖_F heatmap is ‖scaling·B·A‖_F of that layer's module, formed from the saved adapter."""
    from engine.ml.spectra import load_adapter

    store, ids, _ = trained
    sources = S.load_runs([ids["lora8"]], {}, store=store)[0]
    src = next(iter(sources.values()))
    _, factors, _ = load_adapter(src["adapter_dir"])
    layers, kinds, grid = S.grid_of(src["modules"], "fro_norm")
    assert layers == [0, 1] and kinds == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for name, (A, B, scaling) in factors.items():
        layer, kind = int(name.split(".")[2]), name.split(".")[-1]
        assert grid[layers.index(layer)][kinds.index(kind)] == pytest.approx(float((scaling * B @ A).norm()), rel=1e-4)
    fro, eff, mag = S.heatmap_view(sources, src["label"])
    assert fro.data[0].type == "heatmap" and len(fro.data[0].z) == 2 and len(fro.data[0].z[0]) == 7
    assert eff.data[0].zmax == 8 and mag["visible"] is False


def test_dora_run_shows_the_magnitude_change(trained):
    store, ids, _ = trained
    sources = S.load_runs([ids["dora4"]], {}, store=store)[0]
    src = next(iter(sources.values()))
    assert all("DoRA" in m["note"] and m["magnitude_change"] > 0 for m in src["modules"].values())
    _, _, mag = S.heatmap_view(sources, src["label"])
    assert mag["visible"] is True and mag["value"].data[0].x == ("q_proj", "v_proj")


def test_checkpoint_view_has_one_curve_per_saved_step(trained):
    store, ids, _ = trained
    sources = S.load_runs([ids["lora8"]], {}, store=store)[0]
    label = next(iter(sources))
    fig = S.checkpoint_view(sources, label, "model.layers.0.self_attn.q_proj", False, "sigma", store=store)
    assert [t.name for t in fig.data] == ["step 2", "step 4"]
    assert list(fig.data[1].y) == pytest.approx(sources[label]["modules"]["model.layers.0.self_attn.q_proj"]["sigma"])
    assert not S.checkpoint_view(sources, label, None, False, "sigma", store=store).data


def test_adapter_folder_through_the_cli_matches_the_stored_spectra(trained):
    from ui.backend import Backend

    store, ids, home = trained
    sources = S.load_runs([ids["lora8"]], {}, store=store)[0]
    run_src = next(iter(sources.values()))
    out = S.add_folder(run_src["adapter_dir"], sources, backend=Backend(home))
    both = out[0]
    folder = next(v for v in both.values() if v["run_id"] is None)
    assert set(folder["modules"]) == set(run_src["modules"])
    for name, m in folder["modules"].items():
        assert m["sigma"] == pytest.approx(run_src["modules"][name]["sigma"], rel=1e-4, abs=1e-7)
    assert len(out[6]["choices"]) == 2  # both sources can be compared by φ
    assert set(S.clear_folders(both)[0]) == set(sources)
    with pytest.warns(UserWarning, match="not a PEFT adapter folder"):  # a toast; the sources stay as they are
        assert all(u == gr.skip() for u in S.add_folder(str(home), sources, backend=Backend(home)))


def test_phi_between_an_adapter_and_itself_and_two_ranks(trained):
    from ui.backend import Backend

    store, ids, home = trained
    sources = S.load_runs([ids["lora8"], ids["dora4"]], {}, store=store)[0]
    by_id = {v["run_id"]: k for k, v in sources.items()}
    module = "model.layers.1.self_attn.q_proj"
    backend = Backend(home)
    mode = next(iter(S.PHI_MODES))
    fig, note = S.phi_view(sources, by_id[ids["lora8"]], by_id[ids["lora8"]], module, mode, 8, 8, backend=backend)
    z = fig.data[0].z
    assert len(z) == 8 and all(z[i][i] == pytest.approx(1.0, abs=1e-6) for i in range(8))
    assert "diagonal is 1" in note
    fig, note = S.phi_view(
        sources, by_id[ids["lora8"]], by_id[ids["dora4"]], module, "ΔW = B·A: output space", 8, 8, backend=backend
    )
    z = fig.data[0].z
    assert (len(z), len(z[0])) == (8, 4)  # j is capped at the second adapter's rank
    assert all(0.0 <= v <= 1.0 + 1e-9 for row in z for v in row) and "(r = 8)" in note and "(r = 4)" in note
    with pytest.warns(UserWarning, match="no LoRA on"):
        plot, note = S.phi_view(
            sources, by_id[ids["lora8"]], by_id[ids["dora4"]], "model.layers.1.mlp.up_proj", mode, 4, 4, backend=backend
        )
    assert plot == gr.skip() and note.startswith("⚠ φ failed:") and "no LoRA on" in note


def test_layer_filter_follows_the_config_rule():
    assert S.layer_set("") is None and S.layer_set("0-2, 5") == {0, 1, 2, 5}
    for bad in ("a", "5-2"):  # a backwards range is refused here exactly as in lora.layers
        with pytest.raises(ValueError):
            S.layer_set(bad)


# ---- the plot builders -----------------------------------------------------------------------------


def test_memory_figure_stacks_the_terms_and_marks_gpus():
    rows = [
        ("base weights: linear layers", 10 * P.GIB, "bf16"),
        ("activations", 8 * P.GIB, "..."),
        ("gradients", 0, "not at the peak"),
        ("CUDA context", P.GIB // 2, "fixed"),
        ("total", 0, ""),
    ]
    fig = P.memory_figure(rows)
    assert [t.name for t in fig.data] == ["base weights: linear layers", "activations", "CUDA context"]
    assert fig.layout.barmode == "stack" and all(t.orientation == "h" for t in fig.data)
    assert [s.x0 for s in fig.layout.shapes] == [16, 24]  # every size below the total, then the first above
    assert "18.50 GB" in fig.layout.title.text
    assert not P.memory_figure(rows, device="cpu").layout.shapes
    assert not P.memory_figure([]).data


def test_sigma_series_and_figure_modes():
    assert P.sigma_series([4, 2, 0], "normalised") == [1.0, 0.5, 0.0]
    assert P.sigma_series([3, 4], "energy") == pytest.approx([9 / 25, 1.0])
    assert P.sigma_series([0, 0], "energy") == [0.0, 0.0]  # B = 0: all-zero spectrum
    fig = P.sigma_figure({"a": [2.0, 0.0], "b": [1.0, 0.5]}, log=True)
    assert [t.name for t in fig.data] == ["a", "b"] and fig.layout.yaxis.type == "log"
    assert list(fig.data[0].y) == [2.0, None]  # zero cannot sit on a log axis
    assert P.sigma_figure({"a": [1.0]}, mode="energy").layout.yaxis.range == (0, 1.02)
    with pytest.raises(ValueError):
        P.sigma_series([1.0], "bogus")


def test_heatmap_similarity_steps_and_accuracy_figures():
    fig = P.heatmap_figure([0, 1], ["q_proj", "v_proj"], [[1.0, None], [2.0, 3.0]], title="t")
    assert fig.data[0].type == "heatmap" and [list(r) for r in fig.data[0].z] == [[1.0, None], [2.0, 3.0]]
    assert fig.data[0].x == ("q_proj", "v_proj") and fig.data[0].y == (0, 1)
    sim = P.similarity_figure([[1.0, 0.5], [0.5, 1.0], [0.2, 0.4]], title="φ")
    assert (sim.data[0].zmin, sim.data[0].zmax) == (0.0, 1.0) and sim.data[0].y == (1, 2, 3)
    steps = P.steps_figure({20: [1.0, 0.1], 10: [0.5, 0.1]}, module="m")
    assert [t.name for t in steps.data] == ["step 10", "step 20"]
    acc = P.accuracy_figure([("#1", 1.1, 1.0)])
    assert [t.name for t in acc.data] == ["estimate = measured", "runs"] and acc.data[1].y == (1.1,)


# ---- wiring and import hygiene -----------------------------------------------------------------------


def test_tabs_build_inside_blocks(trained):
    from ui.backend import Backend

    store, _, home = trained
    with gr.Blocks():
        calc = C.build_calculator_tab(store, None, home, Backend(home))
        spec = S.build_spectra_tab(store, None, home, Backend(home))
    assert calc.anatomy is not None and len(calc.knobs) == len(C.KNOBS)
    assert len(spec.run_pick.choices) == 2


def test_importing_the_tabs_does_not_import_torch():
    code = (
        "import sys, ui.calculator_tab, ui.spectra_tab, ui.insight_plots; "
        "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_importance_heatmap_comes_from_the_engine_and_prefills_a_lora_drop_run(trained):
    from engine.core import importance as I
    from ui import importance_panel as P
    from ui.backend import Backend
    from ui.train_form import FORM_FIELDS

    store, ids, home = trained
    sources = S.load_runs([ids["dora4"]], {}, store=store)[0]
    label = next(iter(sources))
    heat, share, note, kept = P.importance_view(sources, label, "", 4, 0.9, backend=Backend(home))
    (cached,) = (home / "cache" / "importance").glob("*.json")  # the engine's own report, cached by its child
    report = {**json.loads(cached.read_text()), "keep": {"layers": [int(x) for x in kept.split(",")]}}
    assert report["examples"] == 4 and I.keep_layers(report["modules"], 0.9) == report["keep"]["layers"]
    z = heat.data[0].z
    assert list(heat.data[0].x) == ["q_proj", "v_proj"] and list(heat.data[0].y) == [0, 1]
    assert z[1][0] == pytest.approx(report["modules"]["model.layers.1.self_attn.q_proj"])
    assert all(v > 0 for row in z for v in row)
    assert [t.name for t in share.data] == ["share", "cumulative share"]
    assert share.data[1].y[-1] == pytest.approx(1.0) and kept == ",".join(map(str, report["keep"]["layers"]))
    assert "4 examples" in note and "layers carrying 90%" in note
    form = P.prefill_kept(sources, label, kept, None, store=store)
    assert form[FORM_FIELDS.index("layers")] == kept and form[FORM_FIELDS.index("use_dora")] is True


def test_adalora_views_show_final_ranks_and_the_budget_only_for_adalora():
    from ui import rank_panel as R

    note = "AdaLoRA: ΔW = P·Λ·Q·α/r; pruned singular values are 0"
    modules = {
        "model.layers.0.self_attn.q_proj": {"sigma": [0.3, 0.1, 0.0, 0.0], "note": note},
        "model.layers.1.self_attn.q_proj": {"sigma": [0.5, 0.2, 0.1, 0.0], "note": note},
        "model.layers.1.mlp.up_proj": {"sigma": [0.0, 0.0, 0.0, 0.0], "note": note},
    }
    series = {"adalora/budget": [(0, 12.0), (5, 8.0)], "adalora/rank_total": [(0, 12.0), (5, 5.0)]}
    store = SimpleNamespace(metric_series=lambda run_id, name: series[name])
    heat, budget = R.rank_view({"a": {"run_id": 7, "modules": modules}}, "a", store=store)
    assert heat["visible"] and [list(row) for row in heat["value"].data[0].z] == [[2, None], [3, 0]]
    assert "total 5" in heat["value"].layout.title.text
    assert [t.name for t in budget["value"].data] == list(R.SERIES) and budget["value"].data[1].y == (12.0, 5.0)
    plain = {"b": {"run_id": 8, "modules": {"model.layers.0.q": {"sigma": [1.0], "note": ""}}}}
    assert [u["visible"] for u in R.rank_view(plain, "b", store=store)] == [False, False]


@pytest.mark.parametrize("method", ["adalora", "vera"])
def test_calculator_counts_equal_peft_for_adalora_and_vera(tiny_llama_dir, anatomy_of, method):
    from peft import get_peft_model

    from engine.ml.model import describe, load_base_model, lora_config, pick_device

    anatomy = anatomy_of(tiny_llama_dir)
    k = dict(r=8, targets="all-linear", method=method)
    cfg = C.calc_config(anatomy, dict(zip(C.KNOBS, knobs(**k))))
    summary = C.estimate_panel(anatomy, "cpu", 0, *knobs(**k))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = load_base_model(str(tiny_llama_dir), cfg, pick_device())
        peft_model = get_peft_model(base, lora_config(cfg, describe(base), total_steps=100))
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert f"**Trainable: {trainable:,}** parameters" in summary and f"of {total:,})" in summary
