"""The memory calculator against real training runs: estimated vs measured peak, per config.

    python bench/memory_accuracy.py --quick        # 4 fill-to-max configs (T = 256) + 3 on real data (a few minutes)
    python bench/memory_accuracy.py                # 10 fill-to-max configs, incl. the embedded SmolLM2-135M, + 3
    python bench/memory_accuracy.py --track        # also count live tensor bytes (a second run per config)

Each config trains a few optimizer steps through engine.ml.train.train in its own subprocess (a fresh
interpreter, as `python -m engine train` runs), so each measurement starts from a clean process.
Measured is what the trainer itself records as peak_mem_gb: torch.cuda.max_memory_allocated() on a
GPU, and on CPU the growth of peak RSS over the baseline it takes after importing torch. Estimated is
what it stores beside it (engine.core.estimate's allocated_bytes for that device).

Two kinds of data. Fill-to-max: plain-text rows (train_on all: every token is a target) whose token
lengths lie between max_seq_len − 6 and max_seq_len (longer rows are truncated), so every micro-batch
has batch_size full rows, almost every position is a target, and rows end with a short pad tail, which
gives transformers' packed block-diagonal attention mask: the calculator's worst case is the real case.
Real data (REAL_DATA): the built-in persona chats and chatterbot Q/A pairs, and an alpaca-style file
with varied lengths and max_seq_len 1024, all with train_on responses: short examples packed into few
rows, a fraction of the positions targets. There the worst case (batch_size × max_seq_len) is far off
and the estimate the run stores is sized on the data's largest micro-batch (engine.core.batching); the
table prints both.

The driver itself imports neither torch nor transformers and builds the model and data in a
subprocess too: on Linux a child's ru_maxrss starts at its parent's peak RSS (the high-water mark
carries over fork/vfork + exec), and engine/ml/train.py reads its CPU peak from ru_maxrss, so a heavy
parent would inflate every measurement. The worker also reads VmHWM (/proc/self/status, which starts
afresh at exec) and warns when the two disagree.

--track repeats each config under a TorchDispatchMode that adds up the bytes of every live tensor
storage (the CPU counterpart of max_memory_allocated) and compares it with the estimate's tensor
bytes (Estimate.tensor_bytes): that separates the calculator's tensor arithmetic from what RSS adds on
CPU (libraries loaded during the run, freed heap memory that glibc's malloc keeps resident).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# A 4-layer Llama with SmolLM2's tokenizer (49,152 tokens, tied embeddings like SmolLM2): big enough that
# weights, activations and logits are all tens to hundreds of MB, small enough for a CPU.
BENCH_MODEL = dict(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
EMBEDDED = "embedded:SmolLM2-135M-Instruct"

# name → (model, top-level config, lora, train); every config also gets BASE_TRAIN.
CONFIGS: dict[str, tuple[str, dict, dict, dict]] = {
    "r8-all-b4-t512": ("bench", {}, {"r": 8}, {"batch_size": 4, "max_seq_len": 512}),
    "r16-qv-b2-t1024": ("bench", {}, {"r": 16, "targets": ["qv"]}, {"batch_size": 2, "max_seq_len": 1024}),
    "r64-all-b1-t512": ("bench", {}, {"r": 64, "alpha": 128}, {"batch_size": 1, "max_seq_len": 512}),
    "r8-all-b8-t256-ckpt": (
        "bench",
        {},
        {"r": 8},
        {"batch_size": 8, "max_seq_len": 256, "gradient_checkpointing": True},
    ),
    "r8-all-b4-t256-dora": ("bench", {}, {"r": 8, "use_dora": True}, {"batch_size": 4, "max_seq_len": 256}),
    "r16-all-b4-t512-4bit": ("bench", {"quant": "4bit"}, {"r": 16}, {"batch_size": 4, "max_seq_len": 512}),
    "r8-attn-b2-t512-8bit": (
        "bench",
        {"quant": "8bit"},
        {"r": 8, "targets": ["attention"]},
        {"batch_size": 2, "max_seq_len": 512},
    ),
    "r16-mlp-b4-t256-fa": (
        "bench",
        {},
        {"r": 16, "targets": ["mlp"], "freeze_A": True},
        {"batch_size": 4, "max_seq_len": 256},
    ),
    "smollm2-r8-b2-t256": ("embedded", {}, {"r": 8}, {"batch_size": 2, "max_seq_len": 256}),
    "smollm2-4bit-ckpt-b4": (
        "embedded",
        {"quant": "4bit"},
        {"r": 16},
        {"batch_size": 4, "max_seq_len": 256, "gradient_checkpointing": True},
    ),
}
QUICK = {
    "r8-all-b4-t256": ("bench", {}, {"r": 8}, {"batch_size": 4, "max_seq_len": 256}),
    "r32-qv-b1-t256": ("bench", {}, {"r": 32, "targets": ["qv"]}, {"batch_size": 1, "max_seq_len": 256}),
    "r8-dora-b4-t256-ckpt": (
        "bench",
        {},
        {"r": 8, "use_dora": True},
        {"batch_size": 4, "max_seq_len": 256, "gradient_checkpointing": True},
    ),
    "r16-all-b2-t256-4bit": ("bench", {"quant": "4bit"}, {"r": 16}, {"batch_size": 2, "max_seq_len": 256}),
}
# Real data, train_on responses: the estimate sized on the data's own micro-batches (the stored estimate).
REAL_DATA = {
    "persona-smollm2-b4-t512": (
        "embedded",
        {"dataset": "builtin:persona", "train_on": "responses", "dataset_format": "auto"},
        {"r": 8},
        {"batch_size": 4, "max_seq_len": 512},
    ),
    "chatterbot-b8-t256": (
        "bench",
        {"dataset": "builtin:chatterbot", "train_on": "responses", "dataset_format": "auto"},
        {"r": 16},
        {"batch_size": 8, "max_seq_len": 256},
    ),
    "alpaca-b4-t1024": (
        "bench",
        {"dataset": "@alpaca", "train_on": "responses", "dataset_format": "auto"},
        {"r": 8},
        {"batch_size": 4, "max_seq_len": 1024},
    ),
}
BASE_TRAIN = {
    "max_steps": 3,
    "warmup_steps": 0,
    "val_split": 0.0,
    "save_every": 0,
    "eval_every": 10_000,
    "log_every": 1,
    "lr": 1e-4,
}
N_ROWS = 48
LENGTH_SLACK = 6  # token lengths in [T − slack, T] (T: the row was longer and got truncated)


# ---- inputs -----------------------------------------------------------------------------------------


def build_bench_model(home: Path) -> str:
    """The 4-layer Llama above with the embedded SmolLM2's tokenizer, saved like a hub checkpoint."""
    out = home / "llama-4x512"
    if (out / "config.json").is_file():
        return str(out)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.ml.model import ensure_embedded, load_tokenizer

    tok = load_tokenizer(str(ensure_embedded(home)))
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **BENCH_MODEL)
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def write_dataset(home: Path, tokenizer_dir: str, T: int, seed: int = 0) -> Path:
    """Plain-text rows of T − slack … T tokens (with the eos the trainer appends); T means 'truncated'."""
    out = home / f"text-{T}.jsonl"
    if out.is_file():
        return out
    from transformers import AutoTokenizer

    from tests.tiny import WORDS

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(seed)
    with out.open("w") as f:
        for _ in range(N_ROWS):
            want = rng.randint(T - LENGTH_SLACK, T)  # with eos
            if want == T:  # longer than T: the trainer truncates it to T
                text = " ".join(rng.choice(WORDS) for _ in range(2 * T))
            else:
                text = _text_of_tokens(tok, rng, want - 1)
            f.write(json.dumps({"text": text}) + "\n")
    return out


