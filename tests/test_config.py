import dataclasses
import json

import pytest

from engine.core.config import EMBEDDED_MODEL, ConfigError, LoraSpec, RunConfig, field_help, parse_layers


def test_defaults_work_on_first_click():
    cfg = RunConfig()
    assert cfg.model == EMBEDDED_MODEL and cfg.dataset == "builtin:persona"
    assert cfg.lora.r == 8 and cfg.lora.alpha == 16 and cfg.lora.targets == ("all-linear",)


def test_round_trip_json_and_yaml(tmp_path):
    cfg = RunConfig.from_dict(
        {
            "lora": {
                "r": 16,
                "alpha": 32,
                "layers": "0-2,5",
                "targets": ["q_proj", "v_proj"],
                "use_rslora": True,
                "init": "pissa",
            },
            "train": {"lr": 1e-3, "max_steps": 7},
        }
    )
    assert cfg.lora.layers == (0, 1, 2, 5)
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg
    p = tmp_path / "c.yaml"
    p.write_text("lora:\n  r: 4\n  targets: qv\ntrain:\n  max_steps: 3\n")
    y = RunConfig.from_file(p)
    assert (y.lora.r, y.lora.targets, y.train.max_steps) == (4, ("qv",), 3)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().lora.r = 3  # type: ignore[misc]


def test_every_problem_reported_at_once():
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(
            {
                "quant": "2bit",
                "lora": {"r": 0, "alpha": -1, "dropout": 1.5, "rank": 3},
                "train": {"lr": "fast", "batch_size": 0, "val_split": 0.9},
            }
        )
    msg = str(e.value)
    for needle in [
        "quant = '2bit': must be one of none, 8bit, 4bit",
        "lora.r = 0",
        "lora.alpha = -1.0",
        "lora.dropout = 1.5",
        "lora.rank: unknown field",
        "train.lr = 'fast'",
        "train.batch_size = 0",
        "train.val_split = 0.9",
    ]:
        assert needle in msg, needle
    assert len(e.value.problems) == 8


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="PiSSA/OLoRA need the full-precision weight"):
        RunConfig(quant="4bit", lora=LoraSpec(init="pissa"))
    with pytest.raises(ConfigError, match="mix of presets and names"):
        RunConfig(lora=LoraSpec(targets=("qv", "o_proj")))
    with pytest.raises(ConfigError, match="built-in sets are"):
        RunConfig(dataset="builtin:nope")


def test_bad_file_messages(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.from_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON at line 1"):
        RunConfig.from_file(bad)


def test_parse_layers():
    assert parse_layers("0-3,8") == (0, 1, 2, 3, 8)
    assert parse_layers([5, 1, 5]) == (1, 5)
    assert parse_layers("") == ()
    with pytest.raises(ValueError, match="runs backwards"):
        parse_layers("4-2")


def test_help_text_for_every_field():
    for section in (None, "lora", "train"):
        for name, meta in field_help(section).items():
            assert meta["help"], f"{section}.{name} has no help"
