"""AdaLoRA and VeRA through peft's own configs: trainable counts equal peft's (run and estimator), AdaLoRA's final
ranks fill its target budget, training lowers the loss, saved adapters load with plain peft, and the spectra
equal an SVD of the ΔW peft forms."""

import pytest
import torch

from engine.core.config import RunConfig
from engine.core.estimate import estimate
from engine.core.events import ListSink
from engine.ml.train import train

QV = ["q_proj", "v_proj"]


def cfg_for(model_dir, data, lora, top=None, **train):
    t = {
        "lr": 1e-2,
        "max_steps": 8,
        "batch_size": 4,
        "warmup_steps": 0,
        "eval_every": 100,
        "save_every": 0,
        "scheduler": "constant",
        "val_split": 0.0,
        "seed": 3,
        **train,
    }
    lo = {"r": 4, "alpha": 8, "dropout": 0.0, "targets": "qv", **lora}
    return RunConfig.from_dict({"model": str(model_dir), "dataset": str(data), "lora": lo, "train": t, **(top or {})})


def fresh(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


def assert_spectra_are_svds_of_peft_delta(adapter_dir, model_dir, shapes=None):
    """σ from the saved folder (no base weights) == svdvals of get_delta_weight after a plain peft load."""
    from peft import PeftModel

    from engine.ml.spectra import adapter_spectra

    loaded = PeftModel.from_pretrained(fresh(model_dir), str(adapter_dir))
    spectra = adapter_spectra(adapter_dir, shapes=shapes)
    assert len(spectra) == 4
    for name, sp in spectra.items():
        sv = torch.linalg.svdvals(loaded.get_submodule("base_model.model." + name).get_delta_weight("default"))
        k = len(sp.sigma)
        assert sp.sigma == pytest.approx(sv[:k].tolist(), rel=1e-4, abs=1e-6), name
        assert float(sv[k:].abs().sum()) < 1e-5 * max(1.0, float(sv[0]))
    return loaded, spectra


def losses_fall(sink):
    losses = [v for _, v in sink.series("train/loss")]
    return sum(losses[-3:]) < sum(losses[:3])


@pytest.mark.filterwarnings("ignore:The following rank_pattern keys")  # peft 0.21 checks AdaLoRA masks as patterns
def test_adalora_counts_budget_and_spectra(tiny_llama_dir, chat_jsonl, tmp_path, anatomy_of):
    from peft import AdaLoraConfig, get_peft_model

    lora = {"method": "adalora", "adalora_target_r": 2, "adalora_tinit": 1, "adalora_tfinal": 2}
    cfg = cfg_for(tiny_llama_dir, chat_jsonl, lora)
    sink = ListSink()
    res = train(cfg, tmp_path / "out", sink, home=tmp_path / "home")
    peft_cfg = AdaLoraConfig(
        init_r=4, target_r=2, tinit=1, tfinal=2, total_step=8, lora_alpha=8, target_modules=QV, task_type="CAUSAL_LM"
    )
    trainable, total = get_peft_model(fresh(tiny_llama_dir), peft_cfg).get_nb_trainable_parameters()
    assert (res.trainable_params, res.total_params) == (trainable, total)
    est = estimate(anatomy_of(tiny_llama_dir), cfg, "cpu")
    assert (est.trainable_params, est.total_params) == (trainable, total)

    ada = res.extra["adalora"]
    assert ada["budget_start"] == 16 and ada["budget_target"] == 8 and len(ada["final_ranks"]) == 4
    assert sum(ada["final_ranks"].values()) == ada["rank_total"] == 8
    budget = sink.series("adalora/budget")
    assert budget[0] == (0, 16.0) and budget[-1][1] == 8.0 and sink.series("adalora/rank_total")[-1][1] == 8.0
    _, spectra = assert_spectra_are_svds_of_peft_delta(res.adapter_dir, tiny_llama_dir)
    for name, r in ada["final_ranks"].items():  # pruned singular values are exactly 0
        assert sum(s > 0 for s in spectra[name].sigma) == r
    step, logged = sink.spectra[-1]  # the run's own last spectra (from the live model) agree
    assert step == 8 and sorted(logged) == sorted(spectra)
    for name, sp in spectra.items():
        assert logged[name][: len(sp.sigma)] == pytest.approx(sp.sigma, rel=1e-4, abs=1e-6)


def test_vera_counts_training_and_spectra(tiny_llama_dir, chat_jsonl, tmp_path, anatomy_of):
    from peft import VeraConfig, get_peft_model

    cfg = cfg_for(tiny_llama_dir, chat_jsonl, {"method": "vera", "r": 16}, lr=5e-2)
    sink = ListSink()
    res = train(cfg, tmp_path / "out", sink, home=tmp_path / "home")
    peft_cfg = VeraConfig(r=16, target_modules=QV, projection_prng_key=3, save_projection=True, task_type="CAUSAL_LM")
    trainable, total = get_peft_model(fresh(tiny_llama_dir), peft_cfg).get_nb_trainable_parameters()
    assert (res.trainable_params, res.total_params) == (trainable, total)
    est = estimate(anatomy_of(tiny_llama_dir), cfg, "cpu")
    assert (est.trainable_params, est.total_params) == (trainable, total)
    assert losses_fall(sink)
    modules = anatomy_of(tiny_llama_dir)["modules"]
    shapes = {m["name"]: (m["in"], m["out"]) for m in modules}
    assert_spectra_are_svds_of_peft_delta(res.adapter_dir, tiny_llama_dir, shapes)


def test_impossible_variant_combinations_are_refused_one_line_each():
    from engine.core.config import ConfigError

    def problems(**d):
        with pytest.raises(ConfigError) as e:
            RunConfig.from_dict({"model": "m", "dataset": "d.jsonl", **d})
        return e.value.problems

    assert problems(lora={"method": "adalora", "use_dora": True}) == [
        "lora.use_dora with lora.method = 'adalora': AdaLoRA has its own parametrisation; turn one off"
    ]
    assert (
        "lora.adalora_target_r = 9: must be 1 to lora.r = 8"
        in problems(lora={"method": "adalora", "adalora_target_r": 9})[0]
    )
    assert problems(lora={"init": "loftq"})[0].startswith("lora.init = 'loftq' with quant = 'none'")
    assert problems(quant="4bit", train={"relora_every": 20})[0].startswith("train.relora_every with quant = '4bit'")
    assert problems(lora={"method": "dora"})[0].startswith("lora.method = 'dora': must be one of lora, adalora, vera")