def write_alpaca(home: Path, n_rows: int = 400, seed: int = 0) -> Path:
    """An alpaca-style file with the spread of real instruction data: short instructions, an input on a third
    of the rows, outputs from a sentence to several paragraphs (a few longer than max_seq_len 1024)."""
    from tests.tiny import WORDS

    out = home / "alpaca.jsonl"
    if out.is_file():
        return out
    rng = random.Random(seed)
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))
    with out.open("w") as f:
        for _ in range(n_rows):
            row = {
                "instruction": words(rng.randint(5, 40)),
                "input": words(rng.randint(10, 120)) if rng.random() < 0.33 else "",
                "output": words(int(rng.lognormvariate(4.6, 0.8))),  # median ~100 words, long tail
            }
            f.write(json.dumps(row) + "\n")
    return out


def _text_of_tokens(tok, rng: random.Random, n: int) -> str:
    """Random words whose tokenization is exactly n tokens (words are added while they fit)."""
    from tests.tiny import WORDS

    words: list[str] = []
    while True:
        trial = words + [rng.choice(WORDS)]
        k = len(tok(" ".join(trial), add_special_tokens=False)["input_ids"])
        if k > n:
            if len(tok(" ".join(words), add_special_tokens=False)["input_ids"]) == n:
                return " ".join(words)
            words = words[:-1]  # overshot by a multi-token word: back off and try other words
            continue
        words = trial
        if k == n:
            return " ".join(words)


