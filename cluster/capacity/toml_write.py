"""A small TOML writer for the planner's files: tables of scalars, lists of scalars and
arrays of tables, which is all a profile holds (the standard library only reads TOML)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

_BARE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def key(name: str) -> str:
    return name if name and set(name) <= _BARE else json.dumps(name, ensure_ascii=False)


def value(v: Any) -> str:
    """One TOML value: bool, int, float, str or a list of them."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        if "\n" in v and all(c in "\n\t" or c >= " " for c in v):
            body = v.replace("\\", "\\\\").replace('"""', '""\\"')
            return '"""\n' + body + ('\\\n"""' if body.endswith('"') else '"""')
        return json.dumps(v, ensure_ascii=False)  # JSON's escapes are TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {type(v).__name__}")


def dumps(doc: Mapping[str, Any]) -> str:
    """Top-level scalars, then [tables] of scalars, then [[arrays.of.tables]] (one level of nesting)."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping]] = []
    for k, v in doc.items():
        if isinstance(v, Mapping):
            tables.append((k, v))
        else:
            lines.append(f"{key(k)} = {value(v)}")
    for name, table in tables:
        scalars = {
            k: v for k, v in table.items() if not _is_table_list(v) and not isinstance(v, Mapping)
        }
        if scalars or not any(_is_table_list(v) for v in table.values()):
            lines += ["", f"[{key(name)}]"] + [f"{key(k)} = {value(v)}" for k, v in scalars.items()]
        for k, v in table.items():
            if _is_table_list(v):
                for row in v:
                    lines += ["", f"[[{key(name)}.{key(k)}]]"] + [
                        f"{key(rk)} = {value(rv)}" for rk, rv in row.items()
                    ]
    return "\n".join(lines).lstrip("\n") + "\n"


def _is_table_list(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and bool(v) and all(isinstance(x, Mapping) for x in v)
