"""Useful (non-padding) training tokens per second: LoRA Lab's engine vs transformers.Trainer + peft.

    python bench/throughput.py --quick          # tiny Llama (CI-sized) + the embedded SmolLM2
    python bench/throughput.py --setting tiny --rounds 3 --steps 60

Both arms train the same model, the same tokenized examples in the SAME batches (the Trainer gets our
epoch order through a sequential sampler), the same LoRA config, optimizer (AdamW), constant lr,
clipping and seed. The reference uses its usual collator, padding each batch to its longest example
(DataCollatorForSeq2Seq). Each arm runs in its own subprocess, alternating A B A B, so machine noise
hits both alike; throughput is measured between optimizer-step timestamps after a warm-up, so model
loading is not counted for either. Printed: tokens/s per arm (median over rounds), their ratio, the
padding fraction, and the final losses (mean of the last steps), which must agree: a faster run that
learns less would not count.
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
        bf16=device.type == "cuda" and M.compute_dtype(cfg, device) == torch.bfloat16,
        use_cpu=device.type == "cpu",
        disable_tqdm=True,
    )
    Sequential(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[Clock()]).train()
    return {"times": times, "tokens": tokens[: len(times)], "losses": losses, "pad_frac": statistics.mean(pads)}


def worker(arm: str, setting: str, home: Path, steps: int | None, out: Path) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    s = dict(SETTINGS[setting])
    if steps:
        s["steps"] = steps
    model = build_tiny(home) if s["model"] == "tiny" else s["model"]
    cfg = run_config(s, model)
    res = (arm_engine if arm == "engine" else arm_trainer)(cfg, home)
    res["tok_per_s"] = rate(res["times"], res["tokens"])
    res["final_loss"] = statistics.mean(res["losses"][-LAST_K:])
    out.write_text(json.dumps(res))


# ---- the driver ------------------------------------------------------------------------------------


def run_setting(setting: str, rounds: int, steps: int | None, home: Path) -> dict:
    results = {"engine": [], "trainer": []}
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "LORALAB_TRAIN_THREADS": os.environ.get("BENCH_THREADS", str(os.cpu_count() or 1)),
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
            print(
                f"  round {r + 1} {arm:<8} {results[arm][-1]['tok_per_s']:8.0f} tok/s  "
                f"final loss {results[arm][-1]['final_loss']:.4f}",
                flush=True,
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
    }
    summary["ratio"] = summary["engine_tok_s"] / summary["trainer_tok_s"]
    summary["loss_diff"] = abs(summary["engine_loss"] - summary["trainer_loss"]) / summary["trainer_loss"]
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny (2 rounds) and smollm2 (2 rounds, few steps)")
    ap.add_argument("--setting", choices=[*SETTINGS, "all"], default="all")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, help="override the optimizer steps of each arm")
    ap.add_argument("--home", help="a data home to reuse (default: a temporary one)")
    ap.add_argument("--worker", choices=["engine", "trainer"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.setting, Path(args.home), args.steps, Path(args.out))
        return 0

    home = Path(args.home or tempfile.mkdtemp(prefix="loralab-bench-"))
    settings = list(SETTINGS) if args.setting == "all" else [args.setting]
    summaries = []
    for s in settings:
        print(
            f"{s}: {SETTINGS[s]['model']} on {SETTINGS[s]['dataset']}, batch {SETTINGS[s]['batch_size']}, "
            f"{args.steps or SETTINGS[s]['quick_steps' if args.quick else 'steps']} steps × {args.rounds} rounds, "
            "alternating engine / Trainer",
            flush=True,
        )
        steps = args.steps or (SETTINGS[s]["quick_steps"] if args.quick else None)
        summaries.append(run_setting(s, args.rounds, steps, home))
    print()
    print(
        f"{'setting':<9} {'engine tok/s':>12} {'Trainer tok/s':>13} {'ratio':>6} {'pad engine':>10} "
        f"{'pad Trainer':>11} {'loss engine':>11} {'loss Trainer':>12} {'Δloss':>6}"
    )
    ok = True
    for x in summaries:
        print(
            f"{x['setting']:<9} {x['engine_tok_s']:12.0f} {x['trainer_tok_s']:13.0f} {x['ratio']:6.2f} "
            f"{x['engine_pad']:10.1%} {x['trainer_pad']:11.1%} {x['engine_loss']:11.4f} {x['trainer_loss']:12.4f} "
            f"{x['loss_diff']:6.1%}"
        )
        ok &= x["loss_diff"] <= 0.02
    if not ok:
        print("final losses differ by more than 2%: the comparison does not count")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
