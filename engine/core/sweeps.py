"""Sweeps: one base run config and a grid of values → N runs, queued together and linked to a `sweeps` row.

    name: rank-vs-targets
    base: run.yaml                       # a run config: a path (relative to this file) or inline fields
    grid:                                # dotted field names → lists of values; the full grid by default
      lora.r: [1, 4]
      lora.targets: [qv, all-linear]
    # combinations:                      # or the listed combinations only
    #   - {lora.r: 8, lora.targets: qv}
    # budget: {like: {lora.r: 8, lora.targets: qv}}   # or budget: 120000 (trainable parameters)

    spec = read_sweep("sweep.yaml")        # SweepSpec, or SweepError listing every problem
    members = expand(spec)                 # one Member per run: what varies, its config, its name
    apply_budget(members, spec.budget, anatomy_of, problems)   # the rank each target set gets
    sweep_id, run_ids = queue_sweep(runner, spec, members, varied)

The budget is the LoRA paper's Table 5 setting: the same number of trainable parameters for every target
set, so each member gets the largest rank whose exact count (engine.core.estimate) stays within it. Stdlib
only: the web server imports this; the engine's `sweep` command adds the per-member `engine check`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.core.batching import micro_batches, total_steps
from engine.core.config import ConfigError, LoraSpec, RunConfig, TrainSpec, shown
from engine.core.disk import DISK_MARGIN_BYTES, DiskSpaceError, disk_need_bytes, free_bytes

SPEC_KEYS = ("name", "base", "grid", "combinations", "budget")
MAX_MEMBERS = 256  # a grid beyond this is a typo (or a job for a real hyper-parameter search tool)
MAX_NAME = 200  # runs.name is VARCHAR(200)
RANK_FIELD = "lora.r"


class SweepError(ConfigError):
    """A sweep file or one of its members with one or more problems (every one listed)."""


@dataclass(frozen=True)
class Budget:
    """A fixed number of trainable parameters, given directly or as that of a reference config."""

    params: int | None = None
    like: Mapping[str, Any] | None = None  # dotted overrides of the base: its trainable count is the budget


@dataclass(frozen=True)
class SweepSpec:
    name: str
    base: dict[str, Any]  # a (partial) run config, as from_dict takes it
    grid: dict[str, list[Any]]  # dotted field → values, in the order written
    combinations: list[dict[str, Any]] | None
    budget: Budget | None
    source: dict[str, Any]  # the sweep as written (stored in the sweeps row)


@dataclass
class Member:
    """One run of the sweep: the values it sets (its name says them), its config and what was found out."""

    index: int
    values: dict[str, Any]
    config: dict[str, Any]
    name: str = ""
    facts: dict[str, Any] = field(default_factory=dict)  # trainable_params, est_mem_gb, tokens, steps, ...

    def run_config(self) -> RunConfig:
        return RunConfig.from_dict(self.config)


# ---- fields ---------------------------------------------------------------------------------------------


def known_fields() -> list[str]:
    """Every dotted name a grid may vary: top-level fields, lora.*, train.*."""
    top = [f.name for f in dataclasses.fields(RunConfig) if f.name not in ("lora", "train")]
    return (
        top
        + [f"lora.{f.name}" for f in dataclasses.fields(LoraSpec)]
        + [f"train.{f.name}" for f in dataclasses.fields(TrainSpec)]
    )


def get_dotted(d: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """d['lora']['r'] for 'lora.r'; the default when a level is missing."""
    cur: Any = d
    for part in key.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return default
        cur = cur[part]
    return cur


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    d[last] = copy.deepcopy(value)


def show_value(v: Any) -> str:
    """A value as it appears in a member's name: 1e-3, qv, q_proj+v_proj, true."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "+".join(show_value(x) for x in v)
    return str(v)


def short_names(fields: Sequence[str]) -> dict[str, str]:
    """'lora.r' → 'r', 'train.lr' → 'lr'; the whole dotted name where two fields end alike."""
    last = [f.split(".")[-1] for f in fields]
    return {f: (s if last.count(s) == 1 else f) for f, s in zip(fields, last)}


def member_label(values: Mapping[str, Any], fields: Sequence[str]) -> str:
    names = short_names(fields)
    return " ".join(f"{names[f]}={show_value(values[f])}" for f in fields if f in values)


