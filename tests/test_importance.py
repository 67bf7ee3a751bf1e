"""LoRA-drop's output importance (engine importance): it measures ‖ΔW x‖² on the data, module by module."""

import json

import pytest
import torch

from engine.cli import main
from engine.core import importance as I


@pytest.fixture(scope="module")
def half_adapter(tiny_llama_dir, tmp_path_factory):
    """A plain peft LoRA on q/v of the tiny Llama: B random in layer 0, B = 0 (peft's init) in layer 1."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layers.0." in name and "lora_B" in name:
                p.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("half") / "adapter"
    model.save_pretrained(str(folder))
    return folder


def test_importance_is_zero_where_B_is_zero_and_equals_a_direct_computation(
    half_adapter, tiny_llama_dir, chat_jsonl, tmp_path, capsys
):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from engine.core.config import RunConfig
    from engine.ml import data as D
    from engine.ml import model as M
    from engine.ml.importance import sample

    home = tmp_path / "home"
    args = ["--home", str(home), "importance", str(half_adapter), "--dataset", str(chat_jsonl), "--examples", "6"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    modules = report["modules"]
    assert sorted(modules) == sorted(f"model.layers.{i}.self_attn.{m}_proj" for i in (0, 1) for m in "qv")
    assert all(modules[f"model.layers.1.self_attn.{m}_proj"] == 0.0 for m in "qv")
    assert all(modules[f"model.layers.0.self_attn.{m}_proj"] > 0 for m in "qv")
    assert report["layers"] == {"0": 1.0, "1": 0.0} and report["keep"]["layers"] == [0]
    assert report["examples"] == 6 and report["cached"] is False

    # Direct: hooks on the plain base's layer-0 q_proj (its input does not depend on the adapter) and
    # ΔW = (α/r)·B·A from the saved file; mean over the sample's tokens of ‖ΔW x‖².
    weights = load_file(str(half_adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    dW = 2.0 * weights[f"{key}.lora_B.weight"] @ weights[f"{key}.lora_A.weight"]
    cfg = RunConfig.from_dict({"model": str(tiny_llama_dir), "dataset": str(chat_jsonl)})
    tok = M.load_tokenizer(str(tiny_llama_dir))
    examples = sample(D.prepare(cfg, tok), 6)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    seen = []
    base.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    batch = D.collate(examples, tok.pad_token_id)
    with torch.no_grad():
        base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    mask = batch["attention_mask"].bool()
    direct = (seen[0][mask] @ dW.T).pow(2).sum(-1).mean()
    assert modules["model.layers.0.self_attn.q_proj"] == pytest.approx(float(direct), rel=1e-4)
    assert report["tokens"] == int(mask.sum())

    # the same sample again comes from the cache; the table names the layers to keep
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "(cached)" in out and "importance: [0]" in out


def test_keep_layers_takes_the_fewest_layers_that_carry_the_share():
    modules = {"model.layers.0.q": 1.0, "model.layers.1.q": 6.0, "model.layers.2.q": 3.0, "lm_head": 50.0}
    assert I.layer_shares(modules) == {0: 0.1, 1: 0.6, 2: 0.3}
    assert I.keep_layers(modules, 0.9) == [1, 2] and I.keep_layers(modules, 0.5) == [1]
    assert I.keep_layers(modules, 1.0) == [0, 1, 2]
    with pytest.raises(ValueError, match="fraction = 0"):
        I.keep_layers(modules, 0)
