"""The LoRA paper's analyses of trained adapters (Hu et al. §7): `phi` (subspace similarity of two adapters,
per module or averaged over every module of a kind) and `amplification` (‖ΔW‖_F / ‖UᵀWV‖_F, needs the base).

    python -m engine phi 12 13 --kind q_proj [--i-max 8 --j-max 8] [--json]     # runs or adapter folders
    python -m engine amplification 12 [--model M] [--json]                      # cached per adapter version

`engine spectra --similarity A B --module M` stays the one-module φ of the Spectra tab; `phi --kind` is the
paper's Figure 3 summary over all layers (mean φ(i, j) across the modules of that kind).
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.cli.common import fail, home_of, key_error, open_store, print_json, print_phi_grid
from engine.cli.insight import PHI_USES, adapter_ref
from engine.core.runs import is_adapter_folder


def _factor(A, B, use: str):
    return {"A": A, "B": B, "BA": (A, B)}[use]


def cmd_phi(args) -> int:
    try:
        a, b = adapter_ref(args, args.a), adapter_ref(args, args.b)
    except (KeyError, ValueError) as e:
        return fail(key_error(e) if isinstance(e, KeyError) else str(e))
    for d in (a, b):
        if not is_adapter_folder(d):
            return fail(f"{d} is not a PEFT adapter folder (no adapter_config.json)")
    from engine.ml.spectra import load_adapter, subspace_similarity

    (_, fa, _), (_, fb, _) = load_adapter(a), load_adapter(b)
    shared = [n for n in fa if n in fb and n.split(".")[-1] == args.kind]
    if not shared:
        kinds = sorted({n.split(".")[-1] for n in fa if n in fb})
        return fail(f"--kind {args.kind!r}: no module of that kind in both adapters; they share {kinds}")
    grids = {}
    for n in shared:
        (A1, B1, _), (A2, B2, _) = fa[n], fb[n]
        i, j = min(args.i_max, A1.shape[0]), min(args.j_max, A2.shape[0])
        try:
            grids[n] = subspace_similarity(_factor(A1, B1, args.use), _factor(A2, B2, args.use), i, j, side=args.side)
        except ValueError as e:
            return fail(f"{n}: {e}")
    rows, cols = len(next(iter(grids.values()))), len(next(iter(grids.values()))[0])
    mean = [[sum(g[r][c] for g in grids.values()) / len(grids) for c in range(cols)] for r in range(rows)]
    out = {"a": str(a), "b": str(b), "kind": args.kind, "use": args.use, "side": args.side, "mean": mean}
    out["modules"] = grids
    if args.json:
        print_json(out)
        return 0
    print(f"mean φ(i, j) over {len(grids)} {args.kind} modules: {a} vs {b} ({args.use}, {args.side} directions)")
    print_phi_grid(mean)
    return 0


def model_of(args, ref: str, folder: Path) -> str:
    """The base model: --model, else the run's config model, else the adapter's base_model_name_or_path."""
    from engine.ml.model import resolve_model

    model = args.model
    if model is None and ref.isdigit() and not Path(ref).exists():
        model = open_store(args).get_run(int(ref)).config.get("model")
    if model is None:
        cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        model = cfg.get("base_model_name_or_path")
    if not model:
        raise ValueError(f"{folder}: no base model recorded; pass --model (a folder or hub id)")
    return resolve_model(model, home_of(args))


def cmd_amplification(args) -> int:
    try:
        folder = adapter_ref(args, args.adapter)
        if not is_adapter_folder(folder):
            return fail(f"{folder} is not a PEFT adapter folder (no adapter_config.json)")
        model = model_of(args, args.adapter, folder)
    except KeyError as e:
        return fail(key_error(e))
    except ValueError as e:
        return fail(str(e))
    from engine.ml.amplify import adapter_amplification

    try:
        rep = adapter_amplification(folder, model, home_of(args) / "cache" / "analyses", n_random=args.random)
    except ValueError as e:
        return fail(str(e))
    if args.json:
        print_json(rep)
        return 0
    print(f"amplification of {folder} on {model}" + (" (cached)" if rep["cached"] else ""))
    print(f"  {'kind':<12} {'n':>3} {'r':>3} {'‖ΔW‖':>9} {'‖UᵀWV‖':>9} {'‖W top‖':>9} {'random':>9} {'factor':>8}")
    show = lambda x: f"{x:9.4f}" if x is not None else f"{'-':>9}"
    for kind, k in rep["kinds"].items():
        factor = f"{k['factor']:8.2f}" if k["factor"] is not None else f"{'-':>8}"
        print(
            f"  {kind:<12} {k['modules']:>3} {k['r']:>3} {show(k['delta_fro'])} {show(k['proj_fro'])} "
            f"{show(k['w_top_proj_fro'])} {show(k['random_proj_fro'])} {factor}"
        )
    for note in rep["notes"]:
        print(f"  note: {note}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("phi", help="subspace similarity φ of two adapters over every module of a kind (LoRA §7.2)")
    p.add_argument("a", help="an adapter folder or a run id (its adapter)")
    p.add_argument("b", help="an adapter folder or a run id")
    p.add_argument("--kind", required=True, help="module kind, e.g. q_proj")
    p.add_argument("--use", choices=PHI_USES, default="A", help="directions of A (the paper's), B or ΔW = B·A")
    p.add_argument("--side", choices=("right", "left"), default="right")
    p.add_argument("--i-max", type=int, default=8)
    p.add_argument("--j-max", type=int, default=8)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_phi)
    a = sub.add_parser("amplification", help="how much ΔW amplifies directions of W, per module kind (LoRA §7.3)")
    a.add_argument("adapter", help="an adapter folder or a run id")
    a.add_argument("--model", help="the base model (default: the run's, or the adapter's base_model_name_or_path)")
    a.add_argument("--random", type=int, default=8, help="random direction pairs for the baseline")
    a.add_argument("--json", action="store_true")
    a.set_defaults(fn=cmd_amplification)
