"""GGUF export on tiny models: merged GGUFs load back with transformers and give the merged model's logits;
adapter GGUFs hold what llama.cpp's loader accepts and reproduce the merged weights; refusals say why.

The tiny models use a byte-level BPE tokenizer trained in the test (tests.tiny.make_bpe_tokenizer): GGUF
can hold that kind of vocabulary; the word-level tokenizer of the other tests is refused for merged export.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from tests.tiny import build_tiny_llama, build_tiny_qwen2, make_bpe_tokenizer

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXT = "what is the capital of france ? arr matey the capital of france is paris !"
# max |logit difference| / max |logit| allowed per type (measured on these models: f16 6e-4, bf16 5e-3, q8_0 2e-2)
REL_TOL = {"f32": 1e-6, "f16": 2e-3, "bf16": 2e-2, "q8_0": 5e-2}


def make_adapter(base: Path, out: Path, seed: int = 1, **lora) -> Path:
    """A PEFT adapter with random (non-zero) B, saved like a trained one, with its base recorded."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ALL, **lora}
    pm = get_peft_model(model, LoraConfig(**cfg))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    pm.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bpe_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama with grouped-query attention (4 heads, 2 KV heads) and a byte-level BPE tokenizer."""
    return build_tiny_llama(tmp_path_factory.mktemp("bpe-llama"), tok=make_bpe_tokenizer())


@pytest.fixture(scope="module")
def bpe_adapter(bpe_llama, tmp_path_factory) -> Path:
    return make_adapter(bpe_llama, tmp_path_factory.mktemp("lora") / "adapter")


def merged_hf(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).merge_and_unload().eval()


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0"])
def test_merged_gguf_loads_back_with_the_merged_models_logits(bpe_llama, bpe_adapter, tmp_path, kind):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.ml.gguf_export import export_merged_gguf

    out = tmp_path / "pirate.gguf"
    lines = export_merged_gguf(str(bpe_llama), bpe_adapter, out, kind, home=tmp_path / "home", title="pirate")
    assert lines[-1].startswith(f"merged GGUF ({kind}; byte-level BPE, pre-tokenizer gpt-2): {out}")

    r = gguf.GGUFReader(out)
    assert field(r, "general.architecture") == "llama" and field(r, "general.type") == "model"
    assert field(r, "general.file_type") == {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[kind]
    assert (field(r, "llama.attention.head_count"), field(r, "llama.attention.head_count_kv")) == (4, 2)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert types["blk.1.attn_k.weight"] == kind.upper() and "output.weight" in types  # not tied

    tok = make_bpe_tokenizer()
    merged = merged_hf(bpe_llama, bpe_adapter)
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    with torch.no_grad():
        want = merged(ids).logits
        base = AutoModelForCausalLM.from_pretrained(bpe_llama).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name).eval()(ids).logits
    assert (want - base).abs().max() > 0.1  # the adapter changes the model ...
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel <= REL_TOL[kind], rel  # ... and the GGUF is that changed model

    gtok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    for text in (TEXT, "ahoy matey!  two\nlines, 12 + 345 = 357"):
        assert gtok(text)["input_ids"] == tok(text)["input_ids"]
    assert gtok.chat_template == tok.chat_template and gtok.eos_token == "</s>"


def test_modelfile_template_renders_like_the_chat_template(bpe_llama, bpe_adapter, tmp_path):
    from engine.ml.gguf_export import export_merged_gguf
    from engine.ml.gguf_export.ollama import verified_shape

    out = tmp_path / "pirate.gguf"
    export_merged_gguf(str(bpe_llama), bpe_adapter, out, "q8_0", home=tmp_path / "home")
    text = (tmp_path / "pirate.Modelfile").read_text()
    assert "FROM ./pirate.gguf\n" in text and 'PARAMETER stop "</s>"' in text and "SYSTEM" not in text
    assert 'TEMPLATE """{{ range $i, $_ := .Messages }}' in text
    assert '{{ else if eq .Role "user" }}user : {{ .Content }} ' in text
    assert '{{ else if eq .Role "assistant" }}assistant : {{ .Content }} </s> ' in text

    tok = make_bpe_tokenizer()
    shape = verified_shape(lambda m, g: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g))
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ahoy"},
        {"role": "user", "content": "?"},
    ]
    assert shape.render(msgs) == "user : hi assistant : ahoy </s> user : ? assistant : "


