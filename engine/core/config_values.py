"""Plain YAML/JSON/form values → typed config fields: the coercion behind RunConfig.from_dict, the layers
syntax ('0-3,8'), and how a bad value is shown in a message (cut short). Stdlib only; engine.core.config
re-exports parse_layers and shown.
"""

from __future__ import annotations

import dataclasses
import re
import reprlib
from collections.abc import Mapping
from typing import Any

from engine.core.data_fields import parse_columns
from engine.core.devices import normalize_devices

MAX_LAYER = 100_000  # no model has more layers; a range beyond it is a typo, not a list to build

# ---- messages ----------------------------------------------------------------------------------

_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 80, 80, 6, 6, 2


def shown(value: Any) -> str:
    """A value as it appears in a message: repr, cut short (never the whole of a huge or nested value)."""
    return _SHORT.repr(value)


# ---- helpers for from_dict ---------------------------------------------------------------------


def _section(d: Mapping[str, Any], key: str, problems: list[str]) -> Mapping[str, Any]:
    v = d.get(key) or {}
    if not isinstance(v, Mapping):
        problems.append(f"{key} = {shown(v)}: must be a mapping of {key} fields")
        return {}
    return v


def parse_layers(value: Any) -> tuple[int, ...]:
    """'0-3,8' → (0, 1, 2, 3, 8); a list of ints passes through; '' or None → () (all layers)."""
    if value is None or value == "" or value == []:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, str):
        out: list[int] = []
        for part in value.replace(" ", "").split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise ValueError(f"cannot read {shown(part)}; write layers like '0-11' or '0,2,4-6'")
            a, b = int(m.group(1)), int(m.group(2) or m.group(1))
            if b > MAX_LAYER:
                raise ValueError(f"layer {b} in {part[:40]!r}: layer indices are 0–{MAX_LAYER}")
            if b < a:
                raise ValueError(f"range {part!r} runs backwards; write it as '{b}-{a}'")
            out.extend(range(a, b + 1))
        return tuple(sorted(set(out)))
    if isinstance(value, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return tuple(sorted(set(value)))
    raise ValueError("give a list of integers or a string like '0-11'")


def _coerce_fields(
    cls: type, d: Mapping[str, Any], prefix: str, problems: list[str], skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Type-check and convert one dataclass's fields from plain JSON/YAML values."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    out: dict[str, Any] = {}
    for key in d:
        if key not in fields and key not in skip:
            near = [n for n in fields if n.startswith(str(key)[:3])]
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            problems.append(f"{prefix}{str(key)[:80]}: unknown field{hint}; known: {', '.join(fields)}")
    for name, f in fields.items():
        if name not in d:
            continue
        v, kind = d[name], f.type
        where = f"{prefix}{name}"
        try:
            out[name] = _coerce(v, kind, name)
        except (TypeError, ValueError, OverflowError) as e:
            problems.append(f"{where} = {shown(v)}: {e}")
    return out


def _coerce(v: Any, kind: str, name: str) -> Any:
    # Field annotations are strings under `from __future__ import annotations`.
    if kind == "bool":
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "1", "0"):
            return v.lower() in ("true", "yes", "1")
        raise TypeError("must be true or false")
    if kind == "int":
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise TypeError("must be an integer")
        if isinstance(v, str):  # "8" or "8.0" from a form; never "8.5" silently cut to 8
            try:
                return int(v.strip())
            except ValueError:
                try:
                    v = float(v)
                except ValueError:
                    raise TypeError("must be an integer") from None
        if isinstance(v, float) and not v.is_integer():
            raise TypeError("must be a whole number")
        return int(v)
    if kind == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise TypeError("must be a number")
        return float(v)
    if kind == "str" and name == "devices":  # YAML reads `devices: 2` as a number and `[0, 1]` as a list
        return normalize_devices(v)
    if kind == "str":
        if not isinstance(v, str):
            raise TypeError("must be a string")
        return v
    if kind == "tuple[int, ...]":
        return parse_layers(v)
    if kind == "tuple[tuple[str, str], ...]":
        return parse_columns(v)
    if kind == "tuple[str, ...]":
        if isinstance(v, str):
            v = [s for s in re.split(r"[,\s]+", v) if s]
        if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
            raise TypeError("must be a list of strings")
        return tuple(v)
    raise TypeError(f"unsupported field type {kind}")  # a new field type needs a branch above
