"""The run configuration: one frozen, typed, stdlib-only contract between UI, CLI, queue and trainer.

    cfg = RunConfig.from_file("examples/quickstart.yaml")   # YAML or JSON
    cfg = RunConfig.from_dict({"lora": {"r": 16}})           # everything else defaults
    cfg.to_dict()                                            # JSON-ready, round-trips

Validation collects every problem at once and raises ConfigError listing each one with the field,
the bad value and what is allowed (litgpt's issues list, PEFT's __post_init__). Each field's help
text lives next to it in `metadata["help"]`; the UI shows it as `info=` and the README table is built
from the same strings. No torch here: the web server imports this module.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from engine.core import variants as V
from engine.core.config_values import MAX_LAYER, _coerce_fields, _section, parse_layers, shown
from engine.core.data_fields import DATASET_COLUMNS, TEXT_SPLITS, validate_data
from engine.core.devices import DEVICES_HELP, STRATEGIES, STRATEGY_HELP, validate_devices

__all__ = ["ConfigError", "LoraSpec", "RunConfig", "TrainSpec", "field_help", "parse_layers", "shown", "validate"]

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"
BUILTIN_DATASETS = {
    "builtin:persona": "Captain Byte, a cheerful pirate who answers correctly (172 chats, written for this project)",
    "builtin:chatterbot": "chatterbot-corpus English (about 2,400 Q/A pairs, 21 topics, BSD-3)",
}
TARGET_PRESETS = ("qv", "attention", "mlp", "all-linear")
QUANT_MODES = ("none", "8bit", "4bit")
DTYPES = ("auto", "fp32", "bf16", "fp16")
INITS = ("gaussian", "pissa", "olora", "loftq")
METHODS = V.METHODS
SCHEDULERS = ("cosine", "linear", "constant")
DATASET_FORMATS = ("auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text")
TRAIN_ON = ("responses", "all")


class ConfigError(ValueError):
    """A config with one or more problems; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems, n = list(problems), len(problems)  # one problem: one line (field, bad value, the fix)
        listed = f"config has {n} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(self.problems[0] if n == 1 else listed)


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass(frozen=True)
class LoraSpec:
    """The low-rank update ΔW = scaling · B·A added to each targeted weight W (d_out × d_in).

    A is (r × d_in), B is (d_out × r); B starts at zero so training starts from the base model.
    """

    r: int = field(
        default=8,
        metadata=_help(
            "Rank of ΔW = B·A. The LoRA paper finds r = 4–8 best for q,v; larger r helps with diminishing returns "
            "(AdaLoRA, DyLoRA) and costs optimizer memory. With r ≥ 32 turn on rsLoRA."
        ),
    )
    alpha: float = field(
        default=16.0,
        metadata=_help(
            "Scale numerator: ΔW is multiplied by alpha/r (alpha/√r with rsLoRA). A good heuristic is alpha = 2·r "
            "(e.g. r 16, alpha 32)."
        ),
    )
    dropout: float = field(
        default=0.05,
        metadata=_help("Dropout on the LoRA input path only, 0–0.5. 0.05–0.1 helps small datasets; 0 for large ones."),
    )
    targets: tuple[str, ...] = field(
        default=("all-linear",),
        metadata=_help(
            "Which weights get LoRA: a preset (qv, attention, mlp, all-linear) or module kinds/names "
            "(q_proj, v_proj, c_attn, attn.c_proj, ...). QLoRA: all linear layers are needed to match full "
            "fine-tuning; AdaLoRA: for the same budget the MLP beats attention; the LoRA paper's small-budget choice is q,v."
        ),
    )
    layers: tuple[int, ...] = field(
        default=(),
        metadata=_help(
            "Restrict LoRA to these layer indices (empty = all layers). YAML accepts a list or a range string "
            "like '0-11' or '0,2,4-6'. AdaLoRA finds top layers matter most; LoRA-drop finds the importance is "
            "data-dependent: check the ΔW heatmap of a full run before cutting layers."
        ),
    )
    use_rslora: bool = field(
        default=False,
        metadata=_help(
            "rsLoRA: scale by alpha/√r instead of alpha/r so that large ranks keep learning (Kalajdzievski 2023). "
            "Recommended when r ≥ 32."
        ),
    )
    use_dora: bool = field(
        default=False,
        metadata=_help(
            "DoRA: split W into magnitude and direction and apply LoRA to the direction; adds one trainable "
            "magnitude vector per module. Often better at low rank, ~10–30% slower."
        ),
    )
    init: str = field(
        default="gaussian",
        metadata=_help(
            "How A and B start. gaussian: A random, B = 0 (ΔW = 0 at step 0). pissa: A, B from the top singular "
            "vectors of W (faster convergence; the base weight is changed to W − BA). olora: QR-based orthonormal init. "
            + V.HELP["init_loftq"],
            choices=INITS,
        ),
    )
    loraplus_lr_ratio: float = field(
        default=0.0,
        metadata=_help(
            "LoRA+: learning rate of B = ratio × lr of A (0 = off). LoRA+ finds the best runs have lr_B ≫ lr_A; "
            "its default ratio is 16 (2^4)."
        ),
    )
    freeze_A: bool = field(
        default=False,
        metadata=_help(
            "LoRA-FA: freeze the random projection A and train only B (peft's LoRA-FA optimizer). Cuts activation "
            "memory (the full-width input of A need not be kept) and halves LoRA's optimizer state."
        ),
    )
    # ---- issue 17: the update's shape (AdaLoRA, VeRA); help texts and rules in engine.core.variants ----
    method: str = field(default="lora", metadata=_help(V.HELP["method"], choices=METHODS))
    adalora_target_r: int = field(default=4, metadata=_help(V.HELP["adalora_target_r"]))
    adalora_tinit: int = field(default=0, metadata=_help(V.HELP["adalora_tinit"]))
    adalora_tfinal: int = field(default=0, metadata=_help(V.HELP["adalora_tfinal"]))
    adalora_delta_t: int = field(default=1, metadata=_help(V.HELP["adalora_delta_t"]))
    adalora_orth_reg: float = field(default=0.5, metadata=_help(V.HELP["adalora_orth_reg"]))
    vera_d_initial: float = field(default=0.1, metadata=_help(V.HELP["vera_d_initial"]))


