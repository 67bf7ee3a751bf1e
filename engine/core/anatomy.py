"""Which modules of a model can take LoRA, which ones a config chooses, and how they are laid out. Stdlib only.

A model's *anatomy* is the dict `python -m engine inspect MODEL --json` prints (engine.ml.model builds it on
the meta device). Its `modules` list holds one dict per LoRA-able linear layer, in model order:

    {"name": "model.layers.3.self_attn.q_proj", "kind": "q_proj", "group": "attention", "layer": 3,
     "in": 576, "out": 576, "bias": False, "type": "Linear"}

Every rule about that list lives here, once, and the trainer (engine.ml.model), the estimator
(engine.core.estimate), the CLI and the UI all call it: the group and layer of a module, what a preset
selects, how `lora.targets` and `lora.layers` resolve (the errors list what exists), the kinds grouping
the Train form shows, the layers × kinds grid of the heatmaps, and the compute-dtype rule.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from engine.core.config import TARGET_PRESETS, ConfigError, LoraSpec

# Parent module names that mark a linear layer as attention or MLP (Llama, GPT-2, NeoX, Phi, Mixtral, ...).
ATTN_PARENTS = ("self_attn", "attn", "attention", "self_attention", "mixer")
MLP_PARENTS = ("mlp", "feed_forward", "ffn", "ff", "block_sparse_moe")
# The LoRA paper's small-budget choice: the query and value projections (fused qkv where there is no split).
Q_OR_V = re.compile(r"^(q|v|q_proj|v_proj|query|value|wq|wv|c_attn|qkv_proj|Wqkv|query_key_value|in_proj)$")
# Output-head and embedding names that are never LoRA targets, whatever their type.
NOT_TARGETS = ("lm_head", "embed_out", "output")
# Heatmap column order (Llama, GPT-2, NeoX, Phi, Mixtral-style names); other kinds follow in model order.
KIND_ORDER = (
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "query_key_value",
    "Wqkv",
    "c_attn",
    "o_proj",
    "out_proj",
    "dense",
    "attn.c_proj",
    "gate_proj",
    "up_proj",
    "gate_up_proj",
    "w1",
    "w3",
    "fc1",
    "c_fc",
    "dense_h_to_4h",
    "down_proj",
    "w2",
    "fc2",
    "mlp.c_proj",
    "dense_4h_to_h",
)


# ---- one module ---------------------------------------------------------------------------------------


def layer_of(name: str) -> int | None:
    """The transformer block of a module path: its first integer component (`model.layers.3.mlp` → 3)."""
    return next((int(p) for p in name.split(".") if p.isdigit()), None)


def group_of(name: str) -> str:
    """attention | mlp | other, from the module's parent (`...self_attn.q_proj` → attention)."""
    parts = name.split(".")
    parent = parts[-2] if len(parts) > 1 else ""
    return "attention" if parent in ATTN_PARENTS else "mlp" if parent in MLP_PARENTS else "other"


def module_entry(name: str, in_features: int, out_features: int, bias: bool, type_name: str) -> dict[str, Any]:
    """The anatomy dict of one linear layer (what `inspect --json` lists under `modules`)."""
    return {
        "name": name,
        "kind": name.split(".")[-1],
        "group": group_of(name),
        "layer": layer_of(name),
        "in": int(in_features),
        "out": int(out_features),
        "bias": bool(bias),
        "type": type_name,
    }


def is_target_name(name: str) -> bool:
    return name.split(".")[-1] not in NOT_TARGETS


# ---- which modules a config chooses ---------------------------------------------------------------------


def preset_selects(preset: str, group: str, kind: str) -> bool:
    """Does a target preset take a module of this group and kind?"""
    return (
        preset == "all-linear"
        or (preset == "attention" and group == "attention")
        or (preset == "mlp" and group == "mlp")
        or (preset == "qv" and group == "attention" and bool(Q_OR_V.match(kind)))
    )


