"""LoftQ initialisation on a 4-bit base (CPU bitsandbytes): s·B·A starts as the best rank-r approximation of
the NF4 quantization error, the run counts what peft counts, the loss falls, and the adapter loads with plain peft."""

import pytest
import torch

from engine.core.events import ListSink
from engine.ml.train import train
from tests.test_variants import cfg_for, fresh
from tests.tiny import build_tiny_llama


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):  # 64-wide: every weight splits into whole 4-bit blocks of 64
    return build_tiny_llama(tmp_path_factory.mktemp("llama64-loftq"), hidden_size=64, intermediate_size=128)


def loftq_cfg(model_dir, data, **train):
    return cfg_for(model_dir, data, {"init": "loftq", "alpha": 16}, {"quant": "4bit", "dtype": "fp32"}, **train)


def test_loftq_starts_at_the_low_rank_part_of_the_quantization_error(llama64, chat_jsonl):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from engine.ml import model as M

    cfg = loftq_cfg(llama64, chat_jsonl)
    model = M.attach_lora(M.load_base_model(str(llama64), cfg, torch.device("cpu")), cfg, model_name="tiny")
    original = {n: p.detach() for n, p in fresh(llama64).named_parameters()}
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    layers = {n: m for n, m in layers.items() if "default" in m.lora_A}
    assert len(layers) == 4
    for name, m in layers.items():
        W = original[name + ".weight"]
        q = m.get_base_layer().weight
        error = W - bnb.functional.dequantize_4bit(q.data, q.quant_state)
        delta = m.get_delta_weight("default").detach()  # s·B·A with s = 16/4
        sigma = torch.linalg.svdvals(error)
        best = float(sigma[4:].pow(2).sum().sqrt())  # Eckart–Young: the rank-4 residual
        assert float((error - delta).norm()) == pytest.approx(best, rel=1e-3), name
        assert float((error - delta).norm()) < float(error.norm())
    reference = get_peft_model(
        M.load_base_model(str(llama64), cfg, torch.device("cpu")),
        LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    assert M.count_params(model) == reference.get_nb_trainable_parameters()


def test_loftq_run_trains_and_its_adapter_loads_with_plain_peft(llama64, chat_jsonl, tmp_path):
    from peft import PeftModel

    from engine.ml import model as M

    cfg = loftq_cfg(llama64, chat_jsonl, max_steps=10)
    sink = ListSink()
    res = train(cfg, tmp_path / "out", sink, home=tmp_path / "home")
    losses = [v for _, v in sink.series("train/loss")]
    assert res.steps_done == 10 and sum(losses[-3:]) < sum(losses[:3]), losses
    base = M.load_base_model(str(llama64), cfg, torch.device("cpu"), for_training=False)
    loaded = PeftModel.from_pretrained(base, res.adapter_dir)
    assert loaded.peft_config["default"].r == 4 and loaded.get_nb_trainable_parameters()[1] == res.total_params
