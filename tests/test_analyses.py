"""The LoRA paper's analyses (engine.ml.amplify, `engine phi`, `engine amplification`): φ of an adapter with
itself is 1 on the diagonal and 0 for orthogonal row spaces; the amplification factor equals a direct numpy
computation; the CLI reads real adapter folders and their base model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.cli import main as cli
from engine.ml.amplify import module_amplification, summarize_kinds
from engine.ml.spectra import subspace_similarity


def run_cli(capsys, home, *args):
    code = cli(["--home", str(home), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_phi_is_one_with_itself_and_zero_for_orthogonal_row_spaces():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 16, generator=g, dtype=torch.float64)
    phi = subspace_similarity(A, A, 4, 4)
    assert [phi[i][i] for i in range(4)] == pytest.approx([1.0] * 4)
    Q = torch.linalg.qr(torch.randn(16, 8, generator=g, dtype=torch.float64))[0]  # 8 orthonormal columns
    A1, A2 = torch.randn(4, 4, generator=g, dtype=torch.float64) @ Q[:, :4].T, Q[:, 4:].T * 3.0
    phi = subspace_similarity(A1, A2, 4, 4)
    assert np.abs(np.array(phi)).max() == pytest.approx(0.0, abs=1e-12)


def numpy_amplification(W, A, B, s):
    dW = s * B @ A
    U, _, Vt = np.linalg.svd(dW)
    r = A.shape[0]
    return np.linalg.norm(dW) / np.linalg.norm(U[:, :r].T @ W @ Vt[:r].T)


def test_the_amplification_factor_equals_a_direct_numpy_computation():
    rng = np.random.default_rng(1)
    W, A, B = rng.normal(size=(12, 10)), rng.normal(size=(3, 10)), rng.normal(size=(12, 3))
    got = module_amplification(torch.tensor(W), torch.tensor(A), torch.tensor(B), 2.0, n_random=4)
    assert got["factor"] == pytest.approx(numpy_amplification(W, A, B, 2.0), rel=1e-10)
    assert got["delta_fro"] == pytest.approx(np.linalg.norm(2.0 * B @ A), rel=1e-12)
    assert got["w_top_proj_fro"] == pytest.approx(np.sqrt((np.linalg.svd(W, compute_uv=False)[:3] ** 2).sum()))
    assert 0 < got["random_proj_fro"] < got["w_top_proj_fro"]  # W's own top directions carry the most
    # A Conv1D weight stored (in, out) is turned; an untrained adapter (B = 0) has no factor.
    assert module_amplification(torch.tensor(W.T), torch.tensor(A), torch.tensor(B), 2.0)["factor"] == pytest.approx(
        got["factor"]
    )
    zero = module_amplification(torch.tensor(W), torch.tensor(A), torch.zeros(12, 3), 2.0)
    assert zero["factor"] is None and zero["delta_fro"] == 0.0
    kinds = summarize_kinds({"model.layers.0.self_attn.q_proj": got, "model.layers.1.self_attn.q_proj": zero})
    assert kinds["q_proj"]["modules"] == 2 and kinds["q_proj"]["factor"] == pytest.approx(got["factor"])


@pytest.fixture(scope="module")
def two_adapters(tiny_llama_dir, tmp_path_factory):
    """Two saved adapters of the tiny Llama (r 4 and r 2, random non-zero B) on q_proj and v_proj."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = []
    for r, seed in ((4, 0), (2, 1)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        cfg = LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        pm = get_peft_model(model, cfg)
        folder = tmp_path_factory.mktemp(f"adapter-r{r}")
        pm.save_pretrained(folder)
        out.append((folder, pm))
    return out


def test_the_cli_reports_phi_per_kind_and_the_amplification_of_a_real_adapter(
    capsys, home, tiny_llama_dir, two_adapters
):
    (a, pm), (b, _) = two_adapters
    code, out, err = run_cli(capsys, home, "phi", str(a), str(a), "--kind", "q_proj", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert len(rep["modules"]) == 2 and [rep["mean"][i][i] for i in range(4)] == pytest.approx([1.0] * 4)
    code, out, _ = run_cli(capsys, home, "phi", str(a), str(b), "--kind", "v_proj", "--json")
    assert code == 0 and len(json.loads(out)["mean"]) == 4 and len(json.loads(out)["mean"][0]) == 2
    code, _, err = run_cli(capsys, home, "phi", str(a), str(b), "--kind", "o_proj")
    assert code == 2 and "no module of that kind in both adapters; they share ['q_proj', 'v_proj']" in err

    code, out, err = run_cli(capsys, home, "amplification", str(a), "--model", str(tiny_llama_dir), "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert sorted(rep["kinds"]) == ["q_proj", "v_proj"] and not rep["cached"]
    name = "model.layers.0.self_attn.q_proj"
    layer = dict(pm.named_modules())[f"base_model.model.{name}"]
    W = layer.base_layer.weight.detach().double().numpy()
    A, B = (x["default"].weight.detach().double().numpy() for x in (layer.lora_A, layer.lora_B))
    assert rep["modules"][name]["factor"] == pytest.approx(numpy_amplification(W, A, B, 8 / 4), rel=1e-8)
    code, out, _ = run_cli(capsys, home, "amplification", str(a), "--model", str(tiny_llama_dir))
    assert code == 0 and "(cached)" in out and "q_proj" in out
