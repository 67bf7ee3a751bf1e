"""Useful (non-padding) training tokens per second: LoRA Lab's engine vs transformers.Trainer + peft.

    python bench/throughput.py --quick          # tiny Llama (CI-sized) + the embedded SmolLM2
    python bench/throughput.py --setting tiny --rounds 3 --steps 60

Both arms train the same model, the same tokenized examples in the SAME batches (the Trainer gets our
epoch order through a sequential sampler), the same LoRA config, optimizer (AdamW), constant lr,
clipping and seed. The reference uses its usual collator, padding each batch to its longest example
(DataCollatorForSeq2Seq). Each arm runs in its own subprocess, alternating A B A B, so machine noise
hits both alike; throughput is measured between optimizer-step timestamps after a warm-up, so model
loading is not counted for either. Printed: tokens/s per arm (median over rounds), their ratio, the
padding fraction, the final losses (mean of the last steps), which must agree within 2 % (a faster run
that learns less would not count), the peak memory of each arm (growth of peak RSS over the worker's
baseline after `import torch` on CPU, torch.cuda.max_memory_allocated on GPU), and the engine's MFU:
training FLOP/s over this machine's matmul peak in the same dtype, measured by the bench in the same run (in each engine worker right after its steps, so both see the same load).

The Trainer runs at its best setting here: bf16=True where bf16 is fast on the device (the engine's own
rule, engine.ml.resources.bf16_choice: CUDA with bf16, or a CPU with AVX512-BF16/AMX confirmed by a
probe), else fp32; the engine runs with dtype auto, the same choice. `--json` prints one JSON object keyed
by setting. On a shared machine every figure is noisy: alternate rounds and read the ratio, not the rate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETTINGS = {
    # A tiny Llama over SmolLM2's real 49k-token tokenizer, on chatterbot-corpus (lengths vary ~25–250 tokens).
    "tiny": {
        "model": "tiny",
        "dataset": "builtin:chatterbot",
        "batch_size": 8,
        "max_seq_len": 256,
        "steps": 40,
        "quick_steps": 24,
        "lr": 1e-3,
        "r": 8,
    },
    # The embedded SmolLM2-135M-Instruct on the same data.
    "smollm2": {
        "model": "embedded:SmolLM2-135M-Instruct",
        "dataset": "builtin:chatterbot",
        "batch_size": 8,
        "max_seq_len": 256,
        "steps": 10,
        "quick_steps": 6,
        "lr": 2e-4,
        "r": 8,
    },
}
WARMUP_STEPS = 2  # steps excluded from the rate (allocator warm-up, first-call overheads)
LAST_K = 5  # final loss = mean over the last K steps


def build_tiny(home: Path) -> str:
    """A 2-layer Llama (GQA) with SmolLM2's tokenizer and chat template, saved like a hub checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.ml.model import ensure_embedded, load_tokenizer

    out = home / "tiny-llama"
    if (out / "config.json").is_file():
        return str(out)
    tok = load_tokenizer(str(ensure_embedded(home)))
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
        )
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def run_config(s: dict, model: str):
    from engine.core.config import RunConfig

    return RunConfig.from_dict(
        {
            "model": model,
            "dataset": s["dataset"],
            "lora": {"r": s["r"], "alpha": 2 * s["r"], "dropout": 0.0, "targets": "all-linear"},
            "train": {
                "lr": s["lr"],
                "scheduler": "constant",
                "warmup_steps": 0,
                "max_steps": s["steps"],
                "batch_size": s["batch_size"],
                "max_seq_len": s["max_seq_len"],
                "val_split": 0.0,
                "save_every": 0,
                "eval_every": 10_000,
                "seed": 1234,
                "max_grad_norm": 1.0,
            },
        }
    )


def rate(step_times: list[float], step_tokens: list[int]) -> float:
    """Useful tokens per second between the end of the warm-up step and the last step."""
    k = WARMUP_STEPS
    return sum(step_tokens[k:]) / (step_times[-1] - step_times[k - 1])


# ---- the two arms (each runs in its own subprocess) ---------------------------------------------------


