"""Which modules get LoRA: engine.core.anatomy's one rule, checked against what peft really wraps on the
architectures that hide surprises (GPT-2's fused Conv1D layers, Llama's grouped-query attention, Qwen2's
biases), and the kinds / heatmap layout built from the same module list."""

from __future__ import annotations

import warnings

import pytest

from engine.core import anatomy as A
from engine.core.config import ConfigError, LoraSpec, RunConfig
from tests.tiny import build_tiny_qwen2


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture
def model_dirs(tiny_llama_dir, tiny_gpt2_dir, tiny_qwen2_dir):
    return {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir, "qwen2": tiny_qwen2_dir}


# (targets, layers) → the module paths LoRA must land on, per architecture (2 layers each).
LLAMA_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPECTED = {
    "llama": [
        (["qv"], (), [f"model.layers.{i}.self_attn.{k}" for i in (0, 1) for k in ("q_proj", "v_proj")]),
        (["attention"], (1,), [f"model.layers.1.self_attn.{k}" for k in LLAMA_ATTN]),
        (["mlp"], (0,), [f"model.layers.0.mlp.{k}" for k in ("gate_proj", "up_proj", "down_proj")]),
        (["model.layers.1.mlp.up_proj"], (), ["model.layers.1.mlp.up_proj"]),
        (["down_proj", "q_proj"], (1,), ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]),
    ],
    "gpt2": [
        (["qv"], (), ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]),
        (["attention"], (0,), ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"]),
        (["c_proj"], (1,), ["transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]),
        (["mlp.c_proj"], (), ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]),
        (["c_fc", "c_attn"], (1,), ["transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"]),
    ],
    "qwen2": [
        (["qv"], (0,), ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]),
        (["attention"], (), [f"model.layers.{i}.self_attn.{k}" for i in (0, 1) for k in LLAMA_ATTN]),
        (
            ["all-linear"],
            (1,),
            [
                f"model.layers.1.{p}.{k}"
                for p, k in [("self_attn", k) for k in LLAMA_ATTN]
                + [("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")]
            ],
        ),
    ],
}


