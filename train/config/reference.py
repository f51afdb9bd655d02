"""docs/configs.md, generated from the schema: every section and field with its type, default,
allowed range and documentation (tests/test_config.py checks that the file is current)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from rnnscale.train.config.fields import field_key, join, range_text
from rnnscale.train.config.schema import RunConfig


def reference_markdown() -> str:
    lines = [
        "# Config reference",
        "",
        "Generated from the dataclasses in `train/config/` (`schema.py`, `architecture.py`,",
        "`launch_section.py`, `parallel_section.py`; tests/test_config.py checks it is",
        "current; regenerate with `RNNSCALE_UPDATE_DOCS=1",
        ".venv/bin/python -m pytest tests/test_config.py`). Set any field from the command line",
        "as a dotted override:",
        "`rnnscale train CONFIG optim.lr=3e-4 model.mixer_pattern=[gla,attn]`. A value outside",
        "its range is refused at load, naming the field; so is any number that is not finite",
        "(`.inf`, `.nan`), ranged or not.",
    ]
    _reference(RunConfig, "", lines)
    return "\n".join(lines) + "\n"


def _reference(cls: type, path: str, lines: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        tp, name = hints[f.name], join(path, field_key(f))
        if dataclasses.is_dataclass(tp):
            nested.append((tp, name, f.metadata["doc"]))
            continue
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        allowed = f"`{range_text(f)}`" if range_text(f) else ""
        rows.append(f"| `{name}` | {_type_name(tp)} | `{default!r}` | {allowed} | "
                    f"{f.metadata['doc']} |")  # fmt: skip
    if rows:
        lines += ["", "| key | type | default | range | meaning |", "|---|---|---|---|---|", *rows]
    for tp, name, text in nested:
        lines += ["", f"{'#' * min(name.count('.') + 2, 4)} `{name}`", "", text]
        _reference(tp, name, lines)
    for f in dataclasses.fields(cls):  # the fields of each item of a list of sections
        tp = hints[f.name]
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if item is not None and dataclasses.is_dataclass(item):
            name = join(path, field_key(f)) + "[]"
            lines += ["", f"{'#' * min(name.count('.') + 2, 4)} `{name}`", "",
                      f"Each item of `{join(path, field_key(f))}`."]  # fmt: skip
            _reference(item, name, lines)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return tp.__name__
