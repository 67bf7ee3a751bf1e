"""GGUF export against the embedded SmolLM2-135M-Instruct, whose own GGUF file is the reference: adapter
tensors named and shaped as llama.cpp's loader requires for that file, applying them to its dequantised Q4_1
weights gives the merged weights, and the merged GGUF answers like the merged model."""

from __future__ import annotations

import copy
from pathlib import Path

import gguf
import numpy as np
import pytest

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HF_OF = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@pytest.fixture(scope="module")
def embedded():
    """(path, reader) of the embedded GGUF; parsing its 49k-token header takes 7-18 s on 2 cores."""
    from engine.ml.model import embedded_gguf_path

    path = embedded_gguf_path()
    return path, gguf.GGUFReader(path)


def smollm2_config(r: gguf.GGUFReader, layers: int):
    from transformers import LlamaConfig

    f = lambda k: r.fields[f"llama.{k}"].contents()
    return LlamaConfig(
        vocab_size=f("vocab_size"),
        hidden_size=f("embedding_length"),
        intermediate_size=f("feed_forward_length"),
        num_hidden_layers=layers,
        num_attention_heads=f("attention.head_count"),
        num_key_value_heads=f("attention.head_count_kv"),
        rms_norm_eps=f("attention.layer_norm_rms_epsilon"),
        rope_theta=f("rope.freq_base"),
        max_position_embeddings=f("context_length"),
        tie_word_embeddings=True,
    )


def hf_weight(r_tensor, unpermute) -> np.ndarray:
    """A base weight as transformers loads it from the GGUF: dequantised, Q/K rows un-permuted."""
    w = gguf.quants.dequantize(r_tensor.data, r_tensor.tensor_type)
    return unpermute.process(w, r_tensor.name).weights


def random_adapter(model, out: Path, scale: float = 0.02) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, use_rslora=True))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)
    pm.save_pretrained(out)
    return out


def test_adapter_gguf_fits_the_embedded_gguf_and_reproduces_the_merged_weights(embedded, tmp_path):
    """A 2-layer SmolLM2-shaped model holding the embedded file's first two layers, with an rsLoRA adapter."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from engine.ml.gguf_export.adapter import write_adapter_gguf

    path, ref = embedded
    config = smollm2_config(ref, layers=2)
    unpermute = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    model = LlamaForCausalLM(config)
    ref_t = {t.name: t for t in ref.tensors}
    with torch.no_grad():
        for layer in range(2):
            for short, hf in HF_OF.items():
                w = hf_weight(ref_t[f"blk.{layer}.{short}.weight"], unpermute)
                model.get_submodule(f"model.layers.{layer}.{hf}").weight.copy_(torch.from_numpy(w))
    adapter = random_adapter(copy.deepcopy(model), tmp_path / "adapter")  # peft injects into what it is given
    out = tmp_path / "lora.gguf"
    info = write_adapter_gguf(adapter, config, out, name="t", reference=ref, progress=lambda s: None)
    assert info == {"alpha": pytest.approx(16 * 8**0.5), "modules": 14, "ranks": [8], "architecture": "llama"}

    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    r = gguf.GGUFReader(out)
    assert r.fields["general.type"].contents() == "adapter" and r.fields["adapter.type"].contents() == "lora"
    assert r.fields["general.architecture"].contents() == ref.fields["general.architecture"].contents()
    alpha = r.fields["adapter.lora.alpha"].contents()
    got = {t.name: t for t in r.tensors}
    assert len(got) == 28
    for name in {n.rsplit(".", 1)[0] for n in got}:
        a, b, w = got[f"{name}.lora_a"], got[f"{name}.lora_b"], ref_t[name]  # the name exists in the base file
        assert w.shape[0] == a.shape[0] and w.shape[1] == b.shape[1] and a.shape[1] == b.shape[0]  # llama-adapter.cpp
        A, B = np.asarray(a.data), np.asarray(b.data)
        W = gguf.quants.dequantize(w.data, w.tensor_type)  # the Q4_1 weights llama.cpp runs
        applied = unpermute.process(W + (alpha / A.shape[0]) * B @ A, name).weights
        layer, short = name.split(".")[1:3]
        want = merged.get_submodule(f"model.layers.{layer}.{HF_OF[short]}").weight.detach().numpy()
        np.testing.assert_allclose(applied, want, atol=1e-5, rtol=0)


@pytest.mark.slow  # converts the embedded model once (~20 s), merges, writes, reads back and generates twice
def test_merged_gguf_of_the_embedded_model_gives_the_same_greedy_reply(embedded, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from engine.core.config import EMBEDDED_MODEL
    from engine.ml.gguf_export import export_adapter_gguf, export_merged_gguf
    from engine.ml.model import ensure_embedded, load_tokenizer

    path, ref = embedded
    home = tmp_path / "home"
    folder = ensure_embedded(home)
    tok = load_tokenizer(str(folder))
    adapter = random_adapter(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "adapter", scale=0.01)

    out = tmp_path / "pirate.gguf"
    lines = export_merged_gguf(EMBEDDED_MODEL, adapter, out, "f16", home=home)
    assert lines[-1].startswith(f"merged GGUF (f16; vocabulary copied from the base GGUF): {out}")
    r = gguf.GGUFReader(out)
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.model", "tokenizer.ggml.eos_token_id"):
        assert r.fields[key].contents() == ref.fields[key].contents()
    assert r.fields["tokenizer.ggml.pre"].contents() == "smollm" and "output.weight" not in {t.name for t in r.tensors}
    text = (tmp_path / "pirate.Modelfile").read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text

    lora = tmp_path / "pirate-lora.gguf"
    export_adapter_gguf(EMBEDDED_MODEL, adapter, lora, home=home)  # checked against the embedded GGUF
    assert f"FROM {path.resolve()}\nADAPTER ./pirate-lora.gguf" in (tmp_path / "pirate-lora.Modelfile").read_text()

    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                     add_generation_prompt=True)  # fmt: skip
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    greedy = {"max_new_tokens": 24, "do_sample": False}
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(folder).eval()
        plain_logits = plain(ids).logits
        merged = PeftModel.from_pretrained(plain, str(adapter)).merge_and_unload().eval()
        assert (merged(ids).logits - plain_logits).abs().max() > 1e-2  # the adapter changes the model
        want = merged.generate(ids, **greedy)[0, ids.shape[1] :]
        back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name).eval()
        got = back.generate(ids, **greedy)[0, ids.shape[1] :]
    assert tok.decode(got) == tok.decode(want), (tok.decode(got), tok.decode(want))