def kinds_in_order(modules: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(m["kind"] for m in modules))


def resolve_targets(
    lora: LoraSpec, modules: Sequence[Mapping[str, Any]], model_name: str = "the model"
) -> list[Mapping[str, Any]]:
    """The module dicts that get LoRA for `lora.targets` and `lora.layers`, in model order.

    A preset selects by group and kind; a name selects every module whose path is it or ends with
    `.name` (`q_proj`, `attn.c_proj`, `model.layers.1.mlp.up_proj`). Raises ConfigError listing every
    problem, each naming what the model does have.
    """
    problems: list[str] = []
    if lora.targets and lora.targets[0] in TARGET_PRESETS:
        preset = lora.targets[0]
        chosen = [m for m in modules if preset_selects(preset, m["group"], m["kind"])]
        if not chosen:
            problems.append(
                f"lora.targets = {preset!r}: this preset matches no module of {model_name}; "
                f"its LoRA-able modules are {', '.join(kinds_in_order(modules))}"
            )
    else:
        picked: set[str] = set()
        for t in lora.targets:
            hit = [m for m in modules if m["name"] == t or m["name"].endswith("." + t)]
            if not hit:
                problems.append(
                    f"lora.targets: {t!r} matches no module of {model_name}; LoRA-able modules "
                    f"are {', '.join(kinds_in_order(modules))} (or presets {', '.join(TARGET_PRESETS)})"
                )
            picked.update(m["name"] for m in hit)
        chosen = [m for m in modules if m["name"] in picked]
    if lora.layers:
        have = sorted({m["layer"] for m in modules if m["layer"] is not None})
        missing = [i for i in lora.layers if i not in have]
        if missing:
            problems.append(
                f"lora.layers = {list(lora.layers)}: {model_name} has layers {have[0]}–{have[-1]}; "
                f"no layer {', '.join(map(str, missing))}"
                if have
                else f"lora.layers: {model_name} has no numbered layers"
            )
        chosen = [m for m in chosen if m["layer"] in lora.layers]
    if problems:
        raise ConfigError(problems)
    return chosen


def compact_targets(chosen: Sequence[str], modules: Sequence[Mapping[str, Any]]) -> list[str]:
    """The shortest peft `target_modules` list selecting exactly `chosen`: kind names when whole kinds are taken."""
    chosen_set = set(chosen)
    kinds = {m["kind"] for m in modules if m["name"] in chosen_set}
    by_kind = {m["name"] for m in modules if m["kind"] in kinds}
    return sorted(kinds) if by_kind == chosen_set else list(chosen)


# ---- kinds, as the Train form and the calculator list them -------------------------------------------------


