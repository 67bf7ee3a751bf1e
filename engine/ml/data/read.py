"""Reading a dataset through 🤗 datasets: local files and folders, hub ids, the built-in sets.

    parts, notes = read_parts(cfg, cache_dir)   # one Part per file (a folder gives several), Arrow-backed

datasets does the reading (JSON Lines, JSON, CSV, Parquet, Arrow, text), the Arrow caching and the
fingerprints (a file's path, size and modification time; a hub dataset's revision), so a second read of
unchanged data is a memory-map. Our part is the messages: every failure is a DatasetError naming the file
and, where it can, the line, row or byte, and what to do (engine.ml.data.diagnose).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets

from engine.core.config import BUILTIN_DATASETS, RunConfig
from engine.core.data_fields import DATA_FILE_TYPES, HUB_PREFIX
from engine.ml.data.diagnose import DatasetError, diagnose, json_field, jsonl_line, sniff

datasets.disable_progress_bars()  # "Generating train split" bars would fill train.log
datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its load errors come back as our DatasetError

BUILTIN_DIR = Path(__file__).resolve().parents[2] / "datasets"  # engine/datasets/
FILE_BUILDERS = DATA_FILE_TYPES
SUFFIXES = tuple(FILE_BUILDERS)


@dataclass(frozen=True)
class Part:
    """One file (or hub split, or built-in set) of a dataset, as a datasets.Dataset."""

    name: str  # what messages call it: the file name, 'hf:org/name', 'builtin:persona'
    ds: datasets.Dataset
    path: Path | None = None  # the local file, for line numbers
    plain_text: bool = False  # a .txt file: one row per file, cut into documents by text_split

    def where(self, row: int) -> str:
        """'d.jsonl line 3', 'd.json item 3', 'd.csv row 3' or 'hf:org/name row 3' for 0-based row `row`."""
        if self.path is not None and self.path.suffix.lower() == ".jsonl":
            return f"{self.name} line {jsonl_line(self.path, row)}"
        if self.path is not None and self.path.suffix.lower() == ".json":
            return f"{self.name} item {row + 1}"
        return f"{self.name} row {row + 1}"


def read_parts(cfg: RunConfig, cache_dir: Path | None = None) -> tuple[list[Part], list[str]]:
    """The dataset of cfg as parts with the column mapping applied, and notes on anything not read."""
    ref, notes = cfg.dataset.strip(), []
    if ref.startswith("builtin:"):
        parts = [_builtin(ref, cache_dir)]
    elif ref.startswith(HUB_PREFIX):
        parts = [_hub(ref, cfg.dataset_subset, cfg.dataset_split)]
    else:
        path = Path(ref).expanduser()
        if path.is_dir():
            parts, notes = _folder(path, cfg.dataset_split, cache_dir)
        elif path.is_file():
            parts = [read_file(path, cache_dir)]
        else:
            raise DatasetError(
                f"dataset {ref!r} does not exist; give a {'/'.join(SUFFIXES)} file, a folder of them, "
                f"a hub dataset as hf:org/name, or one of {', '.join(BUILTIN_DATASETS)}"
            )
    return [map_columns(p, cfg.columns) for p in parts], notes


def read_file(path: Path, cache_dir: Path | None = None, name: str | None = None) -> Part:
    suffix = path.suffix.lower()
    builder = FILE_BUILDERS.get(suffix)
    name = name or path.name
    if builder is None:
        raise DatasetError(f"{name}: unsupported file type {suffix!r}; use {', '.join(SUFFIXES)}")
    if path.stat().st_size == 0:
        raise DatasetError(f"{name}: the file is empty: no rows")
    kwargs: dict = {}
    if builder in ("json", "csv", "text"):
        sniff(path)
        kwargs["encoding"] = "utf-8-sig"  # a leading UTF-8 byte-order mark is dropped, not read into a name
    if suffix == ".json":
        kwargs["field"] = json_field(path)
    if builder == "text":
        kwargs["sample_by"] = "document"  # the whole file; engine.ml.data.formats cuts it by text_split
    try:
        ds = datasets.load_dataset(
            builder, data_files=str(path.resolve()), split="train", cache_dir=_cache(cache_dir), **kwargs
        )
    except Exception as e:  # datasets' loaders raise many types; each becomes one message naming the file
        raise DatasetError(diagnose(path) or f"{name}: cannot be read as {builder}: {_reason(e)}") from e
    if len(ds) == 0 or (builder == "text" and not any(t.strip() for t in ds["text"])):
        raise DatasetError(f"{name}: no rows found")
    return Part(name, ds, path, plain_text=builder == "text")


def _reason(e: BaseException) -> str:
    """The innermost useful line of a loader's error (DatasetGenerationError wraps the real one)."""
    while e.__cause__ is not None and str(e).startswith("An error occurred while generating"):
        e = e.__cause__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def _cache(cache_dir: Path | None) -> str | None:
    return str(cache_dir) if cache_dir is not None else None


