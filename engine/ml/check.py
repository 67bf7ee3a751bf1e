"""Can this run start? Everything `train` would trip over first, found in seconds and reported at once.

    report = check_run(cfg, home)     # {"ok", "problems", "data", "facts", "estimate", ...}

The model must resolve (a local folder with config.json, the hub cache, the embedded model) and its
tokenizer load; its anatomy is built on the meta device (no weights are read), so the LoRA targets and
layers are checked too; quantization must be available here; the dataset must parse and yield at least
one trainable example (prepare() tokenizes it once, in the cache the run will reuse). `engine check`,
`engine submit` and the web UI's Launch (through the CLI) ask this before anything is queued.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.core import estimate as E
from engine.core.config import ConfigError, RunConfig
from engine.ml import data as D
from engine.ml import model as M


def check_run(cfg: RunConfig, home: Path) -> dict[str, Any]:
    problems: list[str] = []
    tok = anatomy = prep = None
    try:
        ref = M.resolve_model(cfg.model, home)
        tok = M.load_tokenizer(ref, cfg.trust_remote_code)
        anatomy = M.inspect_model(cfg.model, home, trust_remote_code=cfg.trust_remote_code)
    except (M.ModelError, OSError, ValueError) as e:
        problems.append("model: " + " ".join(str(e).split()))  # one line: hub errors span several
    if cfg.quant != "none":  # importing bitsandbytes takes seconds: only when it is needed
        ok, reason = M.quant_support()[cfg.quant]
        if not ok:
            problems.append(f"quant = {cfg.quant!r} is not available here: {reason}")
    cache = home / "cache" / "datasets"
    try:
        if tok is not None:
            prep = D.prepare(cfg, tok, cache_dir=cache)
        else:  # no tokenizer to count tokens with: still read and convert every row, to report its problems too
            D.check_rows(cfg, cache_dir=cache)
    except D.DatasetError as e:
        problems.append(f"dataset: {e}")
    report: dict[str, Any] = {"ok": False, "problems": problems, "model": cfg.model, "dataset": cfg.dataset}
    if prep is not None:
        report["data"] = prep.stats()
        report["facts"] = prep.facts(cfg).to_dict()
    if anatomy is not None:
        device = M.pick_device()
        try:
            est = E.estimate(
                anatomy,
                cfg,
                device.type,
                bf16_capable=M.bf16_capable(device),
                data=prep.facts(cfg) if prep is not None else None,
            )
            scale, unplaceable = devices_report(cfg, est, anatomy)
            problems.extend(unplaceable)
            report["estimate"] = {
                "device": device.type,
                "total_gb": round(est.total_gb, 4),
                "allocated_gb": round(E.gb(est.allocated_bytes), 4),
                "basis": est.basis,
                "batch": est.batch_note,
                "trainable_params": est.trainable_params,
                **scale,
            }
        except ConfigError as e:  # targets or layers the model does not have
            problems.extend(e.problems)
    report["ok"] = not problems
    return report


def devices_report(cfg: RunConfig, est: E.Estimate, anatomy: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """({world, strategy, per_device_gb}, problems): the processes train.devices means on this machine, the
    memory each device needs with the strategy, and why this machine can never run it (no such GPU, too
    little memory on every GPU, fsdp without GPUs). Busy GPUs are the queue's business, not a problem."""
    from engine.core.devices import Unplaceable, gpus_from_doctor, parse_devices, per_device_bytes, place, world_here
    from engine.ml.distributed import local_gpus

    gpus = gpus_from_doctor({"gpus": local_gpus()})
    req, strategy = parse_devices(cfg.train.devices), cfg.train.strategy
    world = world_here(req, gpus)
    per_device = E.gb(per_device_bytes(est, strategy, world, anatomy.get("num_layers")))
    try:
        place(req, strategy, gpus, need_gb=per_device)
        problems = []
    except Unplaceable as e:
        problems = [str(e)]
    return {"world": world, "strategy": strategy, "per_device_gb": round(per_device, 4)}, problems
