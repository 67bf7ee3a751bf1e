"""What is wrong with a data file that 🤗 datasets could not read, said with the file, the line or byte, the fix.

    sniff(path)                 # before loading: UTF-16/32 byte-order marks, NUL bytes, a JSONL first line
    diagnose(path) -> str|None  # after a failed load: the first undecodable byte, the first bad JSON line

datasets' loaders report pyarrow's "JSON parse error: ... in row 2" or a UnicodeDecodeError inside some
chunk; users need the file, the line (1-based, as editors count) or the byte offset, and what to do.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path

SNIFF_BYTES = 64 * 1024
BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def resave(path: Path, encoding: str = "ITS-ENCODING") -> str:
    return f"re-save it as UTF-8 (`iconv -f {encoding} -t UTF-8 {path.name} > fixed{path.suffix}`, or 'Save as UTF-8' in an editor)"


class DatasetError(ValueError):
    """A dataset problem, naming the file, the line or row and what is wrong."""


def sniff(path: Path) -> None:
    """Refuse at once what is not UTF-8 text (before datasets reads it, so nothing garbled gets through:
    UTF-16 without a byte-order mark decodes as 'valid' UTF-8 full of NUL characters)."""
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
    for bom, name in BOMS:
        if head.startswith(bom):
            raise DatasetError(
                f"{path.name}: the file is {name} (byte-order mark at byte 0), not UTF-8; {resave(path, name)}"
            )
    nul = head.find(b"\x00")
    if nul >= 0:
        raise DatasetError(
            f"{path.name}: NUL byte at byte offset {nul}: the file is binary or UTF-16/32 text, not UTF-8; {resave(path, 'UTF-16')}"
        )
    if path.suffix.lower() == ".jsonl":
        _first_jsonl_line(path, head)


def _first_jsonl_line(path: Path, head: bytes) -> None:
    """A first line that is valid JSON but not an object (datasets would read `[1, 2]` as two text rows)."""
    for i, raw in enumerate(head.split(b"\n")[:-1], 1):
        if raw.strip():
            try:
                obj = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                return  # the load, or diagnose() after it, says what is wrong
            if not isinstance(obj, dict):
                raise DatasetError(f"{path.name} line {i}: each line must be a JSON object, got {type(obj).__name__}")
            return


def diagnose(path: Path) -> str | None:
    """The first problem found in the file (not UTF-8, a bad JSONL line), or None."""
    return first_undecodable(path) or (jsonl_problem(path) if path.suffix.lower() == ".jsonl" else None)


def first_undecodable(path: Path, chunk: int = 1 << 20) -> str | None:
    """'name: byte 0xff at byte offset N is not UTF-8 ...' for the first invalid byte, else None."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset = 0
    with path.open("rb") as f:
        while True:
            data = f.read(chunk)
            pending = len(dec.getstate()[0])  # bytes of an unfinished character held from the last chunk
            try:
                dec.decode(data, final=not data)
            except UnicodeDecodeError as e:
                at = offset - pending + e.start
                bad = (e.object[e.start : e.start + 1] or b"?")[0]
                return (
                    f"{path.name}: byte 0x{bad:02x} at byte offset {at} is not UTF-8 (the file is binary, UTF-16 "
                    f"or another encoding such as Latin-1); {resave(path)}"
                )
            if not data:
                return None
            offset += len(data)


def jsonl_problem(path: Path) -> str | None:
    """The first line that is not one JSON object, or holds a lone UTF-16 surrogate; None if every line is fine."""
    with path.open(encoding="utf-8-sig") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                return f"{path.name} line {i}: not valid JSON ({e.msg} at column {e.colno})"
            if not isinstance(obj, dict):
                return f"{path.name} line {i}: each line must be a JSON object, got {type(obj).__name__}"
            bad = lone_surrogate(obj)
            if bad:
                return (
                    f"{path.name} line {i}: a lone UTF-16 surrogate {bad} in a string (half of an emoji cut in "
                    "two?): such text cannot be encoded or tokenized; fix or remove that character"
                )
    return None


def lone_surrogate(obj) -> str | None:
    r"""'\\ud83d' for the first unpaired surrogate in any string of a JSON value (json.loads lets them through)."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as e:
            return "\\u" + format(ord(obj[e.start]), "04x")
        return None
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    keys = obj.keys() if isinstance(obj, dict) else ()
    for x in (*keys, *items):
        bad = lone_surrogate(x)
        if bad:
            return bad
    return None


def json_field(path: Path) -> str | None:
    """For a .json file: None for a list of row objects, 'data' for {"data": [...]}; DatasetError otherwise."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        hint = "; one object per line is JSON Lines: name the file .jsonl" if e.msg == "Extra data" else ""
        raise DatasetError(f"{path.name} line {e.lineno}: not valid JSON ({e.msg}){hint}") from None
    field = None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj, field = obj["data"], "data"
    if not isinstance(obj, list):
        keys = f" with keys {sorted(obj)[:8]}" if isinstance(obj, dict) else ""
        raise DatasetError(
            f"{path.name}: expected a list of row objects (or {{'data': [...]}}), got one {type(obj).__name__}{keys}"
        )
    for i, r in enumerate(obj, 1):
        if not isinstance(r, dict):
            raise DatasetError(f"{path.name} item {i}: must be an object, got {type(r).__name__}")
        bad = lone_surrogate(r)
        if bad:
            raise DatasetError(f"{path.name} item {i}: a lone UTF-16 surrogate {bad} in a string; fix that character")
    if not obj:
        raise DatasetError(f"{path.name}: the list is empty: no rows")
    return field


def jsonl_line(path: Path, row: int) -> int:
    """The 1-based line number of 0-based row `row` of a JSONL file (blank lines are not rows)."""
    seen = -1
    with path.open(encoding="utf-8-sig") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                seen += 1
                if seen == row:
                    return i
    return row + 1