@dataclass(frozen=True)
class TrainSpec:
    """Optimizer, schedule and loop settings."""

    lr: float = field(
        default=2e-4,
        metadata=_help(
            "Peak learning rate (AdamW). LoRA typically uses 1e-5–1e-3 (higher than full fine-tuning): 2e-4 is a "
            "safe start, 1e-3 for tiny data and few steps."
        ),
    )
    scheduler: str = field(
        default="cosine",
        metadata=_help(
            "Learning-rate schedule after warmup (transformers' get_scheduler, the curves Trainer uses): cosine down to "
            "10% of lr, linear down to 0, or constant.",
            choices=SCHEDULERS,
        ),
    )
    warmup_steps: int = field(
        default=10,
        metadata=_help(
            "Linear warmup from 0 to lr over this many optimizer steps (as in Trainer, the first step runs at lr 0)."
        ),
    )
    max_steps: int = field(default=0, metadata=_help("Optimizer steps to run; 0 = derive from epochs."))
    epochs: float = field(
        default=1.0, metadata=_help("Passes over the training split when max_steps is 0 (fractions allowed).")
    )
    batch_size: int = field(default=4, metadata=_help("Sequences per micro-batch."))
    grad_accum: int = field(
        default=1,
        metadata=_help(
            "Micro-batches per optimizer step; effective batch = batch_size × grad_accum. Raise this instead of "
            "batch_size when memory is short."
        ),
    )
    max_seq_len: int = field(
        default=512,
        metadata=_help(
            "Examples are truncated to this many tokens. Activation and logits memory grow linearly with it."
        ),
    )
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay on the LoRA weights."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Clip the global gradient norm to this (0 = off)."))
    val_split: float = field(
        default=0.1, metadata=_help("Fraction of examples held out for validation loss, 0–0.5 (0 = no validation).")
    )
    eval_every: int = field(default=20, metadata=_help("Validate every N optimizer steps (and at the end)."))
    save_every: int = field(
        default=50,
        metadata=_help(
            "Write a resumable checkpoint (adapter + optimizer + scheduler + RNG) every N steps (0 = only at the end)."
        ),
    )
    log_every: int = field(default=1, metadata=_help("Record metrics every N optimizer steps."))
    gradient_checkpointing: bool = field(
        default=False,
        metadata=_help(
            "Recompute activations in the backward pass: much less activation memory for ~30% more compute."
        ),
    )
    packing: bool = field(
        default=True,
        metadata=_help(
            "Pack each micro-batch's examples into rows with position ids restarting per example (no padding, no "
            "attention across examples) and compute the output head only where there is a target. Same per-token "
            "losses as padding; checked numerically at start, with a fall-back to padding if a model disagrees."
        ),
    )
    seed: int = field(default=42, metadata=_help("Seed for data order, LoRA init and dropout; same seed = same run."))
    threads: int = field(
        default=0,
        metadata=_help(
            "CPU threads for torch (0 = auto: the cores other processes are not using now, from a short CPU-use "
            "sample and our own running trainings; re-checked during the run and logged); at most this machine's cores."
        ),
    )
    # scale-out (issue 14): data-parallel processes (torchrun) and how they share the model
    devices: str = field(default="auto", metadata=_help(DEVICES_HELP))
    strategy: str = field(default="ddp", metadata=_help(STRATEGY_HELP, choices=STRATEGIES))
    # ---- issue 17: ReLoRA (help texts and rules in engine.core.variants) ----
    relora_every: int = field(default=0, metadata=_help(V.HELP["relora_every"]))
    relora_reset: float = field(default=0.99, metadata=_help(V.HELP["relora_reset"]))
    relora_warmup: int = field(default=10, metadata=_help(V.HELP["relora_warmup"]))
    # ---- early stopping and the best adapter (issue 15) ----
    early_stopping_patience: int = field(
        default=0,
        metadata=_help(
            "Stop after this many validations in a row without the val loss improving by at least "
            "early_stopping_min_delta (0 = off). The adapter of the best validation is kept beside the last "
            "(runs/<id>/best_adapter); the Chat tab offers either, the sweep report names its step. Needs val_split > 0."
        ),
    )
    early_stopping_min_delta: float = field(
        default=0.0,
        metadata=_help("Early stopping: the smallest fall of the val loss that counts as an improvement (≥ 0)."),
    )
    keep_best: bool = field(
        default=False,
        metadata=_help(
            "Keep the adapter of the best validation step (runs/<id>/best_adapter) even without early stopping; "
            "early stopping always keeps it. Needs val_split > 0."
        ),
    )
    # speed and memory (issue 12)
    loss_chunk: int = field(
        default=0,
        metadata=_help("Head positions the loss takes logits of at once (never tokens × vocab); 0 = auto, ≤ 64 MiB"),
    )


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs. Frozen: a run's config never changes after launch."""

    model: str = field(
        default=EMBEDDED_MODEL,
        metadata=_help(
            f"Base model: '{EMBEDDED_MODEL}' (ships with the app, works offline), a Hugging Face hub id "
            "(e.g. HuggingFaceTB/SmolLM2-360M-Instruct), or a local folder with config.json."
        ),
    )
    dataset: str = field(
        default="builtin:persona",
        metadata=_help(
            "Training data: builtin:persona, builtin:chatterbot, a .jsonl/.json/.csv/.parquet/.arrow/.txt file, "
            "a folder of such files, or a Hugging Face dataset as hf:org/name."
        ),
    )
    dataset_format: str = field(
        default="auto",
        metadata=_help(
            "Row format; auto detects messages (OpenAI chat, tool calls), sharegpt, alpaca, prompt_completion or "
            "text from the columns.",
            choices=DATASET_FORMATS,
        ),
    )
    columns: tuple[tuple[str, str], ...] = field(
        default=(),
        metadata=_help(
            "Column mapping for data whose fields have other names: the format's name = the file's name, e.g. "
            "'prompt=question, response=answer' (YAML: columns: {prompt: question, response: answer}). "
            f"Names a format reads: {', '.join(DATASET_COLUMNS)}."
        ),
    )
    dataset_split: str = field(
        default="",
        metadata=_help(
            "Split of a hub dataset or a folder with train/test files ('' = train, or the only split); "
            "for a hub dataset slices such as 'train[:1000]' work too."
        ),
    )
    dataset_subset: str = field(
        default="",
        metadata=_help("Subset (configuration) of a hub dataset, e.g. 'main' for openai/gsm8k ('' = its default)."),
    )
    text_split: str = field(
        default="auto",
        metadata=_help(
            "Plain text (.txt) is cut into documents, joined with EOS and cut into max_seq_len blocks, so every "
            "token is trained on: paragraph (blank lines), line, or file (one document per file); auto = "
            "paragraph when the file has blank lines, else line.",
            choices=TEXT_SPLITS,
        ),
    )
    train_on: str = field(
        default="responses",
        metadata=_help(
            "Compute loss on assistant responses only (default; prompts are masked) or on all tokens.", choices=TRAIN_ON
        ),
    )
    max_examples: int = field(default=0, metadata=_help("Use at most this many examples (0 = all)."))
    quant: str = field(
        default="none",
        metadata=_help(
            "Base weights: none, 8bit (LLM.int8) or 4bit (QLoRA NF4 with double quantization) via bitsandbytes. "
            "LoRA weights stay in full precision.",
            choices=QUANT_MODES,
        ),
    )
    dtype: str = field(
        default="auto",
        metadata=_help(
            "Compute dtype: auto = bf16 where bf16 is fast (a GPU with bf16; a CPU with AVX512-BF16/AMX confirmed by a "
            "cached matmul probe), else fp32 (`engine doctor` says which and why). bf16 keeps the frozen base weights "
            "in bf16 under autocast; LoRA weights and optimizer states stay fp32.",
            choices=DTYPES,
        ),
    )
    trust_remote_code: bool = field(
        default=False, metadata=_help("Allow model code from the hub repo to run. Off unless you trust the repo.")
    )
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    name: str = field(default="", metadata=_help("A label for the run (optional)."))

    def __post_init__(self) -> None:
        problems = validate(self)
        if problems:
            raise ConfigError(problems)

    # ---- (de)serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora"]["targets"] = list(d["lora"]["targets"])
        d["lora"]["layers"] = list(d["lora"]["layers"])
        d["columns"] = dict(self.columns)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        """Build from a (possibly partial) dict; unknown keys and wrong types are reported with the rest."""
        problems: list[str] = []
        top = _coerce_fields(cls, d, "", problems, skip=("lora", "train"))
        lora = _coerce_fields(LoraSpec, _section(d, "lora", problems), "lora.", problems)
        train = _coerce_fields(TrainSpec, _section(d, "train", problems), "train.", problems)
        # Fields with type problems fall back to their defaults so that validate() can still report
        # every value problem of the rest in the same error.
        try:
            cfg = cls(**top, lora=LoraSpec(**lora), train=TrainSpec(**train))
        except ConfigError as e:
            raise ConfigError(problems + e.problems) from None
        if problems:
            raise ConfigError(problems)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> Self:
        """Read a YAML or JSON file (engine.core.config_file: size, encoding, depth and YAML alias limits)."""
        p = Path(path)
        if not p.is_file():
            what = "is a folder, not a YAML or JSON file" if p.is_dir() else "does not exist"
            raise ConfigError([f"config file {str(p)!r} {what}"])
        from engine.core.config_file import read_config_file

        data = read_config_file(p)
        if not isinstance(data, dict):
            raise ConfigError([f"{p}: top level must be a mapping of fields, got {type(data).__name__}"])
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> Self:
        """A copy with some top-level fields (or lora=/train= dicts of sub-fields) changed."""
        d = self.to_dict()
        for k, v in changes.items():
            if k in ("lora", "train") and isinstance(v, Mapping):
                d[k].update(v)
            else:
                d[k] = v
        return type(self).from_dict(d)