def kind_groups(modules: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per module kind: count, parameters, shape and `target`, the name that selects exactly it.

    A kind used under two parents (GPT-2's attn.c_proj and mlp.c_proj) is split in two, each with its
    `parent.kind` target.
    """

    def parent(m: Mapping[str, Any]) -> str:
        return m["name"].split(".")[-2] if "." in m["name"] else ""

    parents_of: dict[str, set[str]] = {}
    for m in modules:
        parents_of.setdefault(m["kind"], set()).add(parent(m))
    kinds: dict[str, dict[str, Any]] = {}
    for m in modules:
        target = f"{parent(m)}.{m['kind']}" if len(parents_of[m["kind"]]) > 1 else m["kind"]
        k = kinds.setdefault(
            target,
            {
                "kind": m["kind"],
                "target": target,
                "group": m["group"],
                "count": 0,
                "params": 0,
                "in_features": m["in"],
                "out_features": m["out"],
            },
        )
        k["count"] += 1
        k["params"] += m["in"] * m["out"] + (m["out"] if m["bias"] else 0)
    return list(kinds.values())


def preset_kinds(anatomy: Mapping[str, Any] | None, preset: str) -> list[str]:
    """The targets (kind names) of the anatomy's kinds a preset selects: what the form ticks for it."""
    if not anatomy:
        return []
    return [k.get("target", k["kind"]) for k in anatomy["kinds"] if preset_selects(preset, k["group"], k["kind"])]


# ---- the layers × kinds grid of the heatmaps ------------------------------------------------------------------


def kind_rank(label: str) -> int:
    """Position of a heatmap column label in KIND_ORDER (unknown kinds last)."""
    parts = label.split(".")
    for key in (".".join(parts[-2:]), parts[-1]):
        if key in KIND_ORDER:
            return KIND_ORDER.index(key)
    return len(KIND_ORDER)


def column_labels(names: Sequence[str]) -> dict[str, str]:
    """Heatmap column label per module: its kind, or parent.kind where a kind repeats within a layer
    (GPT-2 has attn.c_proj and mlp.c_proj in every block)."""
    count: dict[tuple[int | None, str], int] = {}
    for n in names:
        key = (layer_of(n), n.split(".")[-1])
        count[key] = count.get(key, 0) + 1
    ambiguous = {kind for (_, kind), c in count.items() if c > 1}
    return {n: ".".join(n.split(".")[-2:]) if n.split(".")[-1] in ambiguous else n.split(".")[-1] for n in names}


def layer_kind_grid(values: Mapping[str, float | None]) -> tuple[list[int], list[str], list[list[float | None]]]:
    """(layers, kinds, grid) with grid[i][j] = the value of module kind j in layer i (None where absent).

    `values` maps full module names to a number (‖ΔW‖_F, effective rank, importance, a final rank, ...).
    Modules outside numbered layers are left out; columns follow KIND_ORDER, then model order.
    """
    inside = {n: v for n, v in values.items() if layer_of(n) is not None}
    label = column_labels(list(inside))
    layers = sorted({layer_of(n) for n in inside})  # type: ignore[type-var]
    first: dict[str, int] = {}
    for n in inside:
        first.setdefault(label[n], len(first))
    kinds = sorted(first, key=lambda k: (kind_rank(k), first[k]))
    grid: list[list[float | None]] = [[None] * len(kinds) for _ in layers]
    for n, v in inside.items():
        grid[layers.index(layer_of(n))][kinds.index(label[n])] = None if v is None else float(v)
    return layers, kinds, grid


def natural_key(name: str) -> tuple:
    """Model order for module names read from a file (files list keys alphabetically): layers.2 before
    layers.10, and q, k, v, o, gate, up, down within a layer."""
    layer = layer_of(name)
    natural = [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in name.split(".")]
    return (layer is not None, layer or 0, kind_rank(name), natural)


# ---- the compute dtype ---------------------------------------------------------------------------------------


def resolve_dtype(dtype: str, device: str, bf16_capable: bool | None = None, quant: str = "none") -> str:
    """The dtype a run computes in: `auto` = bf16 where the device has fast bf16, else fp32.

    bf16_capable: the device computes bf16 faster than fp32 (engine.ml.resources.bf16_choice: a CUDA GPU with
    bf16, or a CPU with AVX512-BF16/AMX confirmed by a matmul probe); None = a CUDA GPU has it, a CPU not.
    A quantized base on a CPU keeps fp32 under `auto` (bitsandbytes' CPU kernels). fp16 is refused on CPU
    (no fast fp16 matmul there); engine.ml.model maps the answer to a torch dtype and the estimator sizes
    memory with it, so both always agree.
    """
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device = {device!r}: must be 'cuda' or 'cpu'")
    if dtype == "fp16" and device == "cpu":
        raise ConfigError(["dtype = 'fp16' on CPU: CPUs have no fast fp16 matmul; use 'bf16' or 'fp32'"])
    if dtype != "auto":
        return dtype
    fast = device == "cuda" if bf16_capable is None else bf16_capable
    if device == "cpu" and quant != "none":
        return "fp32"
    return "bf16" if fast else "fp32"
