"""ReLoRA (engine.ml.relora): merges accumulate into the base, the cumulative ΔW's rank grows past r, the saved
adapter is that cumulative ΔW for the ORIGINAL base, and restarts reset A, B, their optimizer moments and the lr."""

import pytest
import torch
from safetensors.torch import load_file

from engine.core.events import ListSink
from engine.ml import hooks as H
from engine.ml.relora import jagged, prune_moments_
from engine.ml.train import train
from tests.test_variants import cfg_for, fresh

IDS = torch.tensor([[1, 5, 9, 14, 22, 31, 7, 3]])


class Keep(H.TrainHook):
    """Runs after ReLoRA's hook: keeps the live model's base weights, its logits and its LoRA at the end."""

    def on_end(self, state):
        model = state.model
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=IDS).logits
        self.layers = {
            n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "get_delta_weight")
        }
        self.base = {n: m.get_base_layer().weight.detach().clone() for n, m in self.layers.items()}
        self.current = {n: m.get_delta_weight("default").detach().clone() for n, m in self.layers.items()}


def test_relora_cumulative_delta_rank_and_merged_logits(tiny_llama_dir, chat_jsonl, tmp_path, monkeypatch):
    from peft import PeftModel

    keep = Keep()
    monkeypatch.setattr(H, "FACTORIES", [*H.FACTORIES, ("keep", lambda cfg: keep)])
    cfg = cfg_for(tiny_llama_dir, chat_jsonl, {}, relora_every=3, relora_warmup=2, max_steps=8)
    sink = ListSink()
    res = train(cfg, tmp_path / "out", sink, home=tmp_path / "home")
    merges = sorted((tmp_path / "out" / "relora").glob("merge-*.safetensors"))
    assert [p.name for p in merges] == ["merge-0000003.safetensors", "merge-0000006.safetensors"]
    assert res.extra["relora"] == {"merges": 2, "every": 3, "rank": 12}

    original = {n: p.detach() for n, p in fresh(tiny_llama_dir).named_parameters()}
    files = [load_file(str(p)) for p in merges]
    adapter = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    for name in keep.layers:
        merged = sum(f[f"{name}.B"] @ f[f"{name}.A"] for f in files)  # each merged cycle's s·B·A
        # the live base moved by exactly the sum of the merged updates
        assert torch.allclose(keep.base[name] - original[name + ".weight"], merged, atol=1e-6)
        key = f"base_model.model.{name}"
        cumulative = adapter[f"{key}.lora_B.weight"] @ adapter[f"{key}.lora_A.weight"]  # saved with α = rank
        assert torch.allclose(cumulative, merged + keep.current[name], atol=1e-6)
        sigma = torch.linalg.svdvals(cumulative)
        assert int((sigma > 1e-6 * sigma[0]).sum()) > cfg.lora.r, name

    loaded = PeftModel.from_pretrained(fresh(tiny_llama_dir), str(res.adapter_dir)).merge_and_unload().eval()
    with torch.no_grad():
        logits = loaded(input_ids=IDS).logits
    assert torch.allclose(logits, keep.logits, atol=1e-4)  # base + cumulative ΔW is the trained model

    lr = dict(sink.series("lr"))
    assert lr[3] == pytest.approx(0.5e-2) and lr[4] == pytest.approx(1e-2)  # re-warm-up over 2 steps


def test_partial_reset_prunes_the_smallest_moments_together():
    m = torch.tensor([0.5, -3.0, 0.1, 2.0, -0.2, 1.0, 0.05, -4.0, 0.3, 0.7])
    state = {"exp_avg": m.clone(), "exp_avg_sq": m.abs() + 1, "step": torch.tensor(5.0)}
    prune_moments_(state, 0.8)
    assert state["exp_avg"].tolist() == [0, -3.0, 0, 0, 0, 0, 0, -4.0, 0, 0]
    assert state["exp_avg_sq"].tolist() == [0, 4.0, 0, 0, 0, 0, 0, 5.0, 0, 0] and float(state["step"]) == 5.0
    assert [jagged(lambda s: 1.0, 4, 2)(s) for s in range(10)] == [1, 1, 1, 1, 0.5, 1, 1, 1, 0.5, 1]
