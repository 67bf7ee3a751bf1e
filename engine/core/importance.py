"""LoRA-drop's output importance, as numbers about layers: each layer's share, the cumulative share, and the
layers that carry a given fraction of it. Stdlib only (the Spectra tab and the CLI use the same rules).

    modules = {"model.layers.0.self_attn.q_proj": 0.012, ...}   # mean ‖ΔW x‖² per module (engine importance)
    layer_shares(modules)          # {0: 0.31, 1: 0.05, ...}: each layer's share of the total
    keep_layers(modules, 0.9)      # the fewest layers whose shares add up to ≥ 90 %, in layer order

LoRA-drop (Zhou et al. 2024) measures a LoRA's importance on its *output*: g = ‖ΔWᵢxᵢ‖² averaged over a
sample of the data, normalised over the modules; it keeps the LoRAs of the most important layers until
their cumulative importance reaches a threshold (0.9 in the paper) and shares one LoRA among the rest.
"""

from __future__ import annotations

from collections.abc import Mapping

from engine.core.anatomy import layer_of

DEFAULT_KEEP = 0.9  # LoRA-drop's threshold T


def layer_shares(modules: Mapping[str, float]) -> dict[int, float]:
    """Layer → its share of the summed importance of all modules in numbered layers (0 everywhere if all are 0)."""
    per: dict[int, float] = {}
    for name, value in modules.items():
        layer = layer_of(name)
        if layer is not None:
            per[layer] = per.get(layer, 0.0) + max(0.0, float(value))
    total = sum(per.values())
    return {k: (v / total if total > 0 else 0.0) for k, v in sorted(per.items())}


def ranked_layers(modules: Mapping[str, float]) -> list[tuple[int, float, float]]:
    """(layer, share, cumulative share) from the most important layer down."""
    out, acc = [], 0.0
    for layer, share in sorted(layer_shares(modules).items(), key=lambda kv: (-kv[1], kv[0])):
        acc += share
        out.append((layer, share, acc))
    return out


def keep_layers(modules: Mapping[str, float], fraction: float = DEFAULT_KEEP) -> list[int]:
    """The fewest most-important layers whose shares add up to at least `fraction`, in layer order."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction = {fraction!r}: give a share in (0, 1], e.g. 0.9 (LoRA-drop's threshold)")
    kept = []
    for layer, _, acc in ranked_layers(modules):
        kept.append(layer)
        if acc >= fraction - 1e-12:
            break
    return sorted(kept)