# ---- validation ------------------------------------------------------------------------------


class _Problems(list):
    """The problems found so far; need() adds one when a condition does not hold."""

    def need(self, ok: bool, name: str, value: Any, allowed: str) -> None:
        if not ok:
            self.append(f"{name} = {shown(value)}: {allowed}")


def validate(cfg: RunConfig) -> list[str]:
    """Every problem of a config, one line each: field, bad value, what is allowed."""
    p = _Problems()
    lo, tr = cfg.lora, cfg.train
    p.need(bool(cfg.model.strip()), "model", cfg.model, f"give a hub id, a local folder or {EMBEDDED_MODEL!r}")
    if cfg.model.startswith("embedded:"):
        p.need(cfg.model == EMBEDDED_MODEL, "model", cfg.model, f"the one embedded model is {EMBEDDED_MODEL!r}")
    p.need(
        bool(cfg.dataset.strip()), "dataset", cfg.dataset, f"give a file path or one of {', '.join(BUILTIN_DATASETS)}"
    )
    if cfg.dataset.startswith("builtin:"):
        p.need(
            cfg.dataset in BUILTIN_DATASETS, "dataset", cfg.dataset, f"built-in sets are {', '.join(BUILTIN_DATASETS)}"
        )
    p.extend(validate_data(cfg))
    for name, value, choices in (
        ("dataset_format", cfg.dataset_format, DATASET_FORMATS),
        ("text_split", cfg.text_split, TEXT_SPLITS),
        ("train_on", cfg.train_on, TRAIN_ON),
        ("quant", cfg.quant, QUANT_MODES),
        ("dtype", cfg.dtype, DTYPES),
        ("lora.init", lo.init, INITS),
        ("train.scheduler", tr.scheduler, SCHEDULERS),
    ):
        p.need(value in choices, name, value, f"must be one of {', '.join(choices)}")
    p.need(cfg.max_examples >= 0, "max_examples", cfg.max_examples, "must be ≥ 0 (0 = all)")
    if cfg.quant != "none" and cfg.dtype == "fp16":
        p.append("dtype = 'fp16' with quant: use bf16 or fp32 as the compute dtype of quantized layers")
    _validate_lora(cfg, p)
    _validate_train(tr, p)
    p.extend(V.problems(cfg))  # AdaLoRA, VeRA, LoftQ, ReLoRA
    return list(p)


def _validate_lora(cfg: RunConfig, p: _Problems) -> None:
    lo = cfg.lora
    p.need(1 <= lo.r <= 1024, "lora.r", lo.r, "must be an integer 1–1024 (typical 4–64)")
    p.need(math.isfinite(lo.alpha) and lo.alpha > 0, "lora.alpha", lo.alpha, "must be > 0 (heuristic: 2·r)")
    p.need(0.0 <= lo.dropout < 1.0, "lora.dropout", lo.dropout, "must be in [0, 1) (typical 0–0.1)")
    p.need(
        len(lo.targets) > 0,
        "lora.targets",
        list(lo.targets),
        f"give a preset ({', '.join(TARGET_PRESETS)}) or module names like q_proj",
    )
    for t in lo.targets:
        p.need(
            bool(re.fullmatch(r"[A-Za-z0-9_.\-]+", t)),
            "lora.targets",
            t,
            "a target is a preset or a module name of letters, digits, '_', '.', '-'",
        )
    presets = [t for t in lo.targets if t in TARGET_PRESETS]
    if presets and len(lo.targets) > 1 and len(presets) != len(lo.targets):
        p.append(f"lora.targets = {shown(list(lo.targets))}: mix of presets and names; use one preset or only names")
    for i in lo.layers:
        p.need(0 <= i <= MAX_LAYER, "lora.layers", i, f"layer indices are 0–{MAX_LAYER}")
    p.need(
        lo.loraplus_lr_ratio == 0 or (math.isfinite(lo.loraplus_lr_ratio) and lo.loraplus_lr_ratio >= 1),
        "lora.loraplus_lr_ratio",
        lo.loraplus_lr_ratio,
        "0 (off) or ≥ 1 (LoRA+ paper: ~16)",
    )
    if lo.use_dora and cfg.quant == "8bit":
        p.append("lora.use_dora with quant = '8bit': peft's DoRA does not support 8-bit layers; use 4bit or none")
    if lo.init in V.MOVES_BASE and cfg.quant != "none":
        p.append(
            f"lora.init = {shown(lo.init)} with quant = {shown(cfg.quant)}: PiSSA/OLoRA need the full-precision weight "
            "to factorise; use quant none or init gaussian"
        )
    if lo.freeze_A and lo.init != "gaussian":
        p.append(
            f"lora.freeze_A with init = {shown(lo.init)}: LoRA-FA keeps A as a random projection; use init gaussian"
        )