# ---- reading a sweep ------------------------------------------------------------------------------------


def read_sweep(path: str | Path) -> SweepSpec:
    """A sweep file (YAML or JSON, read with the run config's limits); `base:` as a path is relative to it."""
    from engine.core.config_file import read_config_file

    p = Path(path)
    if not p.is_file():
        raise SweepError([f"sweep file {str(p)!r} {'is a folder' if p.is_dir() else 'does not exist'}"])
    data = read_config_file(p)
    return parse_sweep(data, p.parent, default_name=p.stem)


def parse_sweep(data: Any, base_dir: str | Path = ".", *, default_name: str = "sweep") -> SweepSpec:
    """Check a sweep's shape (every problem at once) and read its base config."""
    if not isinstance(data, Mapping):
        raise SweepError([f"a sweep is a mapping with {', '.join(SPEC_KEYS)}; got {type(data).__name__}"])
    problems: list[str] = [
        f"{str(k)[:60]}: unknown sweep key; a sweep has {', '.join(SPEC_KEYS)}" for k in data if k not in SPEC_KEYS
    ]
    base = _read_base(data.get("base"), Path(base_dir), problems)
    grid, combos = _read_grid(data.get("grid"), problems), _read_combinations(data.get("combinations"), problems)
    if data.get("grid") is not None and data.get("combinations") is not None:
        problems.append("give grid (every combination) or combinations (the listed ones), not both")
    elif data.get("grid") is None and data.get("combinations") is None:
        problems.append("nothing varies: give grid: {field: [values, ...]} or combinations: [{field: value}, ...]")
    budget = _read_budget(data.get("budget"), problems)
    varied = list(grid) + [k for c in combos or [] for k in c if k not in grid]
    if budget is not None and RANK_FIELD in varied:
        problems.append("budget: the rank is what the budget decides; remove lora.r from grid/combinations")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        problems.append(f"name = {shown(name)}: give the sweep a short name")
    if problems:
        raise SweepError(problems)
    source = {k: copy.deepcopy(v) for k, v in data.items()}
    source["base"] = base  # stored resolved: the sweep row says what ran, even if the file changes later
    return SweepSpec(name.strip()[:80], base, grid, combos, budget, source)


def _read_base(base: Any, base_dir: Path, problems: list[str]) -> dict[str, Any]:
    if base is None:
        return {}
    if isinstance(base, str):
        from engine.core.config_file import read_config_file

        p = Path(base).expanduser()
        p = p if p.is_absolute() else base_dir / p
        if not p.is_file():
            problems.append(f"base = {base!r}: no such run config file ({p})")
            return {}
        try:
            got = read_config_file(p)
        except ConfigError as e:
            problems.extend(f"base: {x}" for x in e.problems)
            return {}
        base = got
    if not isinstance(base, Mapping):
        problems.append(f"base = {shown(base)}: give a run config (a mapping of fields) or the path of one")
        return {}
    return copy.deepcopy(dict(base))


def _check_field(key: Any, where: str, problems: list[str]) -> bool:
    known = known_fields()
    if isinstance(key, str) and key in known:
        return True
    near = [k for k in known if isinstance(key, str) and k.endswith("." + key.split(".")[-1])]
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    problems.append(f"{where}{str(key)[:60]}: not a run config field{hint}; fields look like lora.r, train.lr, quant")
    return False


def _read_grid(grid: Any, problems: list[str]) -> dict[str, list[Any]]:
    if grid is None:
        return {}
    if not isinstance(grid, Mapping):
        problems.append(f"grid = {shown(grid)}: give a mapping of dotted field names to lists of values")
        return {}
    out = {}
    for key, values in grid.items():
        if not _check_field(key, "grid.", problems):
            continue
        if not isinstance(values, list) or not values:
            problems.append(f"grid.{key} = {shown(values)}: give a non-empty list of values, e.g. [{shown(values)}]")
            continue
        out[key] = values
    n = math.prod(len(v) for v in out.values()) if out else 0
    if n > MAX_MEMBERS:
        problems.append(f"grid: {n:,} combinations; a sweep has at most {MAX_MEMBERS} runs")
    return out


