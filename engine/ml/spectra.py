"""Singular-value spectra of LoRA updates ΔW = scaling · B·A, without forming ΔW.

    spectra = model_spectra(peft_model)              # live model, one ModuleSpectrum per LoRA layer
    spectra = adapter_spectra("runs/7/adapter")       # any saved PEFT LoRA folder, no base model needed
    layers, kinds, grid = heatmap(spectra, "effective_rank")
    to_json(spectra)                                  # what `python -m engine spectra --json` prints

The trick (style-study §10.9): B = Q_b R_b and Aᵀ = Q_a R_a with orthonormal Q's, so
ΔW = s · Q_b (R_b R_aᵀ) Q_aᵀ and σ(ΔW) = |s| · σ(R_b R_aᵀ), an r × r problem. For a 4096 × 4096
module at r = 16 this is ~4,000× faster than a full SVD and agrees to ~1e-7 (stack-notes "σ(B·A)").

Names follow the math and PEFT: lora_A is A (r × d_in), lora_B is B (d_out × r), scaling is
alpha/r (alpha/√r with rsLoRA). Module names are the base model's paths (`model.layers.0.self_attn.q_proj`),
the same as engine.ml.model.describe(). Pure: no database, no UI.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine.core.anatomy import layer_kind_grid, layer_of, natural_key
from engine.core.runs import ADAPTER_CONFIG
from engine.core.spectrum import HEATMAP_VALUES, spectrum_stats, summarize

PEFT_PREFIX = "base_model.model."  # PeftModel wraps the base model at base_model.model
NOTE_DORA = "DoRA: sigma is the directional low-rank part s·B·A; the learned magnitude is separate"
NOTE_DORA_NO_BASE = NOTE_DORA + " (magnitude_change needs the base weights; not computed from a folder)"
NOTE_REFERENCE = "measured against the original base: ΔW = s·(B·A − B₀·A₀), rank ≤ 2r"
NOTE_ADALORA = "AdaLoRA: ΔW = P·Λ·Q·α/r; pruned singular values are 0"
NOTE_VERA = "VeRA: ΔW = Λ_b·B·Λ_d·A with A, B shared, frozen and random"

# ---- σ by the QR trick -----------------------------------------------------------------------


def _core_svdvals(A: Tensor, B: Tensor, dtype: torch.dtype) -> Tensor:
    """σ(B·A) for (batches of) factors A: (..., r, d_in), B: (..., d_out, r), via two thin QRs."""
    # mode="r" skips forming Q; only the triangular factors carry the spectrum.
    _, Rb = torch.linalg.qr(B.to(dtype), mode="r")  # (..., min(d_out, r), r)
    _, Ra = torch.linalg.qr(A.to(dtype).mT, mode="r")  # (..., min(d_in, r), r)
    return torch.linalg.svdvals(Rb @ Ra.mT)  # (..., min(d_out, r), min(d_in, r)) core


def _as_2d(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    # Conv LoRA stores A as (r, c_in, k, k) and B as (c_out, r, 1, 1); PEFT's delta is B.view(-1, r) @ A.view(r, -1).
    # Reshaping by each tensor's own leading dim (not by r) keeps a mismatched pair detectable.
    return A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)


def singular_values(A: Tensor, B: Tensor, scaling: float, *, float64: bool = False) -> Tensor:
    """σ(ΔW) for ΔW = scaling · B·A (B: d_out × r, A: r × d_in), descending, without forming ΔW.

    Returns min(r, d_out, d_in) values: the non-zero part of ΔW's spectrum (the rest is exactly 0).
    """
    A, B = _as_2d(A.detach(), B.detach())
    if A.shape[0] != B.shape[1]:
        raise ValueError(f"lora_A is {tuple(A.shape)} and lora_B is {tuple(B.shape)}: need A (r × d_in), B (d_out × r)")
    sigma = _core_svdvals(A, B, torch.float64 if float64 else torch.float32)
    return abs(float(scaling)) * sigma


def batched_singular_values(
    As: Sequence[Tensor], Bs: Sequence[Tensor], scalings: Sequence[float], *, float64: bool = False
) -> list[Tensor]:
    """singular_values() for many modules at once; results in input order.

    Modules with equal factor shapes (e.g. the 32 q_proj of a 7B Llama) are stacked into one
    (N, d, r) tensor so QR and svdvals run as a single batched call per shape.
    """
    if not len(As) == len(Bs) == len(scalings):
        raise ValueError(
            f"got {len(As)} lora_A, {len(Bs)} lora_B and {len(scalings)} scalings; need one of each per module"
        )
    dtype = torch.float64 if float64 else torch.float32
    groups: dict[tuple, list[int]] = {}
    pairs = [_as_2d(A.detach(), B.detach()) for A, B in zip(As, Bs)]
    for i, (A, B) in enumerate(pairs):
        if A.shape[0] != B.shape[1]:
            raise ValueError(
                f"module {i}: lora_A is {tuple(A.shape)} and lora_B is {tuple(B.shape)}; "
                "need A (r × d_in), B (d_out × r)"
            )
        groups.setdefault((tuple(A.shape), tuple(B.shape), A.device, B.device), []).append(i)
    out: list[Tensor | None] = [None] * len(pairs)
    for idx in groups.values():
        A = torch.stack([pairs[i][0].to(dtype) for i in idx])  # (N, r, d_in)
        B = torch.stack([pairs[i][1].to(dtype) for i in idx])  # (N, d_out, r)
        s = torch.tensor([abs(float(scalings[i])) for i in idx], dtype=dtype, device=A.device)
        sigma = s[:, None] * _core_svdvals(A, B, dtype)  # (N, k)
        for row, i in enumerate(idx):
            out[i] = sigma[row]
    return out  # type: ignore[return-value]


def reference_factors(A: Tensor, B: Tensor, A0: Tensor, B0: Tensor) -> tuple[Tensor, Tensor]:
    """Factors (A', B') with B'·A' = B·A − B₀·A₀, for inits that move the base weights (PiSSA, OLoRA).

    B·A − B₀·A₀ = (B − B₀)·A + B₀·(A − A₀) = [B − B₀, B₀] · [A; A − A₀], a rank ≤ 2r product. This form,
    rather than [B, −B₀]·[A; A₀], keeps the small differences explicit: no cancellation of two large
    products in float32, and exactly zero σ before training moves the factors.
    """
    A, B = _as_2d(A.detach(), B.detach())
    A0, B0 = _as_2d(A0.detach().to(A.device, A.dtype), B0.detach().to(B.device, B.dtype))
    if A.shape != A0.shape or B.shape != B0.shape:
        raise ValueError(
            f"reference factors A₀ {tuple(A0.shape)}, B₀ {tuple(B0.shape)} do not match "
            f"A {tuple(A.shape)}, B {tuple(B.shape)}"
        )
    return torch.cat([A, A - A0], dim=0), torch.cat([B - B0, B0], dim=1)  # (2r, d_in), (d_out, 2r)


# ---- statistics ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleSpectrum:
    """σ(ΔW) of one LoRA module and its summary statistics."""

    name: str  # base-model path, e.g. model.layers.0.self_attn.q_proj
    layer: int | None  # first integer path component (transformer block)
    kind: str  # last path component, e.g. q_proj
    r: int
    scaling: float  # alpha/r, or alpha/√r with rsLoRA
    sigma: list[float]  # descending; min(r, d_out, d_in) values (up to 2r against a reference)
    fro_norm: float  # ‖ΔW‖_F = sqrt(Σσ²)
    spectral_norm: float  # σ₁
    effective_rank: float  # exp(entropy of σ/Σσ); 0 for ΔW = 0
    stable_rank: float  # Σσ²/σ₁²; 0 for ΔW = 0
    energy_topk: dict[int, float] = field(default_factory=dict)  # k → Σ_{i≤k}σᵢ²/Σσ²
    note: str = ""
    magnitude_change: float | None = None  # DoRA only: mean |m − m₀|/m₀

    def to_stats(self) -> dict[str, Any]:
        """Flat, JSON-ready dict for storage (energy_topk becomes energy_top1, energy_top2, ...)."""
        d = asdict(self)
        d.update({f"energy_top{k}": v for k, v in d.pop("energy_topk").items()})
        return d


def _spectrum(
    name: str, r: int, scaling: float, sigma: Tensor, note: str = "", magnitude_change: float | None = None
) -> ModuleSpectrum:
    values = [float(x) for x in sigma.detach().cpu().tolist()]
    return ModuleSpectrum(
        name=name,
        layer=layer_of(name),
        kind=name.split(".")[-1],
        r=r,
        scaling=float(scaling),
        sigma=values,
        note=note,
        magnitude_change=magnitude_change,
        **spectrum_stats(values, r),
    )


def _spectra_from_factors(
    factors: dict[str, tuple[Tensor, Tensor, float]],
    reference: Mapping[str, tuple[Tensor, Tensor]] | None,
    notes: Mapping[str, str],
    magnitude: Mapping[str, float],
) -> dict[str, ModuleSpectrum]:
    """One batched σ computation for every module; the shared tail of model_spectra and adapter_spectra."""
    if reference is not None:
        missing = [n for n in factors if n not in reference]
        if missing:
            raise ValueError(
                f"reference has no (A₀, B₀) for {len(missing)} module(s), e.g. {missing[:3]}; "
                "capture it with capture_reference() right after the adapter is initialised"
            )
    names = list(factors)
    As, Bs = [], []
    for n in names:
        A, B, _ = factors[n]
        if reference is not None:
            A, B = reference_factors(A, B, *reference[n])
        As.append(A)
        Bs.append(B)
    sigmas = batched_singular_values(As, Bs, [factors[n][2] for n in names])
    out = {}
    for n, sigma in zip(names, sigmas):
        A, _, s = factors[n]
        note = "; ".join(x for x in (notes.get(n, ""), NOTE_REFERENCE if reference is not None else "") if x)
        out[n] = _spectrum(n, A.shape[0], s, sigma, note, magnitude.get(n))
    return out


# ---- live PEFT models ------------------------------------------------------------------------


def _lora_layers(peft_model, adapter_name: str) -> Iterable[tuple[str, Any, Tensor, Tensor]]:
    """(base-model name, layer, A, B) for every LoRA layer carrying `adapter_name`."""
    from peft.tuners.adalora import AdaLoraLayer
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or isinstance(module, AdaLoraLayer):  # AdaLoRA: _adapter_factors
            continue
        base_name = name.removeprefix(PEFT_PREFIX)
        if adapter_name in module.lora_A:  # Linear, Conv1D, ConvNd: nn.Linear/ConvNd factors
            yield base_name, module, module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        elif adapter_name in getattr(module, "lora_embedding_A", {}):  # Embedding: raw Parameters
            yield base_name, module, module.lora_embedding_A[adapter_name], module.lora_embedding_B[adapter_name]


def _dora_magnitude_change(module, adapter_name: str) -> float:
    """Mean |m − m₀|/m₀ over output units, m₀ = per-output norm of the base weight W.

    PEFT initialises m = ‖W + s·B·A‖ (row norms of W in (d_out × d_in) layout; dora.py get_weight_norm),
    which is ‖W‖ under the default B = 0 init, so this is 0 at init and measures how far training moved
    the magnitudes. With a non-zero B at init it starts above 0.
    """
    from peft.utils.integrations import dequantize_module_weight
    from peft.utils.other import transpose

    mag = module.lora_magnitude_vector[adapter_name]
    m = mag.weight.detach().float().flatten()  # (d_out,)
    W = transpose(dequantize_module_weight(module.get_base_layer()).detach(), mag.fan_in_fan_out).float()
    m0 = W.reshape(W.shape[0], -1).norm(dim=1).to(m.device)  # (d_out,), as PEFT's norm
    keep = m0 > 0
    return float(((m - m0).abs()[keep] / m0[keep]).mean()) if bool(keep.any()) else 0.0


def _adapter_factors(peft_model, adapter_name: str) -> Iterable[tuple[str, Any, Tensor, Tensor, float, str]]:
    """(base-model name, layer, A, B, s, note) with ΔW = s·B·A for every LoRA, AdaLoRA and VeRA layer.

    AdaLoRA's ΔW = P·Λ·Q · α/(r + 1e-5) (peft's SVDLinear.get_delta_weight): A = Λ·Q (Λ scales Q's rows),
    B = P. VeRA's ΔW = Λ_b·B·Λ_d·A with the shared frozen A (r × max in) and B (max out × r) sliced to the
    module's shape (peft's vera Linear): A = Λ_d·A[:, :in], B = Λ_b·B[:out, :], s = 1.
    """
    from peft.tuners.adalora import AdaLoraLayer
    from peft.tuners.vera import VeraLayer

    for name, module in peft_model.named_modules():
        base_name = name.removeprefix(PEFT_PREFIX)
        if isinstance(module, AdaLoraLayer) and adapter_name in module.lora_E:
            A = module.lora_A[adapter_name] * module.lora_E[adapter_name]  # (r, in): Λ·Q
            s = module.scaling[adapter_name] / (float(module.ranknum[adapter_name]) + 1e-5)
            yield base_name, module, A, module.lora_B[adapter_name], s, NOTE_ADALORA
        elif isinstance(module, VeraLayer) and adapter_name in module.vera_lambda_d:
            A = module.vera_lambda_d[adapter_name][:, None] * module.vera_A[adapter_name][:, : module.in_features]
            B = module.vera_lambda_b[adapter_name][:, None] * module.vera_B[adapter_name][: module.out_features, :]
            yield base_name, module, A, B, 1.0, NOTE_VERA
    for base_name, module, A, B in _lora_layers(peft_model, adapter_name):
        yield base_name, module, A, B, module.scaling[adapter_name], ""


@torch.no_grad()
def capture_reference(peft_model, adapter_name: str = "default") -> dict[str, tuple[Tensor, Tensor]]:
    """Clone the current (A, B) of every LoRA layer: the (A₀, B₀) of model_spectra(reference=...).

    Call right after the adapter is initialised when init moves the base weights (PiSSA, OLoRA).
    The clones stay on the factors' device (they are as small as the adapter).
    """
    return {name: (A.detach().clone(), B.detach().clone()) for name, _, A, B in _lora_layers(peft_model, adapter_name)}


@torch.no_grad()
def model_spectra(
    peft_model, reference: Mapping[str, tuple[Tensor, Tensor]] | None = None, adapter_name: str = "default"
) -> dict[str, ModuleSpectrum]:
    """σ(ΔW) for every LoRA layer of a live PEFT model, keyed by base-model module name.

    Reads lora_A, lora_B and scaling exactly as PEFT's get_delta_weight does (the fan_in_fan_out
    transpose does not change σ). With `reference` (from capture_reference), ΔW is measured against
    the original base: s·(B·A − B₀·A₀). For DoRA, sigma is the directional part and
    magnitude_change reports the learned magnitude vector's move. AdaLoRA and VeRA layers give the σ of
    their own ΔW forms (see _adapter_factors).
    """
    factors, notes, magnitude = {}, {}, {}
    for name, module, A, B, s, note in _adapter_factors(peft_model, adapter_name):
        factors[name] = (A, B, s)
        notes[name] = note
        if adapter_name in getattr(module, "lora_magnitude_vector", {}):
            notes[name] = NOTE_DORA
            magnitude[name] = _dora_magnitude_change(module, adapter_name)
    if not factors:
        raise ValueError(
            f"no LoRA layer with adapter {adapter_name!r} in this model; "
            f"adapters present: {sorted(getattr(peft_model, 'peft_config', {}) or [])}"
        )
    return _spectra_from_factors(factors, reference, notes, magnitude)


# ---- saved adapter folders -------------------------------------------------------------------

# base_model.model.<name>.lora_A.weight (Linear/Conv), <name>.lora_embedding_A (Embedding), AdaLoRA's <name>.lora_A,
# .lora_E, .lora_B (Parameters), VeRA's <name>.vera_lambda_b / _d; no adapter name in saved keys.
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<name>.+)\.(?P<part>lora_A|lora_B|lora_E|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector|vera_lambda_b|vera_lambda_d)(?:\.weight)?$"
)
ADAPTER_TYPES = ("LORA", "ADALORA", "VERA")


def _kind(config: Mapping[str, Any]) -> str:
    t = config.get("peft_type")
    return str(getattr(t, "value", t))


Factors = dict[str, tuple[Tensor, Tensor, float]]


def load_adapter(
    adapter_dir: str | Path, shapes: Mapping[str, tuple[int, int]] | None = None
) -> tuple[dict[str, Any], Factors, set[str]]:
    """(adapter config, {name: (A, B, scaling)} with ΔW = scaling·B·A, names with a DoRA magnitude) from a PEFT
    LoRA, AdaLoRA or VeRA folder.

    peft reads the folder (PeftConfig.from_pretrained, load_peft_weights); LoRA's scaling follows peft's rule:
    lora_alpha/r, or lora_alpha/√r with use_rslora, with rank_pattern and alpha_pattern looked up by peft's own
    get_pattern_key. AdaLoRA: A = Λ·Q, B = P, scaling α/(init_r + 1e-5) (peft keeps the initial rank as the
    divisor after pruning). VeRA needs each module's (in, out) in `shapes` (the files hold the shared A, B at
    the largest size and per-module vectors only).
    """
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    folder = Path(adapter_dir)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(
            f"{folder} has no adapter_config.json; expected a PEFT adapter folder "
            "(adapter_config.json + adapter_model.safetensors or .bin)"
        )
    if not any((folder / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise FileNotFoundError(
            f"{folder} has adapter_config.json but no adapter_model.safetensors or adapter_model.bin"
        )
    cfg = PeftConfig.from_pretrained(str(folder))
    kind = str(getattr(cfg.peft_type, "value", cfg.peft_type))
    if kind not in ADAPTER_TYPES:
        raise ValueError(
            f"{folder}: peft_type is {kind!r}; spectra need a LoRA, AdaLoRA or VeRA adapter ({', '.join(ADAPTER_TYPES)})"
        )
    state = load_peft_weights(str(folder), device="cpu")
    parts: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        m = _KEY.match(key)
        if m:
            parts.setdefault(m["name"], {})[m["part"].replace("embedding_", "")] = tensor
    if kind == "VERA":
        factors, dora = _vera_factors(folder, state, parts, shapes), set()
    else:
        factors, dora = _lora_factors(folder, cfg, parts, kind)
    if not factors:
        raise ValueError(
            f"{folder}: no adapter weights found among {len(state)} tensors "
            f"(e.g. {list(state)[:3]}); is this a PEFT LoRA adapter?"
        )
    return cfg.to_dict(), factors, dora


def _lora_factors(folder: Path, cfg, parts: Mapping[str, Mapping[str, Tensor]], kind: str) -> tuple[Factors, set[str]]:
    from peft.utils.other import get_pattern_key

    rank_pattern, alpha_pattern = cfg.rank_pattern or {}, getattr(cfg, "alpha_pattern", None) or {}
    factors, dora = {}, set()
    for name in sorted(parts, key=natural_key):
        p = parts[name]
        if "lora_A" not in p or "lora_B" not in p:
            raise ValueError(f"{folder}: module {name} has {sorted(p)} but needs both lora_A and lora_B")
        if kind == "ADALORA":  # rank_pattern holds masks; the files keep only the unpruned triplets
            if "lora_E" not in p:
                raise ValueError(f"{folder}: AdaLoRA module {name} has no lora_E (its singular values)")
            factors[name] = (
                p["lora_E"].reshape(-1, 1) * p["lora_A"],
                p["lora_B"],
                cfg.lora_alpha / (cfg.init_r + 1e-5),
            )
            continue
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), cfg.r)
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), cfg.lora_alpha)
        if p["lora_A"].shape[0] != r:
            raise ValueError(
                f"{folder}: {name}.lora_A has {p['lora_A'].shape[0]} rows but adapter_config gives "
                f"r = {r} (r / rank_pattern); the folder's config and weights disagree"
            )
        factors[name] = (p["lora_A"], p["lora_B"], alpha / math.sqrt(r) if cfg.use_rslora else alpha / r)
        if "lora_magnitude_vector" in p:
            dora.add(name)
    return factors, dora


def _vera_factors(
    folder: Path, state: Mapping[str, Tensor], parts: Mapping[str, Mapping[str, Tensor]], shapes
) -> Factors:
    shared = {k.rsplit(".", 1)[-1]: v for k, v in state.items() if k.endswith(("vera_A", "vera_B"))}
    if set(shared) != {"vera_A", "vera_B"}:
        raise ValueError(f"{folder}: VeRA adapter without its shared vera_A/vera_B (saved with save_projection=False)")
    factors = {}
    for name in sorted(parts, key=natural_key):
        p = parts[name]
        if shapes is None or name not in shapes:
            raise ValueError(f"{folder}: VeRA spectra need the base model's shape of {name} (give the base's anatomy)")
        d_in, d_out = shapes[name]
        A = p["vera_lambda_d"][:, None] * shared["vera_A"][:, :d_in]  # (r, in)
        B = p["vera_lambda_b"][:, None] * shared["vera_B"][:d_out, :]  # (out, r)
        factors[name] = (A, B, 1.0)
    return factors


def adapter_spectra(
    adapter_dir: str | Path,
    reference: Mapping[str, tuple[Tensor, Tensor]] | str | Path | None = None,
    shapes: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, ModuleSpectrum]:
    """σ(ΔW) for every module of a saved PEFT LoRA, AdaLoRA or VeRA adapter folder; no base weights needed.

    Scaling comes from adapter_config.json: lora_alpha/r, or lora_alpha/√r with use_rslora, honouring
    rank_pattern and alpha_pattern as PEFT does. `reference` is a dict {name: (A₀, B₀)} or the folder
    of the initial adapter (PiSSA/OLoRA). DoRA folders report the directional part only. VeRA folders need
    `shapes` {name: (in, out)} (load_adapter).
    """
    kinds = {"ADALORA": NOTE_ADALORA, "VERA": NOTE_VERA}
    config, factors, dora = load_adapter(adapter_dir, shapes)
    notes = {n: NOTE_DORA_NO_BASE if n in dora else kinds.get(_kind(config), "") for n in factors}
    if isinstance(reference, (str, Path)):
        reference = {n: (A, B) for n, (A, B, _) in load_adapter(reference)[1].items()}
    return _spectra_from_factors(factors, reference, notes, {})


def factor_spectra(factors: Mapping[str, tuple[Tensor, Tensor, float]], note: str = "") -> dict[str, ModuleSpectrum]:
    """σ(s·B·A) for given factors {name: (A, B, s)} (e.g. ReLoRA's cumulative ΔW as concatenated factors)."""
    return _spectra_from_factors(dict(factors), None, dict.fromkeys(factors, note), {})


# ---- summaries -------------------------------------------------------------------------------


def heatmap(
    spectra: Mapping[str, ModuleSpectrum], value: str = "fro_norm"
) -> tuple[list[int], list[str], list[list[float | None]]]:
    """(layers, kinds, grid) with grid[i][j] = `value` of module kind j in layer i (engine.core.anatomy's grid).

    `value` is any numeric field of to_stats(): fro_norm, spectral_norm, effective_rank, stable_rank,
    energy_top1, magnitude_change, ...
    """
    stats = {n: s.to_stats() for n, s in spectra.items()}
    if stats and value not in next(iter(stats.values())):
        raise ValueError(
            f"heatmap value {value!r} is not a statistic; choose from "
            f"{[k for k, v in next(iter(stats.values())).items() if isinstance(v, float)]}"
        )
    return layer_kind_grid({n: st[value] for n, st in stats.items()})


def _subspace(M: Tensor | tuple[Tensor, Tensor], side: str) -> Tensor:
    """Orthonormal singular directions, columns sorted by σ: (d, k)."""
    if isinstance(M, tuple):  # (A, B): singular vectors of ΔW = B·A itself, via the same QR trick
        A, B = _as_2d(M[0].detach().double(), M[1].detach().double())
        Qb, Rb = torch.linalg.qr(B)  # (d_out, r), (r, r)
        Qa, Ra = torch.linalg.qr(A.mT)  # (d_in, r), (r, r)
        U, _, Vh = torch.linalg.svd(Rb @ Ra.mT)
        return Qa @ Vh.mT if side == "right" else Qb @ U  # ΔW = (Qb U) S (Qa V)ᵀ
    U, _, Vh = torch.linalg.svd(M.detach().double().reshape(M.shape[0], -1), full_matrices=False)
    return Vh.mT if side == "right" else U


def subspace_similarity(
    M1: Tensor | tuple[Tensor, Tensor], M2: Tensor | tuple[Tensor, Tensor], i_max: int, j_max: int, side: str = "right"
) -> list[list[float]]:
    """Hu et al. (LoRA, §7.2) normalised subspace similarity; grid[i-1][j-1] = φ(i, j) ∈ [0, 1].

    φ(i, j) = ‖U₁[:, :i]ᵀ U₂[:, :j]‖²_F / min(i, j), where U are top singular directions:
      side="right": M is lora_A (r × d_in) and U its right-singular vectors (input space; the paper's choice);
      side="left":  M is lora_B (d_out × r) and U its left-singular vectors (output space).
    Pass M as an (A, B) pair to use the singular vectors of ΔW = B·A itself on that side instead.
    """
    if side not in ("right", "left"):
        raise ValueError(
            f"side must be 'right' (A's input-space directions) or 'left' (B's output space), not {side!r}"
        )
    U1, U2 = _subspace(M1, side), _subspace(M2, side)
    if U1.shape[0] != U2.shape[0]:
        raise ValueError(f"the two subspaces live in different spaces ({U1.shape[0]} vs {U2.shape[0]} dims)")
    if not (1 <= i_max <= U1.shape[1] and 1 <= j_max <= U2.shape[1]):
        raise ValueError(
            f"i_max = {i_max}, j_max = {j_max}: need 1 ≤ i_max ≤ {U1.shape[1]} and 1 ≤ j_max ≤ {U2.shape[1]}"
        )
    G2 = (U1[:, :i_max].mT @ U2[:, :j_max]).square()  # (i_max, j_max) squared cosines
    cum = G2.cumsum(0).cumsum(1)  # cum[i-1, j-1] = ‖U₁ᵢᵀ U₂ⱼ‖²_F
    i = torch.arange(1, i_max + 1, dtype=cum.dtype)[:, None]
    j = torch.arange(1, j_max + 1, dtype=cum.dtype)[None, :]
    return (cum / torch.minimum(i, j)).tolist()


def to_json(spectra: Mapping[str, ModuleSpectrum]) -> dict[str, Any]:
    """JSON-ready summary of one adapter: per-module sigma + stats, totals, and layer × kind heatmaps."""
    modules = {n: s.to_stats() for n, s in spectra.items()}
    heatmaps = {}
    for value in HEATMAP_VALUES:
        layers, kinds, grid = heatmap(spectra, value)
        heatmaps[value] = {"layers": layers, "kinds": kinds, "grid": grid}
    return {"summary": summarize(modules), "modules": modules, "heatmaps": heatmaps}