def wrapped_by_peft(path, targets, layers) -> list[str]:
    """The base-model paths of the modules peft turns into LoRA layers for this config (the trainer's path)."""
    from peft.tuners.lora import LoraLayer

    from engine.ml.model import attach_lora, load_base_model, pick_device

    cfg = RunConfig(model=str(path), lora=LoraSpec(targets=tuple(targets), layers=tuple(layers)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = attach_lora(load_base_model(str(path), cfg, pick_device()), cfg)
    return [n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)]


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_targets_resolve_to_what_peft_wraps(arch, model_dirs, anatomy_of):
    anatomy = anatomy_of(model_dirs[arch])
    for targets, layers, want in EXPECTED[arch]:
        got = [
            m["name"]
            for m in A.resolve_targets(
                LoraSpec(targets=tuple(targets), layers=layers), anatomy["modules"], anatomy["model"]
            )
        ]
        assert sorted(got) == sorted(want), (arch, targets, layers)
        assert sorted(wrapped_by_peft(model_dirs[arch], targets, layers)) == sorted(want), (arch, targets, layers)


def test_the_anatomy_lists_every_linear_layer_with_its_shape_and_bias(model_dirs, anatomy_of):
    gpt2 = {m["name"]: m for m in anatomy_of(model_dirs["gpt2"])["modules"]}
    attn = gpt2["transformer.h.0.attn.c_attn"]  # Conv1D stores (in, out): the shape must be read the right way
    assert (attn["in"], attn["out"], attn["type"], attn["group"], attn["bias"]) == (32, 96, "Conv1D", "attention", True)
    assert "lm_head" not in " ".join(gpt2)
    llama = {m["name"]: m for m in anatomy_of(model_dirs["llama"])["modules"]}
    k = llama["model.layers.1.self_attn.k_proj"]  # GQA: 2 of 4 heads' worth of keys
    assert (k["in"], k["out"], k["layer"], k["bias"]) == (32, 16, 1, False)
    qwen = {m["name"]: m for m in anatomy_of(model_dirs["qwen2"])["modules"]}
    assert [qwen[f"model.layers.0.self_attn.{n}"]["bias"] for n in LLAMA_ATTN] == [True, True, True, False]


def test_kinds_split_a_name_used_under_two_parents(model_dirs, anatomy_of):
    kinds = {k["target"]: k for k in anatomy_of(model_dirs["gpt2"])["kinds"]}
    assert set(kinds) == {"c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"}
    assert kinds["mlp.c_proj"]["group"] == "mlp" and kinds["attn.c_proj"]["group"] == "attention"
    assert kinds["c_attn"]["params"] == 2 * (32 * 96 + 96)  # weights and biases of both layers
    assert A.preset_kinds(anatomy_of(model_dirs["gpt2"]), "attention") == ["c_attn", "attn.c_proj"]
    assert A.preset_kinds(anatomy_of(model_dirs["qwen2"]), "qv") == ["q_proj", "v_proj"]


def test_errors_name_what_the_model_has(model_dirs, anatomy_of):
    anatomy = anatomy_of(model_dirs["gpt2"])
    with pytest.raises(ConfigError) as e:
        A.resolve_targets(LoraSpec(targets=("q_proj", "c_fc"), layers=(0, 5)), anatomy["modules"], "gpt2")
    assert e.value.problems == [
        "lora.targets: 'q_proj' matches no module of gpt2; LoRA-able modules are c_attn, c_proj, c_fc "
        "(or presets qv, attention, mlp, all-linear)",
        "lora.layers = [0, 5]: gpt2 has layers 0–1; no layer 5",
    ]


def test_modules_outside_the_blocks_and_the_heatmap_grid():
    mods = [
        A.module_entry(f"model.layers.{i}.self_attn.{k}", 8, 8, False, "Linear")
        for i in range(3)
        for k in ("v_proj", "q_proj")
    ] + [A.module_entry("model.extra_proj", 8, 8, True, "Linear")]
    assert mods[-1]["group"] == "other" and mods[-1]["layer"] is None
    pick = lambda t, layers=(): [m["name"] for m in A.resolve_targets(LoraSpec(targets=t, layers=layers), mods)]
    assert pick(("all-linear",)) == [m["name"] for m in mods]
    assert pick(("all-linear",), (2,)) == ["model.layers.2.self_attn.v_proj", "model.layers.2.self_attn.q_proj"]
    assert pick(("extra_proj",)) == ["model.extra_proj"]
    with pytest.raises(ConfigError, match="preset matches no module"):
        pick(("mlp",))
    layers, kinds, grid = A.layer_kind_grid({m["name"]: float(i) for i, m in enumerate(mods)})
    assert layers == [0, 1, 2] and kinds == ["q_proj", "v_proj"]  # canonical order; the unnumbered one left out
    assert grid == [[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]]
    gpt2 = A.column_labels(["h.0.attn.c_proj", "h.0.mlp.c_proj", "h.0.attn.c_attn"])
    assert gpt2 == {"h.0.attn.c_proj": "attn.c_proj", "h.0.mlp.c_proj": "mlp.c_proj", "h.0.attn.c_attn": "c_attn"}


def test_compact_targets_uses_kind_names_only_for_whole_kinds():
    mods = [A.module_entry(f"m.layers.{i}.self_attn.{k}", 4, 4, False, "Linear") for i in (0, 1) for k in ("q", "v")]
    assert A.compact_targets([m["name"] for m in mods if m["kind"] == "q"], mods) == ["q"]
    assert A.compact_targets(["m.layers.0.self_attn.q"], mods) == ["m.layers.0.self_attn.q"]


def test_the_dtype_rule():
    assert A.resolve_dtype("auto", "cuda", bf16_capable=True) == "bf16"
    assert A.resolve_dtype("auto", "cuda", bf16_capable=False) == "fp32"
    assert A.resolve_dtype("auto", "cpu") == "fp32"
    assert A.resolve_dtype("bf16", "cpu") == "bf16"
    with pytest.raises(ConfigError, match=r"fp16.*on CPU"):
        A.resolve_dtype("fp16", "cpu")