def _read_combinations(combos: Any, problems: list[str]) -> list[dict[str, Any]] | None:
    if combos is None:
        return None
    if not isinstance(combos, list) or not combos:
        problems.append(f"combinations = {shown(combos)}: give a list of mappings, e.g. [{{lora.r: 8}}]")
        return None
    out = []
    for i, c in enumerate(combos, 1):
        if not isinstance(c, Mapping) or not c:
            problems.append(f"combinations[{i}] = {shown(c)}: give a mapping of dotted fields to values")
            continue
        if all(_check_field(k, f"combinations[{i}].", problems) for k in c):
            out.append(dict(c))
    if len(out) > MAX_MEMBERS:
        problems.append(f"combinations: {len(out):,} runs; a sweep has at most {MAX_MEMBERS}")
    return out


def _read_budget(budget: Any, problems: list[str]) -> Budget | None:
    if budget is None:
        return None
    if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0:
        return Budget(params=budget)
    if isinstance(budget, Mapping) and set(budget) == {"params"}:
        return _read_budget(budget["params"], problems)
    if isinstance(budget, Mapping) and set(budget) == {"like"} and isinstance(budget["like"], Mapping):
        if all(_check_field(k, "budget.like.", problems) for k in budget["like"]):
            return Budget(like=dict(budget["like"]))
        return None
    problems.append(
        f"budget = {shown(budget)}: give a number of trainable parameters (budget: 120000) or a reference "
        "config whose count is the budget (budget: {like: {lora.r: 8, lora.targets: qv}})"
    )
    return None


# ---- members --------------------------------------------------------------------------------------------


def expand(spec: SweepSpec) -> list[Member]:
    """One member per grid point (in the grid's order, the last field varying fastest) or listed combination."""
    if spec.combinations is not None:
        points = [dict(c) for c in spec.combinations]
    else:
        keys = list(spec.grid)
        points = [dict(zip(keys, combo)) for combo in itertools.product(*(spec.grid[k] for k in keys))]
    members = []
    for i, values in enumerate(points):
        cfg = copy.deepcopy(spec.base)
        for k, v in values.items():
            set_dotted(cfg, k, v)
        members.append(Member(i, values, cfg, f"{spec.name} {member_label(values, list(values))}".strip()))
    return members


def varied_fields(spec: SweepSpec, members: Sequence[Member]) -> list[str]:
    """The fields whose value differs between members (lora.r too when the budget decides it)."""
    fields = list(dict.fromkeys(k for m in members for k in m.values))
    return [f for f in fields if len({show_value(m.values.get(f)) for m in members}) > 1] or fields


def name_members(spec: SweepSpec, members: Sequence[Member], varied: Sequence[str]) -> None:
    """Each member is named after what varies: '<sweep> r=4 targets=qv' (a suffix keeps names unique)."""
    seen: dict[str, int] = {}
    for m in members:
        name = f"{spec.name} {member_label(m.values, varied)}".strip()[: MAX_NAME - 6]
        seen[name] = seen.get(name, 0) + 1
        m.name = name if seen[name] == 1 else f"{name} #{seen[name]}"


def validate_members(members: Sequence[Member]) -> list[str]:
    """Every member's config problems, each line naming the member."""
    problems = []
    for m in members:
        try:
            RunConfig.from_dict(m.config)
        except ConfigError as e:
            problems.extend(f"{m.name or f'member {m.index + 1}'}: {p}" for p in e.problems)
    return problems


# ---- the budget (LoRA paper, Table 5) --------------------------------------------------------------------


def trainable_at(anatomy: Mapping[str, Any], cfg: RunConfig, r: int) -> int:
    """Exact trainable parameters of cfg at rank r (engine.core.estimate's count)."""
    from engine.core.estimate import estimate

    return estimate(anatomy, cfg.replace(lora={"r": r}), "cpu").trainable_params