def run_config(name: str, spec: tuple, models: dict[str, str], data: dict[str, str], steps: int) -> dict:
    """The run's config dict (RunConfig.from_dict validates it in the worker)."""
    model, top, lora, train = spec
    T = train["max_seq_len"]
    top = dict(top)
    if top.get("dataset", "").startswith("@"):  # a file written by setup()
        top["dataset"] = data[top["dataset"][1:]]
    return {
        "model": models[model],
        "dataset": data.get(str(T), ""),
        "dataset_format": "text",
        "train_on": "all",
        "dtype": "auto",
        "name": name,
        **top,
        "lora": {"alpha": 2 * lora.get("r", 8), **lora},
        "train": {**BASE_TRAIN, "max_steps": steps, **train},
    }


# ---- live tensor bytes (CPU counterpart of torch.cuda.max_memory_allocated) ---------------------------


def live_tensor_tracker():
    """A TorchDispatchMode that adds up the bytes of every distinct live tensor storage an op creates.

    Storages are keyed by data pointer and dropped through a weak reference when freed, so `peak` is the
    most tensor memory alive at once. Tensors made outside aten ops (safetensors' mmapped weights) are
    added by hand (track()).
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveTensorBytes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live: dict[int, tuple[int, weakref.ref]] = {}
            self.current = self.peak = 0

        def _free(self, key: int) -> None:
            entry = self.live.pop(key, None)
            if entry is not None:
                self.current -= entry[0]

        def track(self, t) -> None:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                return
            st = t.untyped_storage()
            key, n = st.data_ptr(), st.nbytes()
            if not n or key in self.live:
                return
            self.live[key] = (n, weakref.ref(st, lambda _r, k=key: self._free(k)))
            self.current += n
            self.peak = max(self.peak, self.current)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                self.track(t)
            return out

    return LiveTensorBytes()


# ---- the worker (one config, one fresh process) -----------------------------------------------------


def rss_gb(field: str | None = None) -> float:
    """Current RSS, or a field of /proc/self/status such as VmHWM (the peak RSS of this exec image)."""
    if field is None:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith(field + ":"))
    return int(line.split()[1]) / 2**20  # kB


def setup(home: Path, Ts: list[int], embedded: bool, out: Path) -> None:
    models = {"bench": build_bench_model(home)}
    if embedded:
        from engine.ml.model import ensure_embedded

        models["embedded"] = str(ensure_embedded(home))
    data = {T: str(write_dataset(home, models["bench"], T)) for T in Ts}
    data["alpaca"] = str(write_alpaca(home))
    out.write_text(json.dumps({"models": models, "data": data}))


def worker(cfg_path: Path, home: Path, out: Path, track: bool) -> None:
    import warnings

    from engine.core import estimate as E
    from engine.core.config import RunConfig
    from engine.core.events import ListSink
    from engine.ml import model as M
    from engine.ml.train import train

    warnings.filterwarnings("ignore")
    cfg = RunConfig.from_file(cfg_path)
    tracker = live_tensor_tracker() if track else None
    if tracker is not None:
        attach = M.attach_lora

        def attach_and_track(*a, **k):  # the loaded weights did not come from aten ops: count them here
            model = attach(*a, **k)
            for t in [*model.parameters(), *model.buffers()]:
                tracker.track(t)
                for v in vars(t).values():  # Int8Params' SCB
                    tracker.track(v)
                qs = getattr(t, "quant_state", None)
                while qs is not None:  # Params4bit: absmax, code, nested state
                    for k2 in ("absmax", "code", "offset"):
                        tracker.track(getattr(qs, k2, None))
                    qs = getattr(qs, "state2", None)
            return model

        M.attach_lora = attach_and_track
    sink = ListSink()
    t0 = time.time()
    base = rss_gb()  # what train() takes as its baseline: torch and the engine are imported
    if tracker is not None:
        with tracker:
            result = train(cfg, home / "runs" / cfg.name, sink, home=home)
    else:
        result = train(cfg, home / "runs" / cfg.name, sink, home=home)
    from engine.ml.data import prepare

    anatomy = M.inspect_model(cfg.model, home)
    device = result.device.split(":")[0]
    facts = prepare(cfg, M.load_tokenizer(M.resolve_model(cfg.model, home)), home / "cache" / "datasets").facts(cfg)
    est = E.estimate(anatomy, cfg, device, data=facts)  # what the run stored (est_mem_gb)
    worst = E.estimate(anatomy, cfg, device)
    out.write_text(
        json.dumps(
            {
                "name": cfg.name,
                "device": result.device,
                "measured_gb": result.peak_mem_gb,
                "vmhwm_growth_gb": rss_gb("VmHWM") - base,
                "stored_est_gb": sink.summary.get("est_mem_gb"),
                "est_gb": E.gb(est.allocated_bytes),
                "worst_gb": E.gb(worst.allocated_bytes),
                "batch": est.batch_note,
                "est_tensor_gb": E.gb(est.tensor_bytes),
                "tracked_gb": E.gb(tracker.peak) if tracker is not None else None,
                "terms": {label: E.gb(b) for label, b, _ in est.table_rows()},
                "packing": result.extra.get("packing"),
                "steps": result.steps_done,
                "seconds": time.time() - t0,
            }
        )
    )


# ---- the driver ---------------------------------------------------------------------------------------


def child(args: list[str], home: Path, threads: int, what: str) -> None:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "LORALAB_TRAIN_THREADS": str(threads),
        "LORALAB_HOME": str(home),
    }
    p = subprocess.run(
        [sys.executable, __file__, "--home", str(home), *args], env=env, cwd=ROOT, capture_output=True, text=True
    )
    if p.returncode != 0:
        sys.exit(f"{what} failed:\n{p.stderr[-4000:]}")


def run_worker(cfg: dict, home: Path, track: bool, threads: int) -> dict:
    cfg_path = home / f"{cfg['name']}.json"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    out = home / f"{cfg['name']}{'-track' if track else ''}.result.json"
    child(["--worker", str(cfg_path), "--out", str(out)] + (["--track"] if track else []), home, threads, cfg["name"])
    res = json.loads(out.read_text())
    if res["stored_est_gb"] is not None and abs(res["stored_est_gb"] - res["est_gb"]) > 1e-3 * res["est_gb"]:
        print(f"  warning: the run stored {res['stored_est_gb']:.3f} GB, the estimate here is {res['est_gb']:.3f} GB")
    if res["device"] == "cpu" and abs(res["vmhwm_growth_gb"] - res["measured_gb"]) > 0.02 * res["vmhwm_growth_gb"]:
        print(
            f"  warning: the trainer measured {res['measured_gb']:.3f} GB but VmHWM grew "
            f"{res['vmhwm_growth_gb']:.3f} GB (ru_maxrss inherited from a parent?)"
        )
    return res


def err(est: float, measured: float) -> float:
    return (est - measured) / measured if measured else float("inf")


def result_line(name: str, r: dict, track: bool) -> str:
    what = "RSS" if r["device"] == "cpu" else "alloc"
    line = (
        f"{name:<24} {r['device']:<6} {r['est_gb']:7.3f} {r['measured_gb']:8.3f} {what:<2} "
        f"{err(r['est_gb'], r['measured_gb']):+7.1%} {r['worst_gb']:10.3f} {err(r['worst_gb'], r['measured_gb']):+7.1%}"
    )
    if track:
        line += (
            f" {r['est_tensor_gb']:11.3f} {r['tracked_gb']:12.3f} "
            f"{err(r['est_tensor_gb'], r['tracked_gb']):+7.1%}"
            f" {r['measured_gb'] - r['tracked_gb']:9.3f}"
        )
    return line + f"   ({r['seconds']:.0f} s)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 small configs on the 4-layer model (T = 256)")
    ap.add_argument("--only", nargs="*", help="run only these config names")
    ap.add_argument("--track", action="store_true", help="also measure live tensor bytes (a second run per config)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--home", help="a data home to reuse (default: a temporary one)")
    ap.add_argument("--steps", type=int, help="optimizer steps per config (default 3; 2 with --quick)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--setup", nargs="*", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--embedded", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(Path(args.worker), Path(args.home), Path(args.out), args.track)
        return 0
    if args.setup is not None:
        setup(Path(args.home), args.setup, args.embedded, Path(args.out))
        return 0

    t_start = time.time()
    home = Path(args.home or tempfile.mkdtemp(prefix="loralab-membench-"))
    configs = {**(QUICK if args.quick else CONFIGS), **REAL_DATA}
    if args.only:
        configs = {k: v for k, v in {**CONFIGS, **QUICK, **REAL_DATA}.items() if k in args.only}
    steps = args.steps or (2 if args.quick else 3)
    Ts = sorted({spec[3]["max_seq_len"] for name, spec in configs.items() if name not in REAL_DATA})
    embedded = any(spec[0] == "embedded" for spec in configs.values())
    child(
        ["--setup", *map(str, Ts), "--out", str(home / "setup.json")] + (["--embedded"] if embedded else []),
        home,
        args.threads,
        "setup",
    )
    prepared = json.loads((home / "setup.json").read_text())
    print(
        f"data home {home}; bench model: Llama {BENCH_MODEL['num_hidden_layers']} layers × hidden "
        f"{BENCH_MODEL['hidden_size']}, SmolLM2 tokenizer (vocab 49,152); {steps} steps per config; "
        f"{args.threads} threads",
        flush=True,
    )
    head = (
        f"{'config':<24} {'device':<6} {'est GB':>7} {'measured GB':>11} {'error':>7} {'worst case':>10} {'error':>7}"
    )
    if args.track:
        head += f" {'est tensors':>11} {'live tensors':>12} {'error':>7} {'RSS−live':>9}"
    print(head)
    rows = []
    for name, spec in configs.items():
        cfg = run_config(name, spec, prepared["models"], prepared["data"], steps)
        r = run_worker(cfg, home, False, args.threads)
        if args.track:
            r["tracked_gb"] = run_worker(cfg, home, True, args.threads)["tracked_gb"]
        rows.append(r)
        print(result_line(name, r, args.track), flush=True)
    worst = max(rows, key=lambda r: abs(err(r["est_gb"], r["measured_gb"])))
    print(
        f"\nworst case: {worst['name']}: estimated {worst['est_gb']:.3f} GB, measured {worst['measured_gb']:.3f} GB "
        f"({err(worst['est_gb'], worst['measured_gb']):+.1%}); measured = "
        + (
            "peak RSS growth over the trainer's baseline (CPU)"
            if worst["device"] == "cpu"
            else "torch.cuda.max_memory_allocated"
        )
    )
    if args.track:
        tw = max(rows, key=lambda r: abs(err(r["est_tensor_gb"], r["tracked_gb"])))
        print(f"worst tensor-level case: {tw['name']}: {err(tw['est_tensor_gb'], tw['tracked_gb']):+.1%}")
    print(f"total time {time.time() - t_start:.0f} s")
    limit = 0.15 if worst["device"] == "cpu" else 0.10
    return 0 if abs(err(worst["est_gb"], worst["measured_gb"])) <= limit else 1


if __name__ == "__main__":
    sys.exit(main())
