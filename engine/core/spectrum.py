"""Statistics of singular-value spectra σ(ΔW), in plain Python (σ has at most 2r values). Stdlib only.

engine.ml.spectra computes σ from the adapter factors; everything said about a spectrum afterwards — the
norms, effective and stable rank, energy in the top k, and the summary of a whole adapter — is computed
here, once, for the trainer's stored spectra, the CLI's JSON, the model card and the Spectra tab alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from engine.core.anatomy import layer_of

ENERGY_K = (1, 2, 4, 8)  # energy_topk reports these k (those ≤ r)
HEATMAP_VALUES = ("fro_norm", "spectral_norm", "effective_rank", "stable_rank")


def spectrum_stats(sigma: Sequence[float], r: int | None = None) -> dict[str, Any]:
    """fro_norm, spectral_norm, effective_rank, stable_rank and energy_topk of one spectrum.

    effective_rank is Roy & Vetterli (2007): exp(H(p)) with p = σ/Σσ, 1 when one direction carries
    everything and r when all are equal; stable_rank is Σσ²/σ₁²; energy_topk[k] = Σ_{i≤k}σᵢ²/Σσ², what a
    rank-k truncation keeps. An all-zero spectrum (B = 0 at init) gives 0 for every one of them.
    """
    s = sorted((abs(float(x)) for x in sigma), reverse=True)
    r = len(s) if r is None else r
    ks = [k for k in ENERGY_K if k <= r]
    total = sum(x * x for x in s)
    if total == 0.0:
        return dict(
            fro_norm=0.0, spectral_norm=0.0, effective_rank=0.0, stable_rank=0.0, energy_topk={k: 0.0 for k in ks}
        )
    mass = sum(s)
    entropy = -sum((x / mass) * math.log(x / mass) for x in s if x > 0)
    cum, acc = [], 0.0
    for x in s:
        acc += x * x
        cum.append(acc / total)
    return dict(
        fro_norm=math.sqrt(total),
        spectral_norm=s[0],
        effective_rank=math.exp(entropy),
        stable_rank=total / s[0] ** 2,
        energy_topk={k: cum[min(k, len(cum)) - 1] for k in ks},
    )


def flat_stats(sigma: Sequence[float], r: int | None = None) -> dict[str, Any]:
    """spectrum_stats with energy_topk flattened into energy_top1, energy_top2, ... (the stored form)."""
    st = spectrum_stats(sigma, r)
    st.update({f"energy_top{k}": v for k, v in st.pop("energy_topk").items()})
    return st


def record_stats(record: Any) -> dict[str, Any]:
    """A stored SpectrumRecord (values = σ, extra = the trainer's stats) → one module's stats dict."""
    name = record.module
    stats = {**flat_stats(record.values), **dict(record.extra or {})}
    stats["sigma"] = list(record.values)
    stats.setdefault("layer", layer_of(name))
    stats.setdefault("kind", name.split(".")[-1])
    return stats


def summarize(modules: Mapping[str, Mapping[str, Any]], top: int = 5) -> dict[str, Any]:
    """One adapter's spectra in a few numbers: modules, ranks, ‖ΔW‖_F over all modules, mean effective rank,
    largest σ₁, notes, and the `top` modules by ‖ΔW‖_F. {} when there are no modules.

    `modules` maps module names to stats dicts with at least `sigma` (to_stats()/record_stats() form).
    """
    if not modules:
        return {}
    stats = {n: {**flat_stats(m.get("sigma") or []), **m} for n, m in modules.items()}
    ranked = sorted(stats.items(), key=lambda kv: -kv[1]["fro_norm"])
    ranks = sorted(
        {int(m["r"]) for m in stats.values() if m.get("r") is not None}
        or {len(m.get("sigma") or []) for m in stats.values()}
    )
    return {
        "modules": len(stats),
        "r": ranks,
        "max_rank": max(len(m.get("sigma") or []) for m in stats.values()),
        "fro_norm_total": math.sqrt(sum(m["fro_norm"] ** 2 for m in stats.values())),
        "spectral_norm_max": max(m["spectral_norm"] for m in stats.values()),
        "effective_rank_mean": sum(m["effective_rank"] for m in stats.values()) / len(stats),
        "notes": sorted({m["note"] for m in stats.values() if m.get("note")}),
        "top": [
            {"module": n, "fro_norm": m["fro_norm"], "effective_rank": m["effective_rank"]} for n, m in ranked[:top]
        ],
    }