def rank_for_budget(anatomy: Mapping[str, Any], cfg: RunConfig, budget: int) -> tuple[int, int]:
    """(r, trainable parameters at r): the largest rank whose count stays within `budget`. The count is
    a·r + c (A and B grow with r; DoRA's magnitudes do not), so two counts give a and c."""
    one, two = trainable_at(anatomy, cfg, 1), trainable_at(anatomy, cfg, 2)
    a, c = two - one, 2 * one - two
    if one > budget:
        raise ConfigError(
            [
                f"budget {budget:,} is below one rank of lora.targets = {shown(list(cfg.lora.targets))} ({one:,} at r = 1)"
            ]
        )
    r = min(1024, (budget - c) // a)
    return r, trainable_at(anatomy, cfg, r)


def apply_budget(
    members: Sequence[Member], budget: Budget | None, base: Mapping[str, Any], anatomy_of: Callable[[str], Mapping]
) -> list[str]:
    """Give each member the rank of the budget (member.values['lora.r'], its config, facts['budget']);
    the problems, each naming its member. anatomy_of(model) → engine inspect's dict."""
    if budget is None:
        return []
    problems: list[str] = []
    params = budget.params
    if params is None:
        ref = copy.deepcopy(dict(base))
        for k, v in (budget.like or {}).items():
            set_dotted(ref, k, v)
        try:
            cfg = RunConfig.from_dict(ref)
            params = trainable_at(anatomy_of(cfg.model), cfg, cfg.lora.r)
        except (ConfigError, ValueError) as e:
            return [f"budget.like: {p}" for p in getattr(e, "problems", [str(e)])]
    for m in members:
        try:
            cfg = m.run_config()
            r, n = rank_for_budget(anatomy_of(cfg.model), cfg, params)
        except ConfigError as e:
            problems.extend(f"{m.name or f'member {m.index + 1}'}: {p}" for p in e.problems)
            continue
        except ValueError as e:  # the model could not be inspected
            problems.append(f"{m.name or f'member {m.index + 1}'}: {e}")
            continue
        m.values[RANK_FIELD] = r
        set_dotted(m.config, RANK_FIELD, r)
        m.facts["budget"] = {"params": params, "trainable_params": n, "r": r}
    return problems


# ---- time and disk --------------------------------------------------------------------------------------


def run_tokens(lengths: Sequence[int], tr: TrainSpec) -> tuple[int, int]:
    """(optimizer steps, tokens) a run trains on: the trainer's own micro-batches (engine.core.batching)."""
    steps = total_steps(len(lengths), tr)
    stream = micro_batches(len(lengths), tr.batch_size, tr.seed)
    return steps, sum(lengths[i] for _ in range(steps * tr.grad_accum) for i in next(stream))


def measured_speed(store, model: str, device: str | None = None) -> tuple[float, int] | None:
    """(tokens per second, run id) of the newest succeeded run of `model` (on `device`, when given), from its
    tokens seen over its wall time (start-up included, so short runs read slower than they train)."""
    for r in store.list_runs(status="succeeded", model=model, limit=200):
        if r.tokens_seen and r.duration_s and (device is None or (r.device or "").split(":")[0] == device):
            return r.tokens_seen / r.duration_s, r.id
    return None


def check_disk_for(members: Sequence[Member], home: Path) -> None:
    """DiskSpaceError before anything is queued when the data home lacks room for every member at once."""
    need = sum(sum(disk_need_bytes(m.run_config(), home, m.facts.get("trainable_params")).values()) for m in members)
    free = free_bytes(home)
    if free < need + DISK_MARGIN_BYTES:
        raise DiskSpaceError(
            f"not enough disk space in {home} for the sweep's {len(members)} runs: {free / 1e9:.2f} GB free, "
            f"they need about {need / 1e9:.2f} GB (checkpoints and adapters) plus a {DISK_MARGIN_BYTES / 1e9:.2f} "
            "GB margin; free space, or sweep fewer values"
        )


# ---- queueing -------------------------------------------------------------------------------------------


def queue_sweep(runner, spec: SweepSpec, members: Sequence[Member], varied: Sequence[str]) -> tuple[int, list[int]]:
    """Write the sweep row and queue every member as a normal run linked to it; (sweep id, run ids).

    Call only with members that passed every check: the disk is checked for all of them first, so a
    refusal queues nothing."""
    check_disk_for(members, runner.home)
    stored = {
        "source": spec.source,
        "varied": list(varied),
        "members": [{"name": m.name, "values": m.values, **m.facts} for m in members],
    }
    sweep_id = runner.store.create_sweep(spec.name, stored)
    ids = [
        runner.submit(
            m.config,
            name=m.name,
            est_mem_gb=m.facts.get("est_mem_gb"),
            trainable_params=m.facts.get("trainable_params"),
            sweep_id=sweep_id,
        )
        for m in members
    ]
    return sweep_id, ids
