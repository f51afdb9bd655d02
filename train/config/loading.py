"""Loading a config: YAML files, dotted overrides, the typed tree built and checked, the tree
written back as plain dicts or YAML; and the keys that moved to another section, carried over
with a warning (`MOVED`)."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from rnnscale.train.config.architecture import ModelSection
from rnnscale.train.config.fields import ConfigError, check_tree, field_key, join
from rnnscale.train.config.schema import RunConfig
from rnnscale.train.mixers import REGISTRY


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string; read it as a number, as YAML 1.2 and users do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read a YAML config, apply `key.sub=value` overrides, check everything, return the tree."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (configs/ holds the shipped ones)")
    try:
        raw = _yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    in_file, given = _copy(raw.get("run")), {}
    for item in overrides:
        apply_override(raw, item)
        apply_override(given, item)  # what the command line set, to tell it from the file's
    _name_from_dir(raw, in_file if isinstance(in_file, dict) else {}, given.get("run"))
    return from_dict(raw, source=str(path))


def _name_from_dir(raw: dict, in_file: dict, given: Any) -> None:
    """run.name becomes run.dir's last component where run.dir is set and run.name is not, by
    the same level or a later one (the YAML file, then the overrides as one level): a run.dir
    of its own is a run of its own, with its own name and so its own wandb id."""
    given = given if isinstance(given, dict) else {}
    if "name" in given or not ("dir" in given or ("dir" in in_file and "name" not in in_file)):
        return
    run_dir = raw["run"].get("dir") if isinstance(raw.get("run"), dict) else None
    if isinstance(run_dir, str) and Path(run_dir).name:
        raw["run"]["name"] = Path(run_dir).name


def from_dict(raw: dict, source: str = "config") -> RunConfig:
    """Build and check a RunConfig from plain dicts (as YAML gives them)."""
    try:
        raw = migrate(raw, warn=True)
        cfg = _build(RunConfig, raw, "")
        check_tree(cfg, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    _warn_tiling(cfg.model)
    return cfg


_TILINGS_SAID: set[tuple[tuple[str, ...], int]] = set()


def _warn_tiling(model: ModelSection) -> None:
    """Say once per process, naming the layers, that a pattern does not tile num_layers
    evenly: [gdn, gdn, attn] over 4 layers is gdn, gdn, attn, gdn, likely not what was meant."""
    pattern, n = model.mixer_pattern, model.num_layers
    if n % len(pattern) == 0 or (tuple(pattern), n) in _TILINGS_SAID:
        return
    _TILINGS_SAID.add((tuple(pattern), n))
    from rnnscale.train.notice import notice

    notice(f"model.mixer_pattern [{', '.join(pattern)}] ({len(pattern)} mixers) does not divide "
           f"model.num_layers={n}: the layers are [{', '.join(model.layer_types())}]; set "
           f"num_layers to a multiple of {len(pattern)} or write out every layer's mixer",
           warning=True)  # fmt: skip


def _moved() -> dict[tuple[str, ...], tuple[str, ...]]:
    """Old dotted path -> new one: the speed settings that lived in `model` until 2026-12."""
    moved = {("model", "loss_chunk_tokens"): ("kernels", "loss_chunk_tokens")}
    for name, mixer in REGISTRY.items():
        if mixer.family is not None:
            moved[("model", name, "chunk_size")] = ("kernels", "chunk_size", mixer.family)
    return moved


MOVED = _moved()


def migrate(raw: dict, warn: bool = False) -> dict:
    """`raw` (plain dicts) with the keys of `MOVED` at their new places (a copy; with `warn`,
    a notice names each). Old configs wrote a chunk size for every mixer, used or not: only
    the mixers of `model.mixer_pattern` count, the first of them wins where two of one family
    disagree, and a value already under `kernels` wins over an old one (each said)."""
    out = _copy(raw)
    model = out.get("model") if isinstance(out.get("model"), dict) else {}
    pattern = model.get("mixer_pattern", ModelSection().mixer_pattern)
    used = [m for m in pattern if m in REGISTRY] if isinstance(pattern, list) else list(REGISTRY)
    said = []
    for old, new in sorted(MOVED.items(), key=lambda kv: _order(kv[0], used)):
        parent = _find(out, old[:-1])
        if not isinstance(parent, dict) or old[-1] not in parent:
            continue
        value = parent.pop(old[-1])
        if len(old) == 3 and old[1] not in used:
            continue  # a mixer the model does not have: its chunk size never applied
        target = out
        for part in new[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{'.'.join(old)}: moved to {'.'.join(new)}, but {part} is "
                                  f"not a section")  # fmt: skip
        was, now = ".".join(old), ".".join(new)
        if new[-1] not in target:
            target[new[-1]] = value
            said.append(f"{was} is now {now} (a speed setting, not the architecture): read "
                        f"as {now}: {value}")  # fmt: skip
        elif target[new[-1]] != value:
            said.append(f"{was} ({value}) is now {now}, which is {target[new[-1]]} here: "
                        f"{was} is ignored")  # fmt: skip
    if warn and said:
        from rnnscale.train.notice import notice

        for line in said:
            notice(line, warning=True)
    return out


def _order(old: tuple[str, ...], used: list[str]) -> int:
    """Old keys in the order of the mixer pattern (the first mixer of a family wins)."""
    return used.index(old[1]) if len(old) == 3 and old[1] in used else len(used)


def model_architecture(model: dict) -> dict:
    """A `model` section as plain dicts without the keys that moved to `kernels` (what a
    checkpoint made before the move recorded as its model)."""
    model = _copy(model)
    for old in MOVED:
        parent = _find({"model": model}, old[:-1])
        if isinstance(parent, dict):
            parent.pop(old[-1], None)
    return model


def _copy(raw: Any) -> Any:
    return {k: _copy(v) for k, v in raw.items()} if isinstance(raw, dict) else raw


def _find(raw: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(raw, dict):
            return None
        raw = raw.get(part)
    return raw


def apply_override(raw: dict, item: str) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML: 3e-4, true, [a, b]) in place."""
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    try:
        value = _yaml(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parents[: i + 1])} is not a section")
        node = child
    node[leaf] = value


