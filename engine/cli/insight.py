"""What an adapter learned: `spectra` (σ of every ΔW, and φ between two adapters with --similarity)."""

from __future__ import annotations

from pathlib import Path

from engine.cli.common import fail, home_of, key_error, open_store, print_json, print_phi_grid
from engine.core.runs import adapter_dir, is_adapter_folder

# What φ compares (Hu et al., LoRA §7.2, App. G): which factor's singular directions, on which side.
PHI_USES = ("A", "B", "BA")


def adapter_ref(args, ref: str) -> Path:
    """An adapter folder, or a run id (digits) whose adapter is meant. ValueError/KeyError with the reason."""
    if ref.isdigit() and not Path(ref).exists():
        return adapter_dir(open_store(args).get_run(int(ref)), args.home)
    return Path(ref).expanduser()


def cmd_spectra(args) -> int:
    """σ(ΔW) of every adapted module, with effective rank, energy and per-layer heatmaps."""
    try:
        if args.similarity:
            return similarity(args)
        if args.run is not None:
            target = adapter_dir(open_store(args).get_run(args.run), args.home)
        elif args.adapter:
            target = Path(args.adapter)
        else:
            return fail("give an adapter folder or --run ID")
    except KeyError as e:
        return fail(key_error(e))
    if not is_adapter_folder(target):
        return fail(f"{target} is not a PEFT adapter folder (no adapter_config.json)")
    from engine.ml import spectra as S

    try:
        spectra = S.adapter_spectra(target, shapes=vera_shapes(args, target))
    except (ValueError, FileNotFoundError) as e:
        return fail(str(e))
    if args.json:
        print_json(S.to_json(spectra))
        return 0
    print(f"{target}: {len(spectra)} modules")
    print(f"  {'module':<48} {'r':>3} {'‖ΔW‖_F':>9} {'σ1':>9} {'eff.rank':>8} {'top-1 energy':>12}")
    for name, m in spectra.items():
        print(
            f"  {name[-48:]:<48} {m.r:>3} {m.fro_norm:9.4f} {m.spectral_norm:9.4f} {m.effective_rank:8.2f} "
            f"{m.energy_topk.get(1, 0):12.1%}"
        )
    return 0


def vera_shapes(args, folder: Path) -> dict[str, tuple[int, int]] | None:
    """For a VeRA folder, every module's (in, out) from its base model's anatomy (built without weights)."""
    import json

    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type") != "VERA":
        return None
    from engine.ml.model import inspect_model

    anatomy = inspect_model(str(config.get("base_model_name_or_path") or ""), home_of(args))
    return {m["name"]: (m["in"], m["out"]) for m in anatomy["modules"]}


def similarity(args) -> int:
    """φ(i, j) between the top-i directions of adapter A and the top-j of adapter B for one module."""
    a, b = (adapter_ref(args, x) for x in args.similarity)
    for d in (a, b):
        if not is_adapter_folder(d):
            return fail(f"{d} is not a PEFT adapter folder (no adapter_config.json)")
    if not args.module:
        return fail("--similarity needs --module NAME (a module both adapters adapt)")
    from engine.ml.spectra import load_adapter, subspace_similarity

    factors = []
    for d in (a, b):
        _, f, _ = load_adapter(d)
        if args.module not in f:
            near = [n for n in f if n.endswith(args.module)][:1]
            return fail(
                f"{d} has no LoRA on {args.module!r}"
                + (f"; did you mean {near[0]!r}?" if near else f"; it adapts e.g. {next(iter(f))!r}")
            )
        A, B, _ = f[args.module]
        factors.append(({"A": A, "B": B, "BA": (A, B)}[args.use], A.shape[0]))
    (m1, r1), (m2, r2) = factors
    i, j = min(args.i_max, r1), min(args.j_max, r2)
    try:
        grid = subspace_similarity(m1, m2, i, j, side=args.side)
    except ValueError as e:
        return fail(str(e))
    out = {
        "a": str(a),
        "b": str(b),
        "module": args.module,
        "use": args.use,
        "side": args.side,
        "r1": r1,
        "r2": r2,
        "grid": grid,
    }
    if args.json:
        print_json(out)
        return 0
    print(f"φ(i, j) for {args.module}: {a} (r {r1}) vs {b} (r {r2}), {args.use} {args.side}-singular directions")
    print_phi_grid(grid)
    return 0


def register(sub) -> None:
    sp = sub.add_parser("spectra", help="singular values of every ΔW of a PEFT LoRA adapter; φ between two")
    sp.add_argument("adapter", nargs="?", help="a PEFT adapter folder (any, not only ours)")
    sp.add_argument("--run", type=int, help="the adapter of this run")
    sp.add_argument(
        "--similarity",
        nargs=2,
        metavar=("A", "B"),
        help="subspace similarity φ between two adapters (folders or run ids) for --module",
    )
    sp.add_argument("--module", help="with --similarity: the module, e.g. model.layers.0.self_attn.q_proj")
    sp.add_argument(
        "--use",
        choices=PHI_USES,
        default="A",
        help="with --similarity: directions of A (the paper's choice), B, or ΔW = B·A",
    )
    sp.add_argument(
        "--side",
        choices=("right", "left"),
        default="right",
        help="right = input space (A, ΔW), left = output space (B, ΔW)",
    )
    sp.add_argument("--i-max", type=int, default=8)
    sp.add_argument("--j-max", type=int, default=8)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_spectra)