def arm_engine(cfg, home: Path) -> dict:
    from engine.core.events import ListSink
    from engine.ml.train import train

    class Timed(ListSink):
        def log(self, step, metrics):
            super().log(step, {**metrics, "_t": time.perf_counter()})

    sink = Timed()
    train(cfg, home / "engine-run", sink, home=home)
    steps = [(s, m) for s, m in sink.metrics if "train/loss" in m]
    tokens = [m["tokens_seen"] for _, m in steps]
    return {
        "times": [m["_t"] for _, m in steps],
        "tokens": [b - a for a, b in zip([0] + tokens, tokens)],
        "losses": [m["train/loss"] for _, m in steps],
        "pad_frac": statistics.mean(m["pad_frac"] for _, m in steps),
    }


def arm_trainer(cfg, home: Path) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from engine.ml import data as D
    from engine.ml import model as M

    torch.manual_seed(cfg.train.seed)
    ref = M.resolve_model(cfg.model, home)
    tok = M.load_tokenizer(ref)
    device = M.pick_device()
    base = M.load_base_model(ref, cfg, device)
    model = get_peft_model(base, M.lora_config(cfg, M.describe(base)))
    prep = D.prepare(cfg, tok, cache_dir=home / "cache" / "datasets")
    # Our engine's exact example order, so both arms see identical batches.
    order, it = [], D.micro_batches(len(prep.train), cfg.train.batch_size, cfg.train.seed)
    for _ in range(cfg.train.max_steps):
        order.extend(next(it))
    rows = [{"input_ids": list(prep.train[i].input_ids), "labels": list(prep.train[i].labels)} for i in order]

    class Sequential(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(
                train_dataset if train_dataset is not None else self.train_dataset
            )

    times, losses, tokens, pads = [], [], [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    collator = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=D.IGNORE)
    bs = cfg.train.batch_size
    for i in range(0, len(rows), bs):  # useful tokens and padding of each batch, as the collator makes them
        lens = [len(r["input_ids"]) for r in rows[i : i + bs]]
        tokens.append(sum(lens))
        pads.append(1 - sum(lens) / (max(lens) * len(lens)))
    args = TrainingArguments(
        output_dir=str(home / "trainer-run"),
        per_device_train_batch_size=bs,
        max_steps=cfg.train.max_steps,
        learning_rate=cfg.train.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=cfg.train.max_grad_norm,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=cfg.train.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        optim="adamw_torch",
        bf16=M.compute_dtype(cfg, device) == torch.bfloat16,  # dtype auto: bf16 where it is fast here
        use_cpu=device.type == "cpu",
        disable_tqdm=True,
    )
    Sequential(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[Clock()]).train()
    return {"times": times, "tokens": tokens[: len(times)], "losses": losses, "pad_frac": statistics.mean(pads)}


def worker(arm: str, setting: str, home: Path, steps: int | None, out: Path) -> None:
    import torch

    from engine.ml.model import pick_device
    from engine.ml.resources import peak_mem_gb, rss_gb

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    device = pick_device()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_base = rss_gb()
    s = dict(SETTINGS[setting])
    if steps:
        s["steps"] = steps
    model = build_tiny(home) if s["model"] == "tiny" else s["model"]
    cfg = run_config(s, model)
    res = (arm_engine if arm == "engine" else arm_trainer)(cfg, home)
    res["peak_gb"] = peak_mem_gb(device, rss_base)
    res["tok_per_s"] = rate(res["times"], res["tokens"])
    if arm == "engine":
        res["flop_per_s"] = train_flops(cfg, home, len(res["times"])) / (
            res["times"][-1] - res["times"][WARMUP_STEPS - 1]
        )
        # the matmul peak right after the steps, in the same process, threads and dtype: the MFU's denominator
        # then sees the same machine load as its numerator (a shared machine's load changes between rounds)
        res["peak_gflops"] = matmul_peak(os.environ.get("BENCH_DTYPE", "fp32"))
    res["final_loss"] = statistics.mean(res["losses"][-LAST_K:])
    out.write_text(json.dumps(res))


# ---- FLOPs and the machine's peak -------------------------------------------------------------------


def train_flops(cfg, home: Path, steps: int) -> float:
    """Training FLOPs of the engine's timed steps (those after the warm-up), counted from the shapes.

    Per token, every frozen linear layer: forward 2·in·out + input-gradient backward 2·in·out (no weight
    gradient: frozen). LoRA on each module: x·A, (xA)·B forward, and backward the gradients of A, B and of
    their inputs: 6·r·(in + out). The output head only on the positions it runs on (the engine's chunked
    head: the target positions): 4·H·V each. Not counted: attention's score matmuls (seq² terms, small at
    these lengths), norms, activations and the optimizer, so the MFU is a slight underestimate.
    """
    from engine.core.anatomy import resolve_targets
    from engine.ml import data as D
    from engine.ml import model as M

    anatomy = M.inspect_model(cfg.model, home)
    mods = anatomy["modules"]
    chosen = resolve_targets(cfg.lora, mods, cfg.model)
    per_token = sum(4 * m["in"] * m["out"] for m in mods) + sum(6 * cfg.lora.r * (m["in"] + m["out"]) for m in chosen)
    head = 4 * anatomy["hidden_size"] * anatomy["vocab_size"]
    prep = D.prepare(cfg, M.load_tokenizer(M.resolve_model(cfg.model, home)), cache_dir=home / "cache" / "datasets")
    it = D.micro_batches(len(prep.train), cfg.train.batch_size, cfg.train.seed)
    batches = [[prep.train[i] for i in next(it)] for _ in range(steps)][WARMUP_STEPS:]
    tokens = sum(len(e.input_ids) for b in batches for e in b)
    targets = sum(e.n_label_tokens for b in batches for e in b)
    return tokens * per_token + targets * head


PEAK_SHAPES = [(1024, 1024, 1024), (1024, 576, 1536), (2048, 2048, 2048)]


def matmul_peak(dtype: str) -> float:
    """This machine's best matmul GFLOP/s in `dtype` over a few shapes (the model's MLP among them), with
    the bench's threads; on a CPU without native bf16 only a small bf16 shape (it is ~50× slower)."""
    import torch

    from engine.ml.model import pick_device
    from engine.ml.resources import matmul_gflops

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    if pick_device().type == "cuda":
        best = 0.0
        for m, k, n in PEAK_SHAPES + [(4096, 4096, 4096), (8192, 8192, 8192)]:
            a = torch.randn(m, k, device="cuda", dtype=dt)
            b = torch.randn(k, n, device="cuda", dtype=dt)
            a @ b
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(10):
                a @ b
            torch.cuda.synchronize()
            best = max(best, 10 * 2 * m * k * n / (time.perf_counter() - t) / 1e9)
        return best
    from engine.ml.resources import bf16_choice

    shapes = PEAK_SHAPES if dtype == "fp32" or bf16_choice(torch.device("cpu"))[0] else [(256, 576, 1536)]
    return max(matmul_gflops(dt, shape) for shape in shapes)


# ---- the driver ------------------------------------------------------------------------------------


def run_setting(setting: str, rounds: int, steps: int | None, home: Path, peak: float, dtype: str) -> dict:
    results = {"engine": [], "trainer": []}
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "LORALAB_TRAIN_THREADS": os.environ.get("BENCH_THREADS", str(os.cpu_count() or 1)),
        "BENCH_DTYPE": dtype,
    }
    for r in range(rounds):
        for arm in ("engine", "trainer"):  # A B A B ...
            out = home / f"{setting}-{arm}-{r}.json"
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                arm,
                "--setting",
                setting,
                "--home",
                str(home),
                "--out",
                str(out),
            ] + (["--steps", str(steps)] if steps else [])
            p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(f"{arm} arm failed:\n{p.stderr[-4000:]}")
            results[arm].append(json.loads(out.read_text()))
            say(
                f"  round {r + 1} {arm:<8} {results[arm][-1]['tok_per_s']:8.0f} tok/s  "
                f"final loss {results[arm][-1]['final_loss']:.4f}  peak {results[arm][-1]['peak_gb']:.2f} GB"
            )
    e, t = results["engine"], results["trainer"]
    summary = {
        "setting": setting,
        "engine_tok_s": statistics.median(x["tok_per_s"] for x in e),
        "trainer_tok_s": statistics.median(x["tok_per_s"] for x in t),
        "engine_loss": statistics.mean(x["final_loss"] for x in e),
        "trainer_loss": statistics.mean(x["final_loss"] for x in t),
        "engine_pad": statistics.mean(x["pad_frac"] for x in e),
        "trainer_pad": statistics.mean(x["pad_frac"] for x in t),
        "engine_peak_gb": statistics.median(x["peak_gb"] for x in e),
        "trainer_peak_gb": statistics.median(x["peak_gb"] for x in t),
        "trainer_dtype": dtype,
        "engine_dtype": dtype,
        "peak_gflops": statistics.median(x["peak_gflops"] for x in e),
        "peak_gflops_at_start": peak,
        "engine_gflops": statistics.median(x["flop_per_s"] for x in e) / 1e9,
        "engine_mfu": statistics.median(x["flop_per_s"] / 1e9 / x["peak_gflops"] for x in e),
    }
    summary["loss_engine"], summary["loss_trainer"] = summary["engine_loss"], summary["trainer_loss"]
    summary["ratio"] = summary["engine_tok_s"] / summary["trainer_tok_s"]
    summary["loss_diff"] = abs(summary["engine_loss"] - summary["trainer_loss"]) / summary["trainer_loss"]
    summary["memory_ratio"] = summary["engine_peak_gb"] / max(1e-9, summary["trainer_peak_gb"])
    return summary


