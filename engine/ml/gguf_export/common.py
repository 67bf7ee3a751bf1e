"""What both GGUF writers share: tensor types, the output-file rules, progress lines, the reference GGUF.

Output files are never replaced without force=True: the check runs before any work, the file is written
under a temporary name beside the target and renamed into place at the end (a crash leaves no
half-written GGUF under the real name).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np

from engine.core.export import ExportError

Q = gguf.GGMLQuantizationType
GGUF_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}

Progress = Callable[[str], None]


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def qtype_for(gguf_name: str, data: np.ndarray, kind: str) -> Q:
    """llama.cpp's converter rule: 1-D tensors and norms stay F32, the rest take the requested type."""
    if data.ndim <= 1 or gguf_name.endswith("_norm.weight"):
        return Q.F32
    return GGUF_TYPES[kind]


def encode(data: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q]:
    """The tensor in `qtype` (gguf.quants); rows that do not split into Q8_0 blocks fall back to F16, as in
    llama.cpp's converter."""
    try:
        return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), Q.F16), Q.F16


def check_outputs(*paths: Path, force: bool) -> None:
    """Refuse before any work if an output exists (unless force) or is a folder."""
    for p in paths:
        if p.is_dir():
            raise ExportError(f"{p} is a folder; give a file name such as {p / 'model.gguf'}")
        if p.exists() and not force:
            raise ExportError(f"{p} exists; choose another name (or pass --force to replace it)")


@contextmanager
def atomic_target(out: Path):
    """A temporary path beside `out`, renamed to `out` when the block succeeds, removed when it fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_file(w: gguf.GGUFWriter, tmp: Path, progress: Progress) -> None:
    t0 = time.monotonic()
    w.write_header_to_file(path=tmp)
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    progress(f"gguf: wrote {tmp.stat().st_size / 1e6:.2f} MB in {time.monotonic() - t0:.1f} s")


def reader(path: Path | None) -> gguf.GGUFReader | None:
    if path is None:
        return None
    try:
        return gguf.GGUFReader(path)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read {path} as GGUF ({type(e).__name__}: {e})") from None


def tensor_shapes(r: gguf.GGUFReader) -> dict[str, tuple[int, ...]]:
    """name → shape in ggml order (ne[0] = the row length, i.e. a weight's input features)."""
    return {t.name: tuple(int(n) for n in t.shape) for t in r.tensors}


def architecture(r: gguf.GGUFReader) -> str:
    return str(r.fields["general.architecture"].contents())


class Every:
    """Progress lines every `step` items out of `total` (and at the end), never more often."""

    def __init__(self, total: int, what: str, progress: Progress, parts: int = 10):
        self.total, self.what, self.progress = total, what, progress
        self.step = max(1, -(-total // parts))

    def __call__(self, i: int) -> None:
        if i == self.total or i % self.step == 0:
            self.progress(f"gguf: {self.what} {i}/{self.total}")
