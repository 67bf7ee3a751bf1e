"""Sweeps (engine.core.sweeps, engine.core.sweep_report, `engine sweep ...`): the grid and its names, the
parameter budget's ranks counted exactly, every member checked before anything is queued, a dry run that
queues nothing, cancel/resume/delete of a whole sweep, and (slow) four real runs and their report."""

from __future__ import annotations

import json

import pytest
import yaml

from engine.cli import main as cli
from engine.core import sweep_report as SR
from engine.core import sweeps as S
from engine.core.config import ConfigError
from engine.core.jobs import JobRunner
from storage import RunStatus, Store

TRAIN = {"max_steps": 2, "batch_size": 4, "val_split": 0.25, "eval_every": 2, "save_every": 0, "lr": 1e-2}


def sweep_file(tmp_path, model, data, grid=None, **extra):
    spec = {
        "name": "rank-vs-targets",
        "base": {"model": str(model), "dataset": str(data), "train": {**TRAIN, "threads": 1}},
        "grid": grid or {"lora.r": [1, 4], "lora.targets": ["qv", "all-linear"]},
        **extra,
    }
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def run_cli(capsys, home, *args):
    code = cli(["--home", str(home), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def store(home):
    s = Store.for_home(home)
    yield s
    s.close()


# ---- the spec and its members (no model needed) ----------------------------------------------------------


def test_the_full_grid_is_expanded_and_each_member_named_after_what_varies(tmp_path):
    spec = S.parse_sweep(
        {"name": "s", "base": {"lora": {"alpha": 8}}, "grid": {"lora.r": [1, 4], "lora.targets": ["qv", "all-linear"]}}
    )
    members = S.expand(spec)
    S.name_members(spec, members, S.varied_fields(spec, members))
    assert [m.name for m in members] == [
        "s r=1 targets=qv",
        "s r=1 targets=all-linear",
        "s r=4 targets=qv",
        "s r=4 targets=all-linear",
    ]
    assert [m.run_config().lora.r for m in members] == [1, 1, 4, 4]
    assert {m.run_config().lora.alpha for m in members} == {8.0}  # the base applies to every member
    listed = S.parse_sweep({"combinations": [{"lora.r": 8, "train.lr": 1e-3}, {"lora.r": 64, "train.lr": 5e-4}]})
    members = S.expand(listed)
    S.name_members(listed, members, S.varied_fields(listed, members))
    assert [m.name for m in members] == ["sweep r=8 lr=0.001", "sweep r=64 lr=0.0005"]


def test_every_problem_of_a_sweep_file_is_reported_at_once(tmp_path):
    (tmp_path / "base.yaml").write_text("lora: {r: 8}\n")
    assert S.parse_sweep({"base": "base.yaml", "grid": {"train.seed": [1, 2]}}, tmp_path).base == {"lora": {"r": 8}}
    with pytest.raises(ConfigError) as e:
        S.parse_sweep(
            {
                "bse": {},
                "base": "missing.yaml",
                "grid": {"lora.rank": [1], "train.lr": 0.001, "seed": [1]},
                "combinations": [{"lora.r": 2}],
                "budget": "lots",
            },
            tmp_path,
        )
    text = "\n".join(e.value.problems)
    assert "bse: unknown sweep key" in text
    assert "base = 'missing.yaml': no such run config file" in text
    assert "grid.lora.rank: not a run config field" in text
    assert "grid.train.lr = 0.001: give a non-empty list of values" in text
    assert "grid.seed: not a run config field (did you mean 'train.seed'?)" in text
    assert "give grid (every combination) or combinations (the listed ones), not both" in text
    assert "budget = 'lots': give a number of trainable parameters" in text
    with pytest.raises(ConfigError, match="the rank is what the budget decides"):
        S.parse_sweep({"grid": {"lora.r": [1, 2]}, "budget": 1000})


def test_budget_mode_gives_each_target_set_the_rank_that_fits_the_budget(tiny_llama_dir, anatomy_of):
    """The tiny Llama (2 layers, hidden 32, k/v 16 wide, MLP 64): one rank costs 224 parameters on q,v, 448 on
    q,k,v,o, 576 on the MLP and 1,024 on all linear layers; q,v at r = 8 (1,792) is the budget."""
    spec = S.parse_sweep(
        {
            "base": {"model": str(tiny_llama_dir)},
            "grid": {"lora.targets": ["qv", "attention", "mlp", "all-linear"]},
            "budget": {"like": {"lora.r": 8, "lora.targets": "qv"}},
        }
    )
    members = S.expand(spec)
    assert S.apply_budget(members, spec.budget, spec.base, lambda m: anatomy_of(tiny_llama_dir)) == []
    got = [(m.values["lora.targets"], m.values["lora.r"], m.facts["budget"]["trainable_params"]) for m in members]
    assert got == [("qv", 8, 1792), ("attention", 4, 1792), ("mlp", 3, 1728), ("all-linear", 1, 1024)]
    assert all(m.facts["budget"]["params"] == 1792 for m in members)
    assert S.varied_fields(spec, members) == ["lora.targets", "lora.r"]
    small = S.parse_sweep(
        {"base": {"model": str(tiny_llama_dir)}, "grid": {"lora.targets": ["qv", "all-linear"]}, "budget": 500}
    )
    members = S.expand(small)
    problems = S.apply_budget(members, small.budget, small.base, lambda m: anatomy_of(tiny_llama_dir))
    assert problems == [
        "sweep targets=all-linear: budget 500 is below one rank of lora.targets = ['all-linear'] (1,024 at r = 1)"
    ]
    assert members[0].values["lora.r"] == 2  # 448 ≤ 500 < 672


# ---- `engine sweep`: checked, dry run, queued ---------------------------------------------------------------


def test_dry_run_checks_every_member_and_queues_nothing(tmp_path, home, store, capsys, tiny_llama_dir, chat_jsonl):
    path = sweep_file(tmp_path, tiny_llama_dir, chat_jsonl)
    code, out, _ = run_cli(capsys, home, "sweep", str(path), "--dry-run", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["ok"] and not plan["queued"] and plan["n"] == 4, plan["problems"]
    assert [m["trainable_params"] for m in plan["members"]] == [224, 1024, 896, 4096]
    assert all(m["steps"] == 2 and m["tokens"] > 0 and m["est_mem_gb"] > 0 for m in plan["members"])
    assert plan["total_time_s"] is None and plan["time_basis"].startswith("unknown: no finished run")
    assert store.list_runs() == [] and store.list_sweeps() == []


def test_a_bad_member_is_reported_before_anything_is_queued(tmp_path, home, store, capsys, tiny_llama_dir, chat_jsonl):
    grid = {"lora.r": [4, 0], "lora.targets": ["qv", "nope_proj"]}
    code, _, err = run_cli(capsys, home, "sweep", str(sweep_file(tmp_path, tiny_llama_dir, chat_jsonl, grid)))
    assert code == 2
    assert "rank-vs-targets r=0 targets=qv: lora.r = 0: must be an integer 1–1024" in err
    assert "rank-vs-targets r=0 targets=nope_proj: lora.r = 0" in err
    assert "rank-vs-targets r=4 targets=nope_proj: lora.targets: 'nope_proj' matches no module" in err
    assert "not queued: 3 problem(s)" in err
    assert store.list_runs() == [] and store.list_sweeps() == []


def test_a_whole_sweep_is_queued_linked_cancelled_resumed_and_deleted(
    tmp_path, home, store, capsys, tiny_llama_dir, chat_jsonl
):
    code, out, err = run_cli(capsys, home, "sweep", str(sweep_file(tmp_path, tiny_llama_dir, chat_jsonl)))
    assert code == 0, err
    sweep_id = int(out.split()[-1])  # the plan, then the id
    runs = SR.members_of(store, sweep_id)
    assert [r.name for r in runs] == [
        "rank-vs-targets r=1 targets=qv",
        "rank-vs-targets r=1 targets=all-linear",
        "rank-vs-targets r=4 targets=qv",
        "rank-vs-targets r=4 targets=all-linear",
    ]
    assert {r.status for r in runs} == {RunStatus.QUEUED} and [r.trainable_params for r in runs] == [
        224,
        1024,
        896,
        4096,
    ]
    assert store.get_sweep(sweep_id).spec["varied"] == ["lora.r", "lora.targets"]

    assert run_cli(capsys, home, "sweep-delete", str(sweep_id))[0] == 2  # refused: members are queued
    assert len(SR.members_of(store, sweep_id)) == 4
    code, out, _ = run_cli(capsys, home, "sweep-cancel", str(sweep_id))
    assert code == 0 and out.count("was queued: cancelled") == 4
    assert {r.status for r in SR.members_of(store, sweep_id)} == {RunStatus.CANCELLED}
    code, out, _ = run_cli(capsys, home, "sweep-resume", str(sweep_id))
    assert code == 0 and out.count("queued again from the start") == 4
    assert {r.status for r in SR.members_of(store, sweep_id)} == {RunStatus.QUEUED}
    run_cli(capsys, home, "sweep-cancel", str(sweep_id))
    folders = [home / "runs" / str(r.id) for r in runs]
    assert all(f.is_dir() for f in folders)
    code, out, _ = run_cli(capsys, home, "sweep-delete", str(sweep_id))
    assert code == 0 and out.strip().endswith(f"deleted sweep {sweep_id}")
    assert store.list_runs() == [] and store.list_sweeps() == [] and not any(f.exists() for f in folders)


# ---- four real runs --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_sweep_trains_every_member_and_the_report_lists_their_val_losses(
    tmp_path, home, store, capsys, tiny_llama_dir, chat_jsonl
):
    code, out, err = run_cli(capsys, home, "sweep", str(sweep_file(tmp_path, tiny_llama_dir, chat_jsonl)))
    assert code == 0, err
    sweep_id = int(out.split()[-1])  # the plan, then the id
    runner = JobRunner(store, home, max_concurrent=1, poll_s=0.1, env={"LORALAB_TRAIN_THREADS": "1"})
    runner.start()
    try:
        assert runner.wait_idle(600)
    finally:
        runner.stop()
    code, out, _ = run_cli(capsys, home, "sweep-report", str(sweep_id), "--json", "--curves")
    rep = json.loads(out)
    assert code == 0 and rep["counts"]["succeeded"] == 4
    assert [m["values"] for m in rep["members"]] == [
        {"lora.r": 1, "lora.targets": ["qv"]},
        {"lora.r": 1, "lora.targets": ["all-linear"]},
        {"lora.r": 4, "lora.targets": ["qv"]},
        {"lora.r": 4, "lora.targets": ["all-linear"]},
    ]
    for m in rep["members"]:
        assert m["status"] == "succeeded" and m["best_val_loss"] > 0 and m["final_val_loss"] is not None
        assert rep["curves"][str(m["id"])]["val/loss"][-1][1] == pytest.approx(m["final_val_loss"])
    lines = SR.series_by_field(rep["members"], "lora.r", "best_val_loss")
    assert sorted(lines) == ["targets=all-linear", "targets=qv"] and all(
        [x for x, _ in v] == [1, 4] for v in lines.values()
    )
    code, out, _ = run_cli(
        capsys, home, "sweep", str(sweep_file(tmp_path, tiny_llama_dir, chat_jsonl)), "--dry-run", "--json"
    )
    plan = json.loads(out)  # now a finished run of this model measures the speed
    assert plan["total_time_s"] > 0 and "tokens/s measured by run #" in plan["time_basis"]
