"""σ(ΔW) by the QR trick equals the full SVD, on random factors and on real PEFT models (scaling included)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine.core.spectrum import spectrum_stats
from engine.ml.spectra import (
    adapter_spectra,
    batched_singular_values,
    capture_reference,
    heatmap,
    model_spectra,
    singular_values,
    subspace_similarity,
    to_json,
)

LLAMA_KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_model(model_dir, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_KINDS, "lora_dropout": 0.0} | lora
    return get_peft_model(model, LoraConfig(**lora))


def lora_modules(pm):
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if isinstance(m, LoraLayer)}


def assert_sigma(got, want, rtol=1e-4):
    """got equals the first len(got) values of want, relative to the largest σ."""
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    assert want[len(got) :].abs().max().item() <= 1e-5 * want[0].item() if len(want) > len(got) else True
    torch.testing.assert_close(got, want[: len(got)], rtol=rtol, atol=rtol * want[0].item())


# ---- the QR path on random factors ------------------------------------------------------------


@pytest.mark.parametrize(
    "d_out,r,d_in,scaling",
    [(64, 8, 48, 2.0), (128, 4, 32, 0.5), (16, 16, 16, 1.0), (8, 12, 40, -3.0), (40, 12, 8, 1.5), (300, 1, 7, 4.0)],
)
def test_qr_path_equals_full_svd(d_out, r, d_in, scaling):
    g = torch.Generator().manual_seed(d_out * r + d_in)
    A, B = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
    want = torch.linalg.svdvals(scaling * B.double() @ A.double())
    got = singular_values(A, B, scaling)
    assert got.dtype == torch.float32 and len(got) == min(r, d_out, d_in)
    assert_sigma(got, want, rtol=1e-4)
    assert_sigma(singular_values(A, B, scaling, float64=True), want, rtol=1e-10)


def test_batched_equals_unbatched():
    g = torch.Generator().manual_seed(1)
    shapes = [(32, 4, 16), (32, 4, 16), (64, 8, 32), (32, 4, 16), (64, 8, 32), (10, 2, 90)]
    As = [torch.randn(r, d_in, generator=g) for _, r, d_in in shapes]
    Bs = [torch.randn(d_out, r, generator=g) for d_out, r, _ in shapes]
    scalings = [0.5, 2.0, 1.0, -1.0, 4.0, 0.25]
    batched = batched_singular_values(As, Bs, scalings)
    assert len(batched) == len(shapes)
    for A, B, s, got in zip(As, Bs, scalings, batched):
        torch.testing.assert_close(got, singular_values(A, B, s), rtol=1e-5, atol=1e-6)


def test_mismatched_factors_fail_loudly():
    with pytest.raises(ValueError, match="need A"):
        singular_values(torch.randn(4, 16), torch.randn(32, 8), 1.0)


def test_stats_by_hand():
    st = spectrum_stats([3.0, 4.0, 0.0, 0.0], r=4)
    assert st["fro_norm"] == pytest.approx(5.0)
    assert st["spectral_norm"] == pytest.approx(4.0)
    assert st["stable_rank"] == pytest.approx(25 / 16)
    p = torch.tensor([3 / 7, 4 / 7])
    assert st["effective_rank"] == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert st["energy_topk"] == pytest.approx({1: 16 / 25, 2: 1.0, 4: 1.0})
    flat = spectrum_stats([1.0] * 8, r=8)
    assert flat["effective_rank"] == pytest.approx(8.0) and flat["stable_rank"] == pytest.approx(8.0)
    assert flat["energy_topk"] == pytest.approx({1: 1 / 8, 2: 2 / 8, 4: 4 / 8, 8: 1.0})


# ---- live PEFT models: scaling and names as PEFT has them -------------------------------------


@pytest.mark.parametrize(
    "extra", [{}, {"use_rslora": True}, {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"down_proj": 3.0}}]
)
def test_model_spectra_equals_peft_delta_weight(tiny_llama_dir, extra):
    from transformers import AutoModelForCausalLM

    from engine.ml.model import describe

    pm = peft_model(tiny_llama_dir, init_lora_weights=False, **extra)  # B random, so ΔW ≠ 0
    spectra = model_spectra(pm)
    base_names = {m["name"] for m in describe(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))}
    assert set(spectra) == base_names and len(spectra) == 2 * 7  # model.layers.0.self_attn.q_proj, ...
    for name, module in lora_modules(pm).items():
        sp = spectra[name]
        r = 2 if (extra.get("rank_pattern") and sp.kind == "q_proj") else 4
        alpha = 3.0 if (extra.get("alpha_pattern") and sp.kind == "down_proj") else 8
        assert sp.r == r and sp.layer == int(name.split(".")[2]) and sp.kind == name.split(".")[-1]
        assert sp.scaling == pytest.approx(alpha / math.sqrt(r) if extra.get("use_rslora") else alpha / r)
        want = torch.linalg.svdvals(module.get_delta_weight("default").detach().double())
        assert_sigma(sp.sigma, want)
        assert sp.fro_norm == pytest.approx(torch.linalg.matrix_norm(want.diag()).item(), rel=1e-4)
        assert sp.spectral_norm == pytest.approx(want[0].item(), rel=1e-4)
        assert 1.0 <= sp.effective_rank <= r and 1.0 <= sp.stable_rank <= r


def test_gaussian_init_gives_zero_spectrum(tiny_llama_dir):
    spectra = model_spectra(peft_model(tiny_llama_dir))  # default init: B = 0
    for sp in spectra.values():
        assert sp.sigma == [0.0] * 4
        assert (sp.fro_norm, sp.effective_rank, sp.stable_rank, sp.spectral_norm) == (0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_reference_measures_against_original_base(tiny_llama_dir, init):
    from transformers import AutoModelForCausalLM

    original = {
        n: m.weight.detach().clone()
        for n, m in AutoModelForCausalLM.from_pretrained(tiny_llama_dir).named_modules()
        if n.split(".")[-1] in LLAMA_KINDS
    }
    pm = peft_model(tiny_llama_dir, init_lora_weights=init)
    ref = capture_reference(pm)
    assert set(ref) == set(original)
    # Before training ΔW against the original base is exactly zero, though B·A is not.
    before = model_spectra(pm, reference=ref)
    assert all(max(sp.sigma) == 0.0 and sp.effective_rank == 0.0 for sp in before.values())
    assert all(sp.fro_norm > 0 for sp in model_spectra(pm).values())

    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in lora_modules(pm).values():
            for p in (m.lora_A["default"].weight, m.lora_B["default"].weight):
                p.add_(0.05 * p.std() * torch.randn(p.shape, generator=g))
    after = model_spectra(pm, reference=ref)
    for name, m in lora_modules(pm).items():
        sp = after[name]
        assert len(sp.sigma) == 8 and "B₀" in sp.note  # rank ≤ 2r
        merged = m.get_base_layer().weight + m.get_delta_weight("default")  # W_res + s·B·A
        assert_sigma(sp.sigma, torch.linalg.svdvals((merged - original[name]).detach().double()), rtol=1e-3)
        (A0, B0), A, B = ref[name], m.lora_A["default"].weight, m.lora_B["default"].weight
        explicit = m.scaling["default"] * (B.double() @ A.double() - B0.double() @ A0.double())
        assert_sigma(sp.sigma, torch.linalg.svdvals(explicit.detach()), rtol=1e-4)


def test_missing_reference_fails_loudly(tiny_llama_dir):
    pm = peft_model(tiny_llama_dir, init_lora_weights="pissa")
    ref = capture_reference(pm)
    ref.pop("model.layers.1.mlp.up_proj")
    with pytest.raises(ValueError, match="capture_reference"):
        model_spectra(pm, reference=ref)


def test_dora_reports_direction_and_magnitude_change(tiny_llama_dir, tmp_path):
    pm = peft_model(tiny_llama_dir, use_dora=True)  # default init: B = 0, m₀ = ‖W‖ per output
    spectra = model_spectra(pm)
    assert all("DoRA" in sp.note and sp.magnitude_change == 0.0 for sp in spectra.values())
    with torch.no_grad():
        lora_modules(pm)["model.layers.0.self_attn.v_proj"].lora_magnitude_vector["default"].weight.mul_(1.1)
        lora_modules(pm)["model.layers.1.mlp.down_proj"].lora_B["default"].weight.normal_()
    spectra = model_spectra(pm)
    assert spectra["model.layers.0.self_attn.v_proj"].magnitude_change == pytest.approx(0.1, rel=1e-5)
    assert spectra["model.layers.1.mlp.down_proj"].magnitude_change == 0.0  # direction moved, magnitude not
    assert spectra["model.layers.1.mlp.down_proj"].fro_norm > 0
    assert sum(sp.magnitude_change > 0 for sp in spectra.values()) == 1
    pm.save_pretrained(tmp_path / "dora")
    saved = adapter_spectra(tmp_path / "dora")
    assert all("needs the base" in sp.note and sp.magnitude_change is None for sp in saved.values())
    assert saved["model.layers.1.mlp.down_proj"].sigma == pytest.approx(spectra["model.layers.1.mlp.down_proj"].sigma)


# ---- saved folders equal the live model --------------------------------------------------------


@pytest.mark.parametrize(
    "extra,safe",
    [
        ({}, True),
        ({"use_rslora": True}, False),
        ({"rank_pattern": {"layers.1.self_attn.v_proj": 2}, "alpha_pattern": {"gate_proj": 5.0}}, True),
    ],
)
def test_adapter_folder_equals_live_llama(tiny_llama_dir, tmp_path, extra, safe):
    pm = peft_model(tiny_llama_dir, init_lora_weights=False, **extra)
    live = model_spectra(pm)
    pm.save_pretrained(tmp_path / "a", safe_serialization=safe)
    saved = adapter_spectra(tmp_path / "a")
    assert list(saved) == list(live)  # same names, same (natural) order
    for name, sp in saved.items():
        assert (sp.r, sp.layer, sp.kind) == (live[name].r, live[name].layer, live[name].kind)
        assert sp.scaling == pytest.approx(live[name].scaling)
        assert sp.sigma == pytest.approx(live[name].sigma, rel=1e-6)
    if extra.get("rank_pattern"):
        assert saved["model.layers.1.self_attn.v_proj"].r == 2 and saved["model.layers.0.self_attn.v_proj"].r == 4
        assert saved["model.layers.0.mlp.gate_proj"].scaling == pytest.approx(5.0 / 4)


def test_adapter_folder_equals_live_gpt2_conv1d(tiny_gpt2_dir, tmp_path):
    pm = peft_model(
        tiny_gpt2_dir, init_lora_weights=False, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
    )
    live = model_spectra(pm)
    assert "transformer.h.0.attn.c_attn" in live and len(live) == 2 * 4
    for name, m in lora_modules(pm).items():  # Conv1D: get_delta_weight is transposed; σ is not
        assert_sigma(live[name].sigma, torch.linalg.svdvals(m.get_delta_weight("default").detach().double()))
    pm.save_pretrained(tmp_path / "g")
    saved = adapter_spectra(tmp_path / "g")
    assert set(saved) == set(live)
    for name, sp in saved.items():
        assert sp.sigma == pytest.approx(live[name].sigma, rel=1e-6)
    layers, kinds, grid = heatmap(saved, "fro_norm")
    assert layers == [0, 1] and kinds == ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
    assert grid[1][3] == pytest.approx(live["transformer.h.1.mlp.c_proj"].fro_norm)


def test_adapter_folder_reference_and_errors(tiny_llama_dir, tmp_path):
    pm = peft_model(tiny_llama_dir, init_lora_weights="pissa")
    pm.save_pretrained(tmp_path / "init")
    with torch.no_grad():
        lora_modules(pm)["model.layers.0.self_attn.q_proj"].lora_B["default"].weight.mul_(1.5)
    pm.save_pretrained(tmp_path / "now")
    spectra = adapter_spectra(tmp_path / "now", reference=tmp_path / "init")
    moved = {n for n, sp in spectra.items() if sp.fro_norm > 0}
    assert moved == {"model.layers.0.self_attn.q_proj"}
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        adapter_spectra(tmp_path / "nowhere")


# ---- summaries ---------------------------------------------------------------------------------


def test_heatmap_and_json(tiny_llama_dir):
    spectra = model_spectra(peft_model(tiny_llama_dir, init_lora_weights=False))
    layers, kinds, grid = heatmap(spectra, "effective_rank")
    assert layers == [0, 1] and kinds == LLAMA_KINDS
    assert grid[1][2] == spectra["model.layers.1.self_attn.v_proj"].effective_rank
    assert heatmap(spectra, "energy_top1")[2][0][0] == spectra["model.layers.0.self_attn.q_proj"].energy_topk[1]
    with pytest.raises(ValueError, match="not a statistic"):
        heatmap(spectra, "sigma_max")
    doc = json.loads(json.dumps(to_json(spectra)))
    assert doc["summary"]["modules"] == 14 and doc["summary"]["r"] == [4]
    assert doc["summary"]["fro_norm_total"] == pytest.approx(math.sqrt(sum(s.fro_norm**2 for s in spectra.values())))
    q0 = doc["modules"]["model.layers.0.self_attn.q_proj"]
    assert q0["sigma"] == pytest.approx(spectra["model.layers.0.self_attn.q_proj"].sigma) and "energy_top4" in q0
    assert doc["heatmaps"]["fro_norm"]["kinds"] == LLAMA_KINDS


def test_subspace_similarity(tiny_llama_dir):
    g = torch.Generator().manual_seed(3)
    A = torch.randn(8, 64, generator=g)
    for M, side in [
        (A, "right"),
        (torch.randn(48, 8, generator=g), "left"),
        ((A, torch.randn(48, 8)), "right"),
        ((A, torch.randn(48, 8)), "left"),
    ]:
        phi = subspace_similarity(M, M, 8, 8, side=side)
        assert all(phi[i][i] == pytest.approx(1.0) for i in range(8))  # nested subspaces: every φ is 1
        assert min(min(row) for row in phi) == pytest.approx(1.0)
    # Right-singular directions e0 > e1 vs e0 > e2: top directions agree, second ones are orthogonal.
    A1 = torch.zeros(2, 5)
    A1[0, 0], A1[1, 1] = 2.0, 1.0
    A2 = torch.zeros(2, 5)
    A2[0, 0], A2[1, 2] = 3.0, 1.0
    phi = subspace_similarity(A1, A2, 2, 2)
    assert phi[0] == pytest.approx([1.0, 1.0]) and phi[1] == pytest.approx([1.0, 0.5])
    # Two unrelated random A share almost nothing (Hu et al. Fig. 4's random baseline).
    phi = subspace_similarity(torch.randn(4, 2048, generator=g), torch.randn(4, 2048, generator=g), 4, 4)
    assert max(max(row) for row in phi) < 0.05
    # From a real adapter: q_proj of layer 0 against itself and against layer 1.
    pm = peft_model(tiny_llama_dir, init_lora_weights=False)
    q0, q1 = (lora_modules(pm)[f"model.layers.{i}.self_attn.q_proj"].lora_A["default"].weight for i in (0, 1))
    assert subspace_similarity(q0, q0, 4, 4)[3][3] == pytest.approx(1.0)
    assert subspace_similarity(q0, q1, 4, 4)[0][0] < 1.0
    with pytest.raises(ValueError, match="i_max"):
        subspace_similarity(q0, q1, 5, 4)
