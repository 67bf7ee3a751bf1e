"""How much ΔW amplifies directions of W (Hu et al., LoRA §7.3, Table 7): the amplification factor
‖ΔW‖_F / ‖Uᵀ W V‖_F, with U, V the top-r left/right singular directions of ΔW (the paper writes Uᵀ W Vᵀ with
V as rows), beside the same projection on random orthonormal directions and on W's own top-r directions.

    stats = module_amplification(W, A, B, scaling)              # one module: dict of norms and factors
    report = adapter_amplification(adapter_dir, model, home)    # every module + a summary per module kind

The paper finds ΔW amplifies directions that W does not emphasise: ‖UᵀWV‖ is small (near the random
baseline) and the factor large (≈ 21.5 for r = 4 on GPT-3's W_q). Needs the base weights, so it runs in the
engine's child process (`python -m engine amplification`), cached per adapter file version and model.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine.core.anatomy import kind_rank
from engine.ml.spectra import _subspace, load_adapter

N_RANDOM = 8  # random direction pairs averaged for the baseline
CACHE_VERSION = 1


def module_amplification(
    W: Tensor, A: Tensor, B: Tensor, scaling: float, *, n_random: int = N_RANDOM, seed: int = 0
) -> dict[str, Any]:
    """Norms and factors of one module. W is the base weight (out × in; a transposed Conv1D weight is
    turned), A (r × in) and B (out × r) the LoRA factors; ΔW = scaling · B·A. Random directions are seeded."""
    A, B = A.detach().double().reshape(A.shape[0], -1), B.detach().double().reshape(B.shape[0], -1)
    W = W.detach().double()
    if W.shape == (A.shape[1], B.shape[0]) and W.shape != (B.shape[0], A.shape[1]):
        W = W.mT  # GPT-2's Conv1D stores (in, out)
    if W.shape != (B.shape[0], A.shape[1]):
        raise ValueError(f"base weight {tuple(W.shape)} does not match ΔW {(B.shape[0], A.shape[1])}")
    r = A.shape[0]
    delta = float(torch.linalg.matrix_norm(scaling * (B @ A)))
    out: dict[str, Any] = {"r": r, "delta_fro": delta, "w_fro": float(torch.linalg.matrix_norm(W))}
    out["w_top_proj_fro"] = float(torch.linalg.svdvals(W)[:r].square().sum().sqrt())  # ‖U_Wᵀ W V_W‖ = √Σσ²
    g = torch.Generator().manual_seed(seed)
    rand = []
    for _ in range(n_random):
        Qu = torch.linalg.qr(torch.randn(W.shape[0], r, generator=g, dtype=torch.float64))[0]
        Qv = torch.linalg.qr(torch.randn(W.shape[1], r, generator=g, dtype=torch.float64))[0]
        rand.append(float(torch.linalg.matrix_norm(Qu.mT @ W @ Qv)))
    out["random_proj_fro"] = sum(rand) / len(rand) if rand else None
    if delta == 0.0:  # B = 0 (an untrained adapter): ΔW has no directions to project on
        out.update(proj_fro=None, factor=None, random_factor=None, note="ΔW = 0: no directions (untrained?)")
        return out
    U, V = _subspace((A, B), "left"), _subspace((A, B), "right")  # (out, r), (in, r), sorted by σ
    proj = float(torch.linalg.matrix_norm(U.mT @ W @ V))
    out["proj_fro"] = proj
    out["factor"] = delta / proj if proj > 0 else math.inf
    out["random_factor"] = delta / out["random_proj_fro"] if out["random_proj_fro"] else None
    return out


def base_weights(model_ref: str, names: list[str]) -> dict[str, Tensor]:
    """The weight of each named linear module of a base model (fp32, CPU, unquantized)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_ref, dtype=torch.float32)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules or not hasattr(modules[n], "weight")]
    if missing:
        raise ValueError(
            f"the base model {model_ref!r} has no module {missing[0]!r} (and {len(missing) - 1} more); "
            "is this the model the adapter was trained on? pass --model"
        )
    return {n: modules[n].weight.detach() for n in names}


def summarize_kinds(modules: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per module kind (q_proj, v_proj, ...): mean of each norm and factor over its modules, in kind order."""
    kinds: dict[str, list[Mapping[str, Any]]] = {}
    for name, m in modules.items():
        kinds.setdefault(name.split(".")[-1], []).append(m)
    keys = ("delta_fro", "proj_fro", "w_top_proj_fro", "random_proj_fro", "factor", "random_factor")
    out = {}
    for kind in sorted(kinds, key=lambda k: (kind_rank(k), k)):
        ms = kinds[kind]
        out[kind] = {"modules": len(ms), "r": ms[0]["r"]}
        for k in keys:
            vals = [m[k] for m in ms if m.get(k) is not None and math.isfinite(m[k])]
            out[kind][k] = sum(vals) / len(vals) if vals else None
    return out


def _cache_key(adapter_dir: Path, model_ref: str, n_random: int) -> str:
    files = sorted(p for p in adapter_dir.iterdir() if p.name.startswith("adapter_"))
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    raw = json.dumps([CACHE_VERSION, str(adapter_dir.resolve()), model_ref, n_random, stamp])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def adapter_amplification(
    adapter_dir: str | Path, model_ref: str, cache_dir: Path | None = None, *, n_random: int = N_RANDOM
) -> dict[str, Any]:
    """Every module of a PEFT LoRA adapter against `model_ref`'s weights, and a summary per kind; read from
    (and written to) cache_dir/<key>.json, the key naming the adapter's files, their size and time."""
    folder = Path(adapter_dir)
    key = _cache_key(folder, model_ref, n_random) if folder.is_dir() else None
    cached = cache_dir / f"amplification-{key}.json" if cache_dir is not None and key else None
    if cached is not None and cached.is_file():
        return {**json.loads(cached.read_text(encoding="utf-8")), "cached": True}
    _, factors, dora = load_adapter(folder)
    weights = base_weights(model_ref, list(factors))
    modules = {
        n: module_amplification(weights[n], A, B, s, n_random=n_random, seed=i)
        for i, (n, (A, B, s)) in enumerate(factors.items())
    }
    report = {
        "adapter": str(folder),
        "model": model_ref,
        "n_random": n_random,
        "modules": modules,
        "kinds": summarize_kinds(modules),
        "notes": [f"{len(dora)} DoRA modules: the directional part ΔW = B·A only"] if dora else [],
    }
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(report), encoding="utf-8")
    return {**report, "cached": False}
