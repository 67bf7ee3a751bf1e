"""σ(ΔW) by the QR trick vs a full SVD, on a synthetic adapter shaped like a 7B Llama.

    python bench/spectra.py            # or python -m bench.spectra; 6 sampled full SVDs (2 per shape)
    python bench/spectra.py --quick    # 3 sampled full SVDs (1 per shape), for `make bench`
    python bench/spectra.py --device cuda
    python bench/spectra.py --threads 1   # steadier figures on a shared CPU (both paths get the same threads)

32 layers × 7 modules (q, k, v, o: 4096 → 4096; gate, up: 4096 → 11008; down: 11008 → 4096), r = 16,
random A and B. The QR path runs on all 224 modules (batched per shape); the full
`torch.linalg.svdvals` of the formed ΔW (tall orientation, the faster one) runs on a sample and is
scaled to all modules by shape.
Exits 1 if any sampled σ differs from the full SVD by more than 1e-4 (relative).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

if not __package__:  # run as a script (`python bench/spectra.py`, as `make bench` does): the repo root holds engine/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.ml.spectra import batched_singular_values, singular_values

LAYERS, R, ALPHA, HIDDEN, INTERMEDIATE = 32, 16, 32.0, 4096, 11008
# kind → (d_in, d_out) of a Llama-2-7B block (no grouped-query attention: k, v are 4096 × 4096)
KINDS = {
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (HIDDEN, HIDDEN),
    "v_proj": (HIDDEN, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (HIDDEN, INTERMEDIATE),
    "up_proj": (HIDDEN, INTERMEDIATE),
    "down_proj": (INTERMEDIATE, HIDDEN),
}
MAX_REL_ERR = 1e-4


def synthetic_adapter(device: torch.device, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (A, B)} with A: (r, d_in), B: (d_out, r), Gaussian like a trained-but-unstructured adapter."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    adapter = {}
    for layer in range(LAYERS):
        for kind, (d_in, d_out) in KINDS.items():
            A = torch.randn(R, d_in, generator=g) / d_in**0.5
            B = torch.randn(d_out, R, generator=g) / R**0.5
            adapter[f"model.layers.{layer}.{kind}"] = (A.to(device), B.to(device))
    return adapter


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_qr_path(adapter, scaling: float, device: torch.device) -> tuple[float, dict[str, torch.Tensor]]:
    names = list(adapter)
    As, Bs = [adapter[n][0] for n in names], [adapter[n][1] for n in names]
    batched_singular_values(As[:7], Bs[:7], [scaling] * 7)  # warm-up: kernels, allocator
    _sync(device)
    t0 = time.perf_counter()
    sigmas = batched_singular_values(As, Bs, [scaling] * len(names))
    _sync(device)
    return time.perf_counter() - t0, dict(zip(names, sigmas))


def sample_names(per_shape: int) -> list[str]:
    """per_shape modules of each distinct (d_in, d_out), spread over the first and last layers."""
    by_shape: dict[tuple[int, int], list[str]] = {}
    for kind, shape in KINDS.items():
        by_shape.setdefault(shape, []).append(kind)
    names = []
    for kinds in by_shape.values():
        for i in range(per_shape):
            layer = 0 if i % 2 == 0 else LAYERS - 1
            names.append(f"model.layers.{layer}.{kinds[i % len(kinds)]}")
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one sampled full SVD per shape (3) instead of two (6)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        # On a busy machine OpenMP threads that outnumber free cores spin at barriers; 1 thread times steadily.
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    scaling = ALPHA / R

    adapter = synthetic_adapter(device)
    qr_s, sigmas = time_qr_path(adapter, scaling, device)
    print(
        f"device {device} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
        f"{len(adapter)} modules, r = {R}"
    )

    full_s_by_shape: dict[tuple[int, int], list[float]] = {}
    max_rel = 0.0
    for name in sample_names(1 if args.quick else 2):
        A, B = adapter[name]
        _sync(device)
        t0 = time.perf_counter()
        dW = scaling * B @ A  # forms the (d_out × d_in) ΔW
        # σ(ΔW) = σ(ΔWᵀ); LAPACK is several times faster on the tall orientation, so the baseline gets it
        # (a conservative ratio).
        full = torch.linalg.svdvals(dW if dW.shape[0] >= dW.shape[1] else dW.T)
        _sync(device)
        dt = time.perf_counter() - t0
        full_s_by_shape.setdefault((B.shape[0], A.shape[1]), []).append(dt)
        rel = ((sigmas[name] - full[:R]).abs() / full[:R]).max().item()
        max_rel = max(max_rel, rel)
        # Which side the difference comes from: both float32 results against the float64 QR path.
        truth = singular_values(A, B, scaling, float64=True)
        qr64 = ((sigmas[name].double() - truth).abs() / truth).max().item()
        full64 = ((full[:R].double() - truth).abs() / truth).max().item()
        print(
            f"  full svd {name} ({B.shape[0]}×{A.shape[1]}): {dt:.2f} s | rel err {rel:.1e} "
            f"(vs float64: qr-path {qr64:.1e}, full svd {full64:.1e})"
        )

    counts: dict[tuple[int, int], int] = {}
    for d_in, d_out in (KINDS[n.rsplit(".", 1)[1]] for n in adapter):
        counts[(d_out, d_in)] = counts.get((d_out, d_in), 0) + 1
    full_all = sum(counts[shape] * sum(ts) / len(ts) for shape, ts in full_s_by_shape.items())
    n_sampled = sum(len(ts) for ts in full_s_by_shape.values())
    print(
        f"qr-path all {len(adapter)} modules: {qr_s:.2f} s | full svd (scaled from {n_sampled}): {full_all:.0f} s | "
        f"ratio {full_all / qr_s:.0f}x | max rel err {max_rel:.1e}"
    )
    if max_rel > MAX_REL_ERR:
        print(
            f"FAIL: σ from the QR path differs from the full SVD by {max_rel:.1e} > {MAX_REL_ERR:.0e}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
