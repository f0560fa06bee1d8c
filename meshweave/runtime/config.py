"""Load a YAML config into the typed schema: defaults, unknown-key hints, type checks, dotted overrides.

Everything here runs before any process group exists. Errors are `ConfigError`s carrying one
line that names the field, the value and the fix; the CLI prints that line and exits with 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from meshweave.runtime.schema import SCHEMA_VERSION, Config


class ConfigError(ValueError):
    """A bad config: the message is one line naming the field, the value and the fix."""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML (or only defaults when path is None), apply `a.b=value` overrides, build the schema."""
    raw = _read_yaml(path) if path is not None else {}
    for item in overrides:
        _apply_override(raw, item)
    return from_dict(raw)


def from_dict(raw: dict[str, Any]) -> Config:
    version = raw.get("version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise ConfigError(f"version: {version!r} is not supported; this meshweave reads version: {SCHEMA_VERSION}")
    return _build(Config, raw, "")


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass a YAML file (see configs/)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (model:, parallel:, ...), got {type(data).__name__}")
    return data


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """`parallel.dp=2` -> raw["parallel"]["dp"] = 2 (the value is parsed as YAML: 2, true, [a, b])."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. --set parallel.dp=2")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    _check_path(parts)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    node[parts[-1]] = value


def _check_path(parts: list[str]) -> None:
    cls: Any = Config
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"--set {'.'.join(parts)}: {'.'.join(parts[:i])} is not a section")
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise ConfigError(_unknown_key_message(".".join(parts[:i + 1]), part, list(hints)))
        cls = hints[part]


def _unknown_key_message(where: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
    return f"{where}: unknown key '{key}'; {hint}"


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in hints:
            raise ConfigError(_unknown_key_message(f"{prefix}{key}", str(key), list(hints)))
    values = {name: _convert(hints[name], raw[name], f"{prefix}{name}") for name in hints if name in raw}
    return cls(**values)


def _convert(tp: Any, value: Any, name: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name + ".")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, name)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}; write e.g. {name.split('.')[-1]}: [a, b]")
        return [_convert(args[0], v, name) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # PyYAML (YAML 1.1) reads 1e-3 as a string: accept it as a number
        except ValueError:
            pass
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value
