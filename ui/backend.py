"""What the web server asks of the machine: model work through the engine's CLI in a child process (the
server never imports torch), and uploaded datasets stored inside the data home.

    backend = Backend(home)
    backend.inspect("embedded:SmolLM2-135M-Instruct")   # = python -m engine --home H inspect M --json, cached
    backend.preview(model=..., dataset=...)             # = python -m engine ... preview ... --json
    backend.doctor()                                    # = python -m engine ... doctor --json, once per process

    save_upload(tmp_file, home, "my data.jsonl")       # → <home>/datasets/my_data.jsonl, never elsewhere

Every engine process the UI starts goes through Backend (engine.core.launch underneath). A failing
command raises ValueError with the CLI's own error text, which the UI shows as it is.
Inspect results are cached on disk under <home>/cache/inspect/<sha>.json, keyed by the model string
(plus the folder's modification times for a local folder, so an edited config.json is re-read).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.core.data_fields import DATA_FILE_TYPES
from engine.core.home import datasets_dir
from engine.core.launch import run_engine, run_engine_json

INSPECT_TIMEOUT_S = 180.0
PREVIEW_TIMEOUT_S = 300.0
DOCTOR_TIMEOUT_S = 120.0
LONG_TIMEOUT_S = 1800.0  # merging, pushing a merged model
DATASET_SUFFIXES = tuple(DATA_FILE_TYPES)
CHECK_TIMEOUT_S = 300.0  # `engine check` tokenizes the dataset once (the run reuses it)


def inspect_cache_key(model: str, trust_remote_code: bool = False) -> str:
    """sha256 of the model string, the trust flag and, for a local folder, its files' modification times."""
    parts = [model.strip(), str(bool(trust_remote_code))]
    p = Path(model.strip()).expanduser()
    if model.strip() and p.is_dir():
        parts.append(str(p.resolve()))
        parts.extend(f"{f.name}:{f.stat().st_mtime_ns}" for f in sorted(p.iterdir()) if f.suffix == ".json")
        parts.append(str(p.stat().st_mtime_ns))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class Backend:
    """The CLI calls the UI makes, bound to one data home, with their caches."""

    def __init__(
        self,
        home: str | os.PathLike,
        *,
        python: str = sys.executable,
        env: dict[str, str] | None = None,
        db_url: str | None = None,
        data_dirs: Sequence[str | os.PathLike] = (),
    ):
        self.home = Path(home)
        # Where the web app may read datasets: its uploads, and the folders its operator allowed (--data-dir).
        self.data_dirs = [Path(d).expanduser().resolve() for d in data_dirs]
        self.python = python
        self.env = env
        self.db_url = db_url  # the app's database, for commands that read runs (export, push)
        self._doctor: dict[str, Any] | None = None
        self._doctor_lock = threading.Lock()

    def run(self, args: Sequence[str], timeout: float) -> Any:
        """`python -m engine --home HOME ARGS... ` → its JSON output; ValueError with the command's error line."""
        return run_engine_json(args, timeout, home=self.home, db_url=self.db_url, python=self.python, env=self.env)

    def run_text(
        self, args: Sequence[str], timeout: float = LONG_TIMEOUT_S, env: Mapping[str, str] | None = None
    ) -> str:
        """The same for commands that print text: the last line they printed (stdout, else stderr)."""
        proc = run_engine(
            args,
            timeout,
            home=self.home,
            db_url=self.db_url,
            python=self.python,
            env={**(self.env or {}), **(env or {})},
        )
        lines = [ln for ln in (proc.stdout.strip() or proc.stderr.strip()).splitlines() if ln.strip()]
        return lines[-1] if lines else ""

    def inspect(self, model: str, trust_remote_code: bool = False) -> dict[str, Any]:
        """Architecture, parameters and LoRA-able modules of `model` (engine.ml.model.inspect_model's dict)."""
        model = model.strip()
        if not model:
            raise ValueError("give a model: a hub id, a local folder or the embedded default")
        cached = self.cached_inspect(model, trust_remote_code)
        if cached is not None:
            return cached
        cache = self._inspect_path(model, trust_remote_code)
        args = ["inspect", model, "--json"] + (["--trust-remote-code"] if trust_remote_code else [])
        info = self.run(args, INSPECT_TIMEOUT_S)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(info), encoding="utf-8")
        tmp.replace(cache)  # atomic: a concurrent reader sees the old file or the whole new one
        return info

    def cached_inspect(self, model: str, trust_remote_code: bool = False) -> dict[str, Any] | None:
        """The inspect result if it is already on disk (no child process), else None."""
        cache = self._inspect_path(model.strip(), trust_remote_code)
        return json.loads(cache.read_text(encoding="utf-8")) if model.strip() and cache.is_file() else None

    def _inspect_path(self, model: str, trust_remote_code: bool) -> Path:
        return self.home / "cache" / "inspect" / f"{inspect_cache_key(model, trust_remote_code)}.json"

    def preview(
        self,
        *,
        model: str,
        dataset: str,
        dataset_format: str = "auto",
        train_on: str = "responses",
        max_seq_len: int = 512,
        columns: str = "",
        dataset_split: str = "",
        dataset_subset: str = "",
        text_split: str = "auto",
        max_examples: int = 0,
        val_split: float = 0.1,
        seed: int = 42,
    ) -> dict[str, Any]:
        """`engine preview --facts --json`: format, rows, what is dropped or cut, token lengths, the rendered
        first example, and the training split's token counts for the memory estimate."""
        args = [
            "preview",
            "--model",
            model,
            "--dataset",
            self.readable_dataset(dataset),
            "--dataset-format",
            dataset_format,
            "--train-on",
            train_on,
            "--max-seq-len",
            str(int(max_seq_len)),
            "--split",
            dataset_split,
            "--subset",
            dataset_subset,
            "--text-split",
            text_split,
            "--max-examples",
            str(int(max_examples)),
            "--val-split",
            str(float(val_split)),
            "--seed",
            str(int(seed)),
            "--facts",
            "--json",
        ]
        if columns.strip():
            args += ["--columns", columns]
        return self.run(args, PREVIEW_TIMEOUT_S)

    def check(self, cfg) -> dict[str, Any]:
        """`engine check - --json` on a RunConfig: {ok, problems, data, facts, estimate}; no weights loaded."""
        return run_engine_json(
            ["check", "-", "--json"],
            CHECK_TIMEOUT_S,
            home=self.home,
            db_url=self.db_url,
            python=self.python,
            env=self.env,
            stdin=cfg.to_json(),
        )

    def sweep(self, spec: Mapping[str, Any], *, dry_run: bool) -> dict[str, Any]:
        """`engine sweep - --json [--dry-run]` on a sweep (base inline): the plan, every member checked, and
        with dry_run False the sweep id and run ids it queued (the app's runner then trains them)."""
        return run_engine_json(
            ["sweep", "-", "--json", *(["--dry-run"] if dry_run else [])],
            2 * CHECK_TIMEOUT_S,  # one `engine check` per distinct data setting, usually one
            home=self.home,
            db_url=self.db_url,
            python=self.python,
            env=self.env,
            stdin=json.dumps(spec),
        )

    def allowed_places(self) -> list[Path]:
        return [datasets_dir(self.home).resolve(), *self.data_dirs]

    def readable_dataset(self, dataset: str) -> str:
        """The dataset as the engine should read it: built-in and hub ids as they are, a path made absolute
        if it lies inside an allowed place (uploads, --data-dir folders); ValueError naming those otherwise.
        A relative path is taken relative to the uploads folder."""
        d = (dataset or "").strip()
        if not d or d.startswith(("builtin:", "hf:")):
            return d
        places = self.allowed_places()
        p = Path(d).expanduser()
        resolved = (p if p.is_absolute() else places[0] / p).resolve()
        if not any(resolved == place or resolved.is_relative_to(place) for place in places):
            raise ValueError(
                f"dataset {d!r}: the web app reads datasets only from its uploads ({places[0]})"
                + (f" and the folders allowed at start ({', '.join(map(str, places[1:]))})" if places[1:] else "")
                + "; upload the file, or restart the app with --data-dir FOLDER (the CLI reads any path)"
            )
        return str(resolved)

    def known_doctor(self) -> dict[str, Any] | None:
        """The doctor answer if already asked (or given), else None: never starts a process."""
        return self._doctor

    def remember_doctor(self, doctor: Mapping[str, Any]) -> None:
        """Use this answer instead of asking the engine (the app was given it)."""
        with self._doctor_lock:
            self._doctor = dict(doctor)

    def doctor(self) -> dict[str, Any]:
        """Device and quantization support of this machine; asked once per process."""
        with self._doctor_lock:
            if self._doctor is None:
                self._doctor = self.run(["doctor", "--json"], DOCTOR_TIMEOUT_S)
            return self._doctor