def _folder(folder: Path, split: str, cache_dir: Path | None) -> tuple[list[Part], list[str]]:
    """Every data file of a folder (recursively), except those named for another split, as 🤗 datasets
    splits a folder (train*, test*, valid*, ...); what is left out is said in the notes."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.relative_to(folder).parts)
    )
    data = [p for p in files if p.suffix.lower() in FILE_BUILDERS]
    if not data:
        raise DatasetError(f"folder {str(folder)!r} has no {'/'.join(SUFFIXES)} files")
    builders = sorted({FILE_BUILDERS[p.suffix.lower()] for p in data})
    if len(builders) > 1:
        raise DatasetError(f"folder {str(folder)!r} mixes file types ({', '.join(builders)}); keep one type per folder")
    splits = DataFilesDict.from_patterns(get_data_patterns(str(folder)), base_path=str(folder))
    by_split = {
        str(k): sorted({Path(f) for f in v if Path(f).suffix.lower() in FILE_BUILDERS}) for k, v in splits.items()
    }
    if "[" in split:
        raise DatasetError(f"dataset_split = {split!r}: slices work for hub datasets; for a folder use max_examples")
    want = split or ("train" if "train" in by_split else next(iter(by_split)))
    if want not in by_split:
        raise DatasetError(
            f"folder {str(folder)!r} has splits {sorted(by_split)}; dataset_split = {split!r} is not one"
        )
    chosen = by_split[want]
    notes = [f"{p.relative_to(folder)}: not read (not a data file)" for p in files if p not in data]
    for other, fs in by_split.items():
        if other != want:
            notes += [f"{p.relative_to(folder)}: not read (split {other}; set dataset_split to use it)" for p in fs]
    notes += [
        f"{p.relative_to(folder)}: not read (its name matches no split)"
        for p in data
        if not any(p in fs for fs in by_split.values())
    ]
    return [read_file(p, cache_dir, name=str(p.relative_to(folder))) for p in chosen], notes


def _hub(ref: str, subset: str, split: str) -> Part:
    """hf:org/name through datasets' hub client; with HF_HUB_OFFLINE from the local caches, or one clear message.

    Offline, two caches can hold it: a hub snapshot (`hf download --repo-type dataset org/name`, in
    HF_HUB_CACHE) and datasets' own Arrow cache of an earlier load_dataset (HF_DATASETS_CACHE).
    """
    repo = ref[len(HUB_PREFIX) :]
    if Path(repo).exists():
        raise DatasetError(f"{ref}: a local path {repo!r} shadows the hub id; give that path instead, or move it")
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    tried: list[str] = []
    sources = [_snapshot, _remote] if offline else [_remote]
    for source in sources:
        try:
            return Part(ref, _pick_split(source(repo, subset, split), ref, split))
        except _NotCached as e:
            tried.append(str(e))
    why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
    raise DatasetError(
        f"dataset {ref!r} is not in the local Hugging Face cache and {why}: download it once where there is "
        f"internet (`hf download --repo-type dataset {repo}`, or load it once with LoRA Lab), or give a local "
        f"file ({'; '.join(tried)})"
    )


class _NotCached(Exception):
    pass


def _snapshot(repo: str, subset: str, split: str):
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        local = snapshot_download(repo, repo_type="dataset", local_files_only=True)
    except LocalEntryNotFoundError:
        raise _NotCached("no hub snapshot in HF_HUB_CACHE") from None
    return _load(local, subset, split, f"{HUB_PREFIX}{repo}")


def _remote(repo: str, subset: str, split: str):
    return _load(repo, subset, split, f"{HUB_PREFIX}{repo}")


def _load(path: str, subset: str, split: str, ref: str):
    """load_dataset of one split ('' = train, or every split so that _pick_split can choose)."""
    from datasets.exceptions import DatasetNotFoundError

    try:
        try:
            return datasets.load_dataset(path, name=subset or None, split=split or "train")
        except ValueError as e:
            if split or "Unknown split" not in str(e):
                raise
            return datasets.load_dataset(path, name=subset or None)
    except ConnectionError as e:  # offline and not in datasets' Arrow cache
        raise _NotCached(f"not in datasets' cache ({_reason(e)})") from None
    except DatasetNotFoundError:
        raise DatasetError(
            f"dataset {ref!r} does not exist on the Hugging Face hub or is gated/private (log in with `hf auth "
            "login` or set HF_TOKEN); check the id"
        ) from None
    except Exception as e:  # datasets' builders raise many types; each becomes one message naming the dataset
        hint = f"; set dataset_subset (one of its subsets: {e})" if "Config name is missing" in str(e) else ""
        raise DatasetError(f"dataset {ref!r}: cannot be loaded: {_reason(e)}{hint}") from e


def _pick_split(loaded, ref: str, split: str) -> datasets.Dataset:
    if isinstance(loaded, datasets.Dataset):
        return loaded
    names = list(loaded)
    if len(names) == 1:
        return loaded[names[0]]
    raise DatasetError(f"dataset {ref!r} has no train split; it has {names}: set dataset_split to one of them")


def _builtin(ref: str, cache_dir: Path | None) -> Part:
    if ref not in BUILTIN_DATASETS:
        raise DatasetError(f"unknown built-in dataset {ref!r}; choose one of {', '.join(BUILTIN_DATASETS)}")
    if ref == "builtin:persona":
        return read_file(BUILTIN_DIR / "persona.jsonl", cache_dir, name=ref)
    return Part(ref, datasets.Dataset.from_list(_chatterbot_rows()))


def _chatterbot_rows() -> list[dict]:
    """chatterbot-corpus English: each YAML conversation [q, a, q2, a2, ...] becomes one chat."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            "builtin:chatterbot needs the chatterbot-corpus package: pip install chatterbot-corpus==1.3.3"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "english"
    rows = []
    for f in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if str(t).strip()]
            if len(turns) < 2:
                continue
            turns = turns[: len(turns) // 2 * 2]
            msgs = [{"role": "user" if j % 2 == 0 else "assistant", "content": t} for j, t in enumerate(turns)]
            rows.append({"messages": msgs})
    return rows


def map_columns(part: Part, columns: Sequence[tuple[str, str]]) -> Part:
    """Rename the data's columns to the names a format reads (cfg.columns: (format's name, data's name))."""
    if not columns:
        return part
    have = part.ds.column_names
    missing = [f"{target}={source}" for target, source in columns if source not in have]
    if missing:
        raise DatasetError(f"{part.name}: columns {', '.join(missing)}: no such column; its columns are {have}")
    ds = part.ds
    sources = {s for _, s in columns}
    clash = [t for t, _ in columns if t in have and t not in sources]
    if clash:  # the data has a column of the target's name too: the mapping says which one to read
        ds = ds.remove_columns(clash)
    ds = ds.rename_columns({s: t for t, s in columns if s != t})
    return Part(part.name, ds, part.path, part.plain_text)
