"""The machinery of the config schema: `doc()` fields that carry their documentation and
allowed range, sections, and the one generic checker (every declared range, then each
section's own rules across fields)."""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import field
from typing import Any

_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the dotted path."""


def doc(default: Any, text: str, key: str | None = None, *, why: str = "", **bounds) -> Any:
    """A dataclass field with a default and its documentation (lists are copied per instance).
    `key`: its name in YAML when that cannot be a Python name (`checkpoint.async`); `gt`, `ge`,
    `lt`, `le`: the allowed range of a number (checked at load, shown in the reference), `why`:
    what a boundary value means ("0: never")."""
    unknown = set(bounds) - set(_BOUNDS)
    if unknown:
        raise TypeError(f"doc() takes bounds {sorted(_BOUNDS)}, not {sorted(unknown)}")
    metadata = {"doc": text, "bounds": bounds, "why": why}
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
    """The allowed range of a field, as `> 0` or `>= 0, < 1`; empty when any value goes."""
    return ", ".join(f"{_BOUNDS[op]} {bound}" for op, bound in f.metadata.get("bounds", {}).items())


def require(ok: bool, path: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {what}")


def check_tree(node: Any, path: str) -> None:
    """Check every field's declared range, then every section's own `check(path)`, innermost
    sections first."""
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
    bounds = f.metadata.get("bounds", {})
    if bounds and not all(getattr(operator, op)(value, bound) for op, bound in bounds.items()):
        why = f.metadata.get("why")
        require(False, path, f"must be {range_text(f)}{f' ({why})' if why else ''}")


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