def say(msg: str) -> None:
    """Progress: on stdout, or on stderr with --json (stdout is then the one JSON object)."""
    print(msg, file=sys.stderr if JSON_OUT else sys.stdout, flush=True)


JSON_OUT = False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny (2 rounds) and smollm2 (2 rounds, few steps)")
    ap.add_argument("--setting", choices=[*SETTINGS, "all"], default="all")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, help="override the optimizer steps of each arm")
    ap.add_argument("--home", help="a data home to reuse (default: a temporary one)")
    ap.add_argument("--json", action="store_true", help="print one JSON object keyed by setting")
    ap.add_argument("--worker", choices=["engine", "trainer"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.setting, Path(args.home), args.steps, Path(args.out))
        return 0

    global JSON_OUT
    JSON_OUT = args.json
    home = Path(args.home or tempfile.mkdtemp(prefix="loralab-bench-"))
    settings = list(SETTINGS) if args.setting == "all" else [args.setting]
    import torch

    from engine.ml.model import pick_device
    from engine.ml.resources import bf16_choice

    device = pick_device()
    build_tiny(home)  # converts the embedded model too: done here, so no worker's peak memory counts it
    fast, why = bf16_choice(device, home)
    dtype = "bf16" if fast else "fp32"
    peaks = {d: matmul_peak(d) for d in ("fp32", "bf16")}
    say(f"device {device.type}, threads {os.environ.get('BENCH_THREADS', os.cpu_count())}, torch {torch.__version__}")
    say(f"Trainer's best setting here and the engine's dtype auto: {dtype} ({why})")
    say(f"matmul peak measured now: fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s")
    summaries = []
    for s in settings:
        say(
            f"{s}: {SETTINGS[s]['model']} on {SETTINGS[s]['dataset']}, batch {SETTINGS[s]['batch_size']}, "
            f"{args.steps or SETTINGS[s]['quick_steps' if args.quick else 'steps']} steps × {args.rounds} rounds, "
            "alternating engine / Trainer"
        )
        steps = args.steps or (SETTINGS[s]["quick_steps"] if args.quick else None)
        summaries.append(run_setting(s, args.rounds, steps, home, peaks[dtype], dtype))
    ok = all(x["loss_diff"] <= 0.02 for x in summaries)
    if args.json:
        print(json.dumps({x["setting"]: {**x, "losses_agree": x["loss_diff"] <= 0.02} for x in summaries}, indent=1))
        return 0 if ok else 1
    print()
    print(
        f"{'setting':<9} {'dtype':>5} {'engine tok/s':>12} {'Trainer tok/s':>13} {'ratio':>6} {'peak engine':>11} "
        f"{'peak Trainer':>12} {'MFU':>6} {'pad engine':>10} {'pad Trainer':>11} {'loss engine':>11} "
        f"{'loss Trainer':>12} {'Δloss':>6}"
    )
    for x in summaries:
        print(
            f"{x['setting']:<9} {x['trainer_dtype']:>5} {x['engine_tok_s']:12.0f} {x['trainer_tok_s']:13.0f} "
            f"{x['ratio']:6.2f} {x['engine_peak_gb']:9.2f}GB {x['trainer_peak_gb']:10.2f}GB {x['engine_mfu']:6.1%} "
            f"{x['engine_pad']:10.1%} {x['trainer_pad']:11.1%} {x['engine_loss']:11.4f} {x['trainer_loss']:12.4f} "
            f"{x['loss_diff']:6.1%}"
        )
    if not ok:
        print("final losses differ by more than 2%: the comparison does not count")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