def cached_hub_models() -> list[str]:
    """Model repos already in the local Hugging Face cache (no network), sorted; [] when there is no cache."""
    from huggingface_hub import scan_cache_dir  # lazy: only the model picker needs it
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir()
    except CacheNotFound:
        return []
    return sorted(r.repo_id for r in info.repos if r.repo_type == "model")


def sanitize_name(name: str) -> str:
    """A safe file name: no folders, only [A-Za-z0-9._-], no leading dot, a known data suffix."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip(".") or "dataset"
    stem, dot, suffix = base.rpartition(".")
    if not dot or f".{suffix.lower()}" not in DATASET_SUFFIXES:
        raise ValueError(f"{name!r}: upload a {', '.join(DATASET_SUFFIXES)} file")
    return f"{stem[:100] or 'dataset'}.{suffix.lower()}"


def save_upload(
    src: str | Path, home: Path, name: str | None = None, *, inside: Path | None = None, move: bool = False
) -> Path:
    """Copy an uploaded file into <home>/datasets/ under a sanitised name (never anywhere else).

    inside: the folder the source must lie in (Gradio's upload folder): any other path is refused, so a
    client cannot have a file of this machine copied. move: remove the source once it is copied.
    """
    folder = datasets_dir(Path(home)).resolve()
    if inside is not None:
        real, root = Path(src).resolve(), Path(inside).resolve()
        if not (real.is_relative_to(root) and real != root and real.is_file()):
            raise ValueError(f"refusing {src}: not a file uploaded through this page (not inside {root})")
        src = real
    clean = sanitize_name(name or Path(src).name)
    dest, n = folder / clean, 1
    stem, suffix = clean.rsplit(".", 1)
    while dest.exists() and dest.read_bytes() != Path(src).read_bytes():
        dest, n = folder / f"{stem}-{n}.{suffix}", n + 1
    if dest.resolve().parent != folder:  # cannot happen after sanitize_name; checked because it matters
        raise ValueError(f"refusing to write {dest} outside {folder}")
    shutil.copyfile(src, dest)
    if move:
        Path(src).unlink(missing_ok=True)
    return dest