def test_chatml_template_with_a_default_system_prompt_becomes_template_and_system():
    """SmolLM2's template (ChatML that inserts a default system message) as Ollama TEMPLATE + SYSTEM."""
    from engine.ml.gguf_export.ollama import verified_shape

    tok = make_bpe_tokenizer()
    tok.chat_template = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    shape = verified_shape(lambda m, g: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g))
    assert shape.default_system == "You are a helpful AI assistant named SmolLM"
    assert shape.wrap["user"] == ("<|im_start|>user\n", "<|im_end|>\n")
    assert shape.generation == "<|im_start|>assistant\n"
    # a template that refuses a system turn has no per-role shape: no TEMPLATE rather than a wrong one
    tok.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}x"
    assert verified_shape(lambda m, g: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g)) is None


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "qwen2", "llama-bpe"])
def test_byte_level_pre_tokenizers_are_named_as_llama_cpp_names_them(tmp_path, pre):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.ml.gguf_export.merged import write_model_gguf

    tok = make_bpe_tokenizer(pre)
    model = AutoModelForCausalLM.from_pretrained(build_tiny_llama(tmp_path / "m", tok=tok))
    out = tmp_path / "m.gguf"
    assert write_model_gguf(model, tok, out, "f16", name="m", progress=lambda s: None).endswith(pre)
    r = gguf.GGUFReader(out)
    assert field(r, "tokenizer.ggml.pre") == pre and field(r, "tokenizer.ggml.model") == "gpt2"
    assert len(field(r, "tokenizer.ggml.tokens")) == len(tok) and len(field(r, "tokenizer.ggml.merges")) > 50
    assert field(r, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field(r, "tokenizer.ggml.add_bos_token") is False
    # transformers rebuilds the same tokenizer from the file (it has no Digits step for smollm: no digits here)
    gtok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    assert gtok(TEXT)["input_ids"] == tok(TEXT)["input_ids"]


def test_tokenizers_gguf_cannot_hold_are_refused_and_nothing_is_written(tiny_llama_dir, tmp_path):
    from engine.core.export import ExportError
    from engine.ml.gguf_export import export_adapter_gguf, export_merged_gguf

    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")  # the tests' word-level tokenizer
    with pytest.raises(ExportError, match="WordLevel vocabulary; GGUF export writes byte-level BPE"):
        export_merged_gguf(str(tiny_llama_dir), adapter, tmp_path / "m.gguf", home=tmp_path / "home")
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "m.Modelfile").exists()
    # the adapter GGUF needs no vocabulary: it works for the same run
    export_adapter_gguf(str(tiny_llama_dir), adapter, tmp_path / "a.gguf", home=tmp_path / "home")
    assert field(gguf.GGUFReader(tmp_path / "a.gguf"), "adapter.type") == "lora"


def base_gguf(base: Path, out: Path) -> gguf.GGUFReader:
    """The base model itself as an f32 GGUF (what the adapter is applied to in llama.cpp)."""
    from transformers import AutoModelForCausalLM

    from engine.ml.gguf_export.merged import write_model_gguf

    model = AutoModelForCausalLM.from_pretrained(base)
    write_model_gguf(model, make_bpe_tokenizer(), out, "f32", name="base", progress=lambda s: None)
    return gguf.GGUFReader(out)


