"""Print the README's config reference table from engine.core.config's field help (one source of truth).

python tools/config_table.py > /tmp/table.md
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.core.config import field_help


def fmt(v, name=""):
    if name == "columns":
        return "`{}` (the data's own names)"
    if v == "":
        return "`''`"
    if isinstance(v, tuple):
        return "`[" + ", ".join(map(str, v)) + "]`" if v else "`[]` (all)"
    return f"`{v}`"


def main() -> None:
    print("| field | default | what it does (and what the papers say) |")
    print("|---|---|---|")
    for section in (None, "lora", "train"):
        for name, meta in field_help(section).items():
            key = f"{section}.{name}" if section else name
            choices = f" One of: {', '.join(meta['choices'])}." if "choices" in meta else ""
            print(f"| `{key}` | {fmt(meta['default'], name)} | {meta['help']}{choices} |")


if __name__ == "__main__":
    main()
