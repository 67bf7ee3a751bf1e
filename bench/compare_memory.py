"""Peak memory of ONE chat worker serving the base model + 3 adapters vs 4 separate loads (one per pane).

    python bench/compare_memory.py --quick          # embedded SmolLM2-135M, 8 new tokens per pane
    python bench/compare_memory.py --json

Three LoRA adapters (all-linear, random non-zero A and B via peft's init_lora_weights=False, different
seeds) are written to a temporary folder; no training is needed for a memory figure. Then:

  shared:   one worker process (engine.core.chat.ChatWorker → `python -m engine.ml.generate`) loads the base once,
            attaches the 3 adapters by name and answers one prompt in 4 panes (base + 3 adapters).
  separate: 4 worker processes, one after another, each loading the base (+ its one adapter) and
            answering the same prompt: what holding 4 copies of the model would take.

Each worker reports its own peak: RSS high-water mark (VmHWM) on CPU, torch.cuda.max_memory_allocated
on a GPU, plus its RSS right after importing torch (the per-process floor). Printed: the peaks, the
sum of the 4 separate peaks, their ratio to the shared worker's peak, and the same ratio for the model
alone (peak minus the floor), which is the part that scales with the model's size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.core.config import EMBEDDED_MODEL  # noqa: E402

PROMPT = [{"role": "user", "content": "Who are you? Answer in one sentence."}]


def make_adapters(base: str, home: Path, out: Path, n: int, r: int) -> dict[str, str]:
    """n random LoRA adapters on `base` (all linear layers), each saved as a PEFT folder."""
    import torch
    from peft import LoraConfig, get_peft_model

    from engine.core.config import RunConfig
    from engine.ml import model as M

    ref = M.resolve_model(base, home)
    model = M.load_base_model(ref, RunConfig(model=base), torch.device("cpu"), for_training=False)
    dirs = {}
    for i in range(n):
        torch.manual_seed(100 + i)
        cfg = LoraConfig(
            r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"
        )
        pm = get_peft_model(model, cfg)
        d = out / f"adapter{i}"
        pm.save_pretrained(d)
        dirs[f"adapter{i}"] = str(d)
        model = pm.unload()  # back to the plain base for the next one
    return dirs


def peak_of(info: dict) -> tuple[float, float, str]:
    """(peak, floor, unit) in GiB: CUDA max allocated on a GPU, RSS high-water mark on CPU."""
    if info.get("cuda_max_allocated_gb") is not None:
        return info["cuda_max_allocated_gb"], 0.0, "CUDA max allocated"
    return info["peak_rss_gb"], info.get("startup_rss_gb") or 0.0, "RSS peak"


def serve(home: Path, base: str, adapters: dict[str, str], panes: list[str | None], params) -> dict:
    """One worker: load, attach, answer every pane; its final report and the wall time."""
    from engine.core.chat import ChatWorker

    w = ChatWorker(home)
    t0 = time.perf_counter()
    try:
        w.start(base)
        for name, d in adapters.items():
            w.ensure_adapter(name, d)
        texts: dict = {}
        for pane, delta in w.stream_many([(i, PROMPT, a) for i, a in enumerate(panes)], params):
            texts[pane] = texts.get(pane, "") + delta
        info = w.report()
    finally:
        w.close()
    return {"info": info, "seconds": time.perf_counter() - t0, "texts": texts}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 new tokens per pane, r 8 (the default is 32 tokens, r 16)")
    ap.add_argument("--base", default=EMBEDDED_MODEL)
    ap.add_argument(
        "--home", help="data home (default $LORALAB_HOME or ~/.loralab): where the embedded model is converted"
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from engine.core.chat import GenParams
    from engine.core.home import data_home

    home = data_home(args.home)
    params = GenParams(max_new_tokens=8 if args.quick else 32, temperature=0.7, seed=0)
    with tempfile.TemporaryDirectory(prefix="loralab-bench-") as tmp:
        adapters = make_adapters(args.base, home, Path(tmp), 3, 8 if args.quick else 16)
        names = list(adapters)
        shared = serve(home, args.base, adapters, [None, *names], params)
        separate = [serve(home, args.base, {}, [None], params)]
        separate += [serve(home, args.base, {n: adapters[n]}, [n], params) for n in names]

    # each pane of the shared worker equals that model served alone (same seed, same weights)
    same = all(separate[k]["texts"][0] == shared["texts"][k] for k in range(4))
    s_peak, s_floor, unit = peak_of(shared["info"])
    sep = [peak_of(x["info"]) for x in separate]
    sep_sum = sum(p for p, _, _ in sep)
    sep_model = sum(p - f for p, f, _ in sep)
    result = {
        "base": args.base,
        "device": shared["info"].get("device"),
        "measure": unit,
        "base_weights_gb": shared["info"]["base_bytes"] / 2**30,
        "lora_weights_gb": shared["info"]["lora_bytes"] / 2**30,
        "shared_peak_gb": s_peak,
        "shared_floor_gb": s_floor,
        "separate_peaks_gb": [p for p, _, _ in sep],
        "separate_sum_gb": sep_sum,
        "ratio_separate_over_shared": sep_sum / s_peak,
        "ratio_model_only": sep_model / (s_peak - s_floor) if s_peak > s_floor else None,
        "shared_seconds": shared["seconds"],
        "separate_seconds": sum(x["seconds"] for x in separate),
        "replies_identical": same,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(
        f"{args.base} on {result['device']}: base weights {result['base_weights_gb']:.3f} GB, 3 adapters "
        f"{result['lora_weights_gb'] * 1024:.1f} MB ({unit})"
    )
    print(
        f"  one worker, base + 3 adapters, 4 panes : peak {s_peak:.3f} GB (floor after imports {s_floor:.3f} GB), "
        f"{result['shared_seconds']:.1f} s"
    )
    print(
        "  4 separate loads, one pane each        : peaks "
        + ", ".join(f"{p:.3f}" for p, _, _ in sep)
        + f" GB → sum {sep_sum:.3f} GB, {result['separate_seconds']:.1f} s"
    )
    print(f"  ratio (4 separate / 1 shared)          : {result['ratio_separate_over_shared']:.2f}x")
    if result["ratio_model_only"] is not None:
        print(f"  ratio, model memory only (peak − floor): {result['ratio_model_only']:.2f}x")
    print(f"  each pane's reply equals that model alone: {'yes' if same else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