def check_adapter_file(adapter_gguf: Path, base: gguf.GGUFReader, merged, expect_pairs: int) -> float:
    """The adapter GGUF against llama.cpp's loader rules and the merged HF weights; returns the alpha."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    r = gguf.GGUFReader(adapter_gguf)
    assert field(r, "general.type") == "adapter" and field(r, "adapter.type") == "lora"
    assert field(r, "general.architecture") == field(base, "general.architecture")
    alpha = float(field(r, "adapter.lora.alpha"))
    t = {x.name: x for x in r.tensors}
    names = {n.rsplit(".", 1)[0] for n in t}
    assert all(n.endswith((".lora_a", ".lora_b")) for n in t) and len(t) == 2 * len(names) == 2 * expect_pairs
    base_t = {x.name: x for x in base.tensors}
    cfg = merged.config
    heads = {"num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads}
    unpermute = LlamaTensorProcessor(config=heads)
    hf = dict(merged.named_parameters())
    for name in names:
        a, b, w = t[f"{name}.lora_a"], t[f"{name}.lora_b"], base_t[name]  # KeyError: not a base tensor
        # llama-adapter.cpp: model ne[0] == a ne[0], model ne[1] == b ne[1], a ne[1] == b ne[0]
        assert w.shape[0] == a.shape[0] and w.shape[1] == b.shape[1] and a.shape[1] == b.shape[0]
        A, B = np.asarray(a.data, np.float32), np.asarray(b.data, np.float32)
        W = gguf.quants.dequantize(w.data, w.tensor_type).reshape(B.shape[0], A.shape[1])
        applied = W + (alpha / A.shape[0]) * B @ A  # what llama.cpp computes, from the GGUF tensors
        hf_name = next(k for k in hf if k.endswith(_hf_suffix(name)) and f"layers.{name.split('.')[1]}." in k)
        if field(base, "general.architecture") == "llama":  # transformers' reverse permutation, independent of ours
            applied = unpermute.process(applied, name).weights
        np.testing.assert_allclose(applied, hf[hf_name].detach().numpy(), atol=2e-5, rtol=0)
    return alpha


def _hf_suffix(gguf_name: str) -> str:
    part = gguf_name.split(".")[2]
    return {
        "attn_q": "q_proj.weight",
        "attn_k": "k_proj.weight",
        "attn_v": "v_proj.weight",
        "attn_output": "o_proj.weight",
        "ffn_gate": "gate_proj.weight",
        "ffn_up": "up_proj.weight",
        "ffn_down": "down_proj.weight",
    }[part]


@pytest.mark.parametrize(
    "lora,alpha",
    [
        ({}, 8.0),  # plain LoRA: alpha as it is
        ({"use_rslora": True}, 8.0 * 2.0),  # rsLoRA: scaling α/√r → alpha α·√r (r = 4)
        ({"rank_pattern": {"down_proj": 2}}, 8.0),  # mixed ranks, one alpha: llama.cpp reads r per tensor
    ],
)
def test_adapter_gguf_reproduces_the_merged_weights(bpe_llama, tmp_path, lora, alpha):
    from engine.ml.gguf_export import export_adapter_gguf

    adapter = make_adapter(bpe_llama, tmp_path / "adapter", **lora)
    base = base_gguf(bpe_llama, tmp_path / "base.gguf")
    out = tmp_path / "lora.gguf"
    lines = export_adapter_gguf(str(bpe_llama), adapter, out, home=tmp_path / "home", gguf_base=tmp_path / "base.gguf")
    assert "14 LoRA pairs" in lines[-1] and "checked against base.gguf" in lines[-1]
    assert check_adapter_file(out, base, merged_hf(bpe_llama, adapter), expect_pairs=14) == pytest.approx(alpha)
    modelfile = (tmp_path / "lora.Modelfile").read_text()
    assert f"FROM {(tmp_path / 'base.gguf').resolve()}\nADAPTER ./lora.gguf\n" in modelfile


def test_qwen2_has_no_permutation_and_round_trips(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from engine.ml.gguf_export import export_adapter_gguf, export_merged_gguf

    tok = make_bpe_tokenizer("qwen2")
    model_dir = build_tiny_qwen2(tmp_path / "qwen2", tok=tok)
    adapter = make_adapter(model_dir, tmp_path / "adapter", target_modules=["q_proj", "k_proj", "v_proj"])
    base = base_gguf(model_dir, tmp_path / "base.gguf")
    assert field(base, "general.architecture") == "qwen2" and "blk.0.attn_q.bias" in {t.name for t in base.tensors}
    export_adapter_gguf(
        str(model_dir), adapter, tmp_path / "a.gguf", home=tmp_path / "h", gguf_base=tmp_path / "base.gguf"
    )
    merged = merged_hf(model_dir, adapter)
    check_adapter_file(tmp_path / "a.gguf", base, merged, expect_pairs=6)
    export_merged_gguf(str(model_dir), adapter, tmp_path / "m.gguf", "f32", home=tmp_path / "h")
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()(ids).logits
        torch.testing.assert_close(got, merged(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "lora,message",
    [
        ({"use_dora": True}, "DoRA"),
        ({"alpha_pattern": {"down_proj": 32}}, "one alpha per file"),
        ({"use_rslora": True, "rank_pattern": {"down_proj": 2}}, "rsLoRA with mixed ranks"),
        ({"modules_to_save": ["lm_head"]}, "fully trained modules"),
    ],
)
def test_what_a_gguf_adapter_cannot_hold_is_refused(bpe_llama, tmp_path, lora, message):
    from engine.core.export import ExportError
    from engine.ml.gguf_export import export_adapter_gguf

    adapter = make_adapter(bpe_llama, tmp_path / "adapter", **lora)
    with pytest.raises(ExportError, match=message) as e:
        export_adapter_gguf(str(bpe_llama), adapter, tmp_path / "a.gguf", home=tmp_path / "home")
    assert "--gguf OUT.gguf instead" in str(e.value)  # ... and what to use instead
    assert not (tmp_path / "a.gguf").exists()


def test_unverified_architectures_and_quantized_bases_are_refused(tiny_gpt2_dir, bpe_llama, tmp_path):
    import shutil

    from engine.core.export import ExportError
    from engine.ml.gguf_export import export_adapter_gguf, export_merged_gguf

    adapter = make_adapter(tiny_gpt2_dir, tmp_path / "gpt2-lora", target_modules=["c_attn"])
    for export in (export_adapter_gguf, export_merged_gguf):
        with pytest.raises(ExportError, match=r"verified for llama .* and qwen2 .*; this model is 'gpt2'.*convert_hf"):
            export(str(tiny_gpt2_dir), adapter, tmp_path / "x.gguf", home=tmp_path / "home")

    quantized = shutil.copytree(bpe_llama, tmp_path / "quantized")
    cfg = json.loads((quantized / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(cfg))
    adapter = make_adapter(bpe_llama, tmp_path / "adapter")
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**acfg, "base_model_name_or_path": str(quantized)}))
    with pytest.raises(ExportError, match=r"stored quantized \(bitsandbytes\).*--gguf-adapter"):
        export_merged_gguf(str(quantized), adapter, tmp_path / "q.gguf", home=tmp_path / "home")

    rope = shutil.copytree(bpe_llama, tmp_path / "rope")
    cfg = json.loads((rope / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    (rope / "config.json").write_text(json.dumps(cfg))
    adapter = make_adapter(rope, tmp_path / "rope-lora")
    for export in (export_adapter_gguf, export_merged_gguf):
        with pytest.raises(ExportError, match="rope scaling 'llama3'"):
            export(str(rope), adapter, tmp_path / "r.gguf", home=tmp_path / "home")


@pytest.mark.parametrize("lora", [{"use_dora": True}, {"alpha_pattern": {"down_proj": 32}}])
def test_what_the_adapter_file_refuses_merges_exactly_into_a_merged_gguf(bpe_llama, tmp_path, lora):
    """The refusals above point here: DoRA and per-module alphas fold into the merged weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.ml.gguf_export import export_merged_gguf

    adapter = make_adapter(bpe_llama, tmp_path / "adapter", **lora)
    export_merged_gguf(str(bpe_llama), adapter, tmp_path / "m.gguf", "f32", home=tmp_path / "home")
    ids = torch.tensor([make_bpe_tokenizer()(TEXT)["input_ids"]])
    with torch.no_grad():
        want = merged_hf(bpe_llama, adapter)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_an_adapter_is_checked_against_the_base_gguf_it_will_run_on(bpe_llama, bpe_adapter, tmp_path):
    from engine.core.export import ExportError
    from engine.ml.gguf_export import export_adapter_gguf

    wider = build_tiny_llama(tmp_path / "wider", tok=make_bpe_tokenizer(), intermediate_size=128)
    base_gguf(wider, tmp_path / "wider.gguf")
    with pytest.raises(ExportError, match=r"blk.0.ffn_down.weight: base shape \(ne\) \(128, 32\) does not take"):
        export_adapter_gguf(
            str(bpe_llama), bpe_adapter, tmp_path / "a.gguf", home=tmp_path / "h", gguf_base=tmp_path / "wider.gguf"
        )
    qwen = build_tiny_qwen2(tmp_path / "qwen", tok=make_bpe_tokenizer("qwen2"))
    base_gguf(qwen, tmp_path / "qwen.gguf")
    with pytest.raises(ExportError, match="the base GGUF is 'qwen2' but the adapter's base model is 'llama'"):
        export_adapter_gguf(
            str(bpe_llama), bpe_adapter, tmp_path / "a.gguf", home=tmp_path / "h", gguf_base=tmp_path / "qwen.gguf"
        )
    assert not (tmp_path / "a.gguf").exists()