def to_dict(cfg: Any) -> dict:
    """The config tree as plain dicts and lists (for YAML and for checkpoints)."""
    if dataclasses.is_dataclass(cfg):
        return {field_key(f): to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list | tuple):
        return [to_dict(v) for v in cfg]
    return cfg


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def _build(cls: type, raw: Any, path: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'top level'}: expected a mapping, got {_show(raw)}")
    fields = {field_key(f): f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            raise ConfigError(_unknown_key(join(path, str(key)), str(key), list(fields)))
    kwargs = {}
    for key, value in raw.items():
        name = fields[key].name
        kwargs[name] = _convert(hints[name], value, join(path, key))
    return cls(**kwargs)


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            options = ", ".join(map(str, allowed))
            raise ConfigError(f"{path}: {_show(value)} is not one of: {options}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list like [a, b], got {_show(value)}")
        (inner,) = typing.get_args(tp)
        return [_convert(inner, v, f"{path}[{i}]") for i, v in enumerate(value)]
    return _scalar(tp, value, path)


_SCALARS = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
}


def _scalar(tp: Any, value: Any, path: str) -> Any:
    if tp not in _SCALARS:
        raise TypeError(f"config field {path} has an unsupported type {tp!r}")
    what, fits = _SCALARS[tp]
    if not fits(value):
        raise ConfigError(f"{path}: expected {what}, got {_show(value)}")
    return float(value) if tp is float else value


def _unknown_key(path: str, key: str, valid: list[str]) -> str:
    parent = path.rpartition(".")[0]
    msg = f"{path}: unknown key; valid keys{' under ' + parent if parent else ''}: "
    msg += ", ".join(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        msg += f" (did you mean {join(parent, close[0])}?)"
    return msg


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"
