"""Reading a run config file without trusting it: a size cap, UTF-8 with the byte offset of a bad byte, a
nesting limit (a 100k-deep JSON or 20k-deep YAML is refused before Python's recursion limit), and YAML
aliases that may expand to at most MAX_NODES values (a "billion laughs" file is refused, not expanded).
Stdlib (+ PyYAML, imported lazily); every failure is a ConfigError naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.core.config import ConfigError

MAX_CONFIG_BYTES = 1 << 20  # a run config is a few hundred bytes
MAX_DEPTH = 16  # a config is 3 levels deep (top, lora/train, a list)
MAX_NODES = 10_000  # values after YAML alias expansion


def read_config_file(p: Path) -> Any:
    """The parsed content of a config file, or ConfigError naming the file and what is wrong with it."""
    size = p.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError([f"{p}: {size:,} bytes is not a run config (at most {MAX_CONFIG_BYTES:,} bytes)"])
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(
            [f"{p}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save the file as UTF-8"]
        ) from None
    if p.suffix.lower() in (".yaml", ".yml"):
        data = _load_yaml(p, text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError([f"{p}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"]) from None
        except RecursionError:
            raise ConfigError([f"{p}: nested more than {MAX_DEPTH} levels deep; a run config has 3"]) from None
    if _depth(data) > MAX_DEPTH:
        raise ConfigError([f"{p}: nested more than {MAX_DEPTH} levels deep; a run config has 3"])
    return data


def _load_yaml(p: Path, text: str) -> Any:
    import yaml  # lazy: PyYAML comes with transformers; only file loading needs it

    class BoundedLoader(yaml.SafeLoader):
        """SafeLoader that counts nesting and the values aliases expand to, refusing past the limits."""

        def __init__(self, stream):
            super().__init__(stream)
            self.depth, self.sizes = 0, {}

        def compose_node(self, parent, index):
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ConfigError([f"{p}: nested more than {MAX_DEPTH} levels deep; a run config has 3"])
            try:
                node = super().compose_node(parent, index)
            finally:
                self.depth -= 1
            if id(node) not in self.sizes:  # an alias returns its anchor's node, already sized
                kids = node.value if isinstance(node.value, list) else []
                flat = [n for kid in kids for n in (kid if isinstance(kid, tuple) else (kid,))]
                self.sizes[id(node)] = 1 + sum(self.sizes.get(id(k), 1) for k in flat)
            if self.sizes[id(node)] > MAX_NODES:
                raise ConfigError(
                    [f"{p}: YAML aliases expand to more than {MAX_NODES:,} values; a run config has a few dozen"]
                )
            return node

    try:
        return yaml.load(text, Loader=BoundedLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{p}: not valid YAML: {' '.join(str(e).split())[:300]}"]) from None
    except RecursionError:
        raise ConfigError([f"{p}: nested more than {MAX_DEPTH} levels deep; a run config has 3"]) from None


def _depth(data: Any) -> int:
    """How deep lists and mappings nest (iterative: a deep document must not exhaust the stack)."""
    deepest, todo = 0, [(data, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if d <= MAX_DEPTH:
                todo.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest
