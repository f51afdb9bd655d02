"""The machinery of the config schema: `doc()` fields that carry their documentation and
allowed range, sections, and the one generic checker (every declared range, then each
section's own rules across fields)."""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import field
from typing import Any

_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the dotted path."""


def doc(default: Any, text: str, key: str | None = None, *, why: str = "",
        nonblank: bool = False, forbid: str = "", **bounds) -> Any:  # fmt: skip
    """A dataclass field with a default and its documentation (lists are copied per instance).
    `key`: its name in YAML when that cannot be a Python name (`checkpoint.async`). What the
    generic checker enforces at load and the reference shows: `gt`, `ge`, `lt`, `le`, the
    allowed range of a number; `nonblank`, a string or list that must not be empty; `forbid`, the
    characters a string must not contain. `why`: what a boundary means ("0: never")."""
    unknown = set(bounds) - set(_BOUNDS)
    if unknown:
        raise TypeError(f"doc() takes bounds {sorted(_BOUNDS)}, not {sorted(unknown)}")
    metadata = {"doc": text, "bounds": bounds, "why": why, "nonblank": nonblank,
                "forbid": forbid}  # fmt: skip
    if key:
        metadata["key"] = key
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type, text: str) -> Any:
    """A nested config section with its documentation."""
    return field(default_factory=cls, metadata={"doc": text})


def field_key(f: dataclasses.Field) -> str:
    """A field's name in YAML and in overrides."""
    return f.metadata.get("key", f.name)


def range_text(f: dataclasses.Field) -> str:
    """The allowed values of a field, as `> 0`, `>= 0, < 1` or `not empty, none of /`; empty
    when any value goes."""
    m = f.metadata
    parts = [f"{_BOUNDS[op]} {bound}" for op, bound in m.get("bounds", {}).items()]
    parts += ["not empty"] if m.get("nonblank") else []
    parts += [f"none of {' '.join(m['forbid'])}"] if m.get("forbid") else []
    return ", ".join(parts)


def require(ok: bool, path: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {what}")


def check_tree(node: Any, path: str) -> None:
    """Check that every number is finite, every field's declared range, then every section's
    own `check(path)`, innermost sections first."""
    for f in dataclasses.fields(node):
        child, where = getattr(node, f.name), join(path, field_key(f))
        if dataclasses.is_dataclass(child):
            check_tree(child, where)
        elif isinstance(child, list):
            for i, item in enumerate(child):
                if dataclasses.is_dataclass(item):
                    check_tree(item, f"{where}[{i}]")
        _check_range(f, child, where)
    if hasattr(node, "check"):
        node.check(path)


def _check_range(f: dataclasses.Field, value: Any, path: str) -> None:
    numbers = value if isinstance(value, (list, tuple)) else [value]
    for item in numbers:  # every number, ranged or not: inf or nan would train a NaN model
        if isinstance(item, float) and not math.isfinite(item):
            require(False, path, f"must be a finite number (got {value!r})")
    m = f.metadata
    why = f" ({m['why']})" if m.get("why") else ""
    bounds = m.get("bounds", {})
    if bounds and not all(getattr(operator, op)(value, bound) for op, bound in bounds.items()):
        require(False, path, f"must be {range_text(f)}{why}")
    if m.get("nonblank"):
        require(len(value.strip() if isinstance(value, str) else value) > 0, path,
                f"must not be empty{why}")  # fmt: skip
    if m.get("forbid"):
        chars = " ".join(m["forbid"])
        require(not any(c in value for c in m["forbid"]), path,
                f"must not contain any of {chars} (got {value!r}){why}")  # fmt: skip


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