def _validate_train(tr: TrainSpec, p: _Problems) -> None:
    p.need(math.isfinite(tr.lr) and 0 < tr.lr <= 1.0, "train.lr", tr.lr, "must be in (0, 1] (LoRA typical 1e-5–1e-3)")
    p.need(tr.warmup_steps >= 0, "train.warmup_steps", tr.warmup_steps, "must be ≥ 0")
    p.need(tr.max_steps >= 0, "train.max_steps", tr.max_steps, "must be ≥ 0 (0 = use epochs)")
    p.need(
        (math.isfinite(tr.epochs) and tr.epochs > 0) or tr.max_steps > 0,
        "train.epochs",
        tr.epochs,
        "must be > 0 when max_steps is 0",
    )
    p.need(1 <= tr.batch_size <= 4096, "train.batch_size", tr.batch_size, "must be 1–4096")
    p.need(1 <= tr.grad_accum <= 4096, "train.grad_accum", tr.grad_accum, "must be 1–4096")
    p.need(8 <= tr.max_seq_len <= 1_048_576, "train.max_seq_len", tr.max_seq_len, "must be 8–1048576 tokens")
    p.need(tr.weight_decay >= 0, "train.weight_decay", tr.weight_decay, "must be ≥ 0")
    p.need(tr.max_grad_norm >= 0, "train.max_grad_norm", tr.max_grad_norm, "must be ≥ 0 (0 = no clipping)")
    p.need(0 <= tr.val_split <= 0.5, "train.val_split", tr.val_split, "must be in [0, 0.5]")
    p.need(tr.eval_every >= 1, "train.eval_every", tr.eval_every, "must be ≥ 1")
    p.need(tr.save_every >= 0, "train.save_every", tr.save_every, "must be ≥ 0 (0 = only at the end)")
    p.need(tr.log_every >= 1, "train.log_every", tr.log_every, "must be ≥ 1")
    cores = os.cpu_count() or 1
    p.need(tr.loss_chunk >= 0, "train.loss_chunk", tr.loss_chunk, "must be ≥ 0 (0 = auto; try 256–2048)")
    p.need(0 <= tr.threads <= cores, "train.threads", tr.threads, f"must be 0 (auto) to {cores} (this machine's cores)")
    p.need(0 <= tr.seed < 2**32, "train.seed", tr.seed, "must be 0 to 2³²−1")
    p.extend(validate_devices(tr))
    p.need(
        tr.early_stopping_patience >= 0,
        "train.early_stopping_patience",
        tr.early_stopping_patience,
        "must be ≥ 0 (validations without improvement; 0 = off)",
    )
    p.need(
        math.isfinite(tr.early_stopping_min_delta) and tr.early_stopping_min_delta >= 0,
        "train.early_stopping_min_delta",
        tr.early_stopping_min_delta,
        "must be ≥ 0 (the val loss fall that counts as an improvement)",
    )
    if (tr.early_stopping_patience or tr.keep_best) and tr.val_split == 0:
        what = "early_stopping_patience" if tr.early_stopping_patience else "keep_best"
        p.append(f"train.{what} needs a validation loss: set train.val_split > 0 (e.g. 0.1)")


def field_help(section: str | None = None) -> dict[str, dict[str, Any]]:
    """name → {'default', 'help', 'choices'?} for the UI's info= texts and the README table."""
    cls = {None: RunConfig, "lora": LoraSpec, "train": TrainSpec}[section]
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in ("lora", "train"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out[f.name] = {"default": default, **dict(f.metadata)}
    return out
