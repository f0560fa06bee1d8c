"""Load a YAML config into the typed schema: defaults, unknown-key hints, type checks, dotted overrides.

Everything here runs before any process group exists, and imports no torch. Errors are
`ConfigError`s carrying one line that names the field, the value and the fix; the CLI prints that
line and exits with 2. The `model:` section's dataclass depends on its `kind`, which core cannot
know: callers pass `model_config`, a function from kind name to config class (train/config.py binds
the model registry).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from meshweave.core.errors import ConfigError
from meshweave.core.schema import INT_LIMIT, SCHEMA_VERSION, Config, Range

__all__ = ["ConfigError", "ModelConfigLookup", "check_ranges", "dump_yaml", "from_dict", "load_config",
           "range_problems", "to_dict"]

ModelConfigLookup = Callable[[str], type]  # model kind -> its config dataclass; KeyError(message) if unknown
DEFAULT_MODEL_KIND = "llama"


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...],
                model_config: ModelConfigLookup) -> Config:
    """Read YAML (or only defaults when path is None), apply `a.b=value` overrides, build the schema."""
    raw = _read_yaml(path) if path is not None else {}
    for item in overrides:
        _apply_override(raw, item, model_config)
    return from_dict(raw, model_config)


def from_dict(raw: dict[str, Any], model_config: ModelConfigLookup) -> Config:
    version = raw.get("version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise ConfigError(f"version: {_short(version)} is not supported; this meshweave reads version: {SCHEMA_VERSION}")
    raw = _adaptive_shorthand(raw)
    model_raw = raw.get("model")
    cfg = _build(Config, {k: v for k, v in raw.items() if k != "model"}, "")
    cfg.model = _build(_model_class(model_raw, model_config), model_raw, "model.")
    return cfg


def _adaptive_shorthand(raw: dict[str, Any]) -> dict[str, Any]:
    """`parallel.sp: adaptive` means `parallel.adaptive.enabled: true` over a mesh with sp 1: the adaptive runtime
    carves its SP groups out of the data-parallel ranks, so every other part of meshweave keeps an integer sp."""
    parallel = raw.get("parallel")
    if not isinstance(parallel, dict) or parallel.get("sp") != "adaptive":
        return raw
    adaptive = parallel.get("adaptive") if parallel.get("adaptive") is not None else {}
    if not isinstance(adaptive, dict):
        raise ConfigError(f"parallel.adaptive: expected a mapping, got {_short(adaptive)}")
    return {**raw, "parallel": {**parallel, "sp": 1, "adaptive": {**adaptive, "enabled": True}}}


def _model_kind(model_raw: Any) -> str:
    kind = model_raw.get("kind", DEFAULT_MODEL_KIND) if isinstance(model_raw, dict) else DEFAULT_MODEL_KIND
    if not isinstance(kind, str):
        raise ConfigError(f"model.kind: expected a model kind name, got {_short(kind)}")
    return kind


def _model_class(model_raw: Any, model_config: ModelConfigLookup) -> type:
    kind = _model_kind(model_raw)
    try:
        return model_config(kind)
    except KeyError as err:
        raise ConfigError(f"model.kind: {err.args[0]}") from None


def _short(value: Any, limit: int = 80) -> str:
    """repr() of a value, cut to a bounded prefix so that a huge value never floods an error line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _clip(text: str, limit: int = 80) -> str:
    """A name or key from the user (a dotted path, a YAML key) cut to a bounded prefix for an error line."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def range_problems(section: Any, prefix: str = "") -> list[str]:
    """One line per numeric field outside its declared `Range` (schema.py and the model kinds' config
    classes declare them beside each field), walking nested sections; every float must be finite and
    every int must fit 64 bits, declared or not. Runs on a loaded config: no world size needed."""
    problems: list[str] = []
    hints = typing.get_type_hints(type(section), include_extras=True)
    for name, tp in hints.items():
        value = getattr(section, name, None)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            problems += range_problems(value, f"{prefix}{name}.")
            continue
        problem = _range_problem(value, _declared_range(tp))
        if problem:
            problems.append(f"{prefix}{name}: {_short(value)} {problem}")
    return problems


def check_ranges(cfg: Config) -> None:
    """Raise a ConfigError with the first out-of-range field (see `range_problems`)."""
    problems = range_problems(cfg)
    if problems:
        more = f" (and {len(problems) - 1} more out-of-range field(s))" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more)


def _declared_range(tp: Any) -> Range | None:
    """The Range in `Annotated[int, Range(...)]`, also inside `X | None`; None when there is none."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next((r for arg in typing.get_args(tp) if (r := _declared_range(arg)) is not None), None)
    if typing.get_origin(tp) is typing.Annotated:
        return next((m for m in tp.__metadata__ if isinstance(m, Range)), None)
    return None


def _range_problem(value: Any, declared: Range | None) -> str | None:
    """What is wrong with a numeric value, or with one number of a list (None when fine or not a number)."""
    if isinstance(value, list):
        return next((f"holds {item!r}, which {problem}" for item in value
                     if (problem := _range_problem(item, declared)) is not None), None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    allowed = declared.describe() if declared is not None else "a finite number"
    if isinstance(value, float) and not math.isfinite(value) and (declared is None or value not in declared.also):
        return f"is not a finite number; use a value {allowed}"
    if isinstance(value, int) and abs(value) > INT_LIMIT:
        return f"does not fit a 64-bit integer; use a value {allowed} below 2**63"
    if declared is not None and not declared.accepts(value):
        return f"must be {allowed}"
    return None


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _read_yaml(path: str | Path) -> dict[str, Any]:
    from meshweave.core.yaml_safe import YamlRefused, load_yaml_config

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass a YAML file (see configs/)")
    try:
        return load_yaml_config(p)
    except YamlRefused as err:
        raise ConfigError(str(err)) from None


def _apply_override(raw: dict[str, Any], item: str, model_config: ModelConfigLookup) -> None:
    """`parallel.dp=2` -> raw["parallel"]["dp"] = 2 (the value is parsed as YAML: 2, true, [a, b])."""
    if "=" not in item:
        raise ConfigError(f"--set {_short(item)}: expected KEY=VALUE with a dotted key, e.g. --set parallel.dp=2")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    _check_path(parts, raw, model_config)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {_clip(key)}: {_clip(part)} is not a section")
    node[parts[-1]] = value


def _check_path(parts: list[str], raw: dict[str, Any], model_config: ModelConfigLookup) -> None:
    cls: Any = Config
    for i, part in enumerate(parts):
        if i == 1 and parts[0] == "model":
            cls = _model_class(raw.get("model"), model_config)
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"--set {_clip('.'.join(parts))}: {_clip('.'.join(parts[:i]))} is not a section")
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise ConfigError(_unknown_key_message(".".join(parts[:i + 1]), part, list(hints)))
        cls = hints[part]


def _unknown_key_message(where: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6) if len(key) <= 200 else []
    hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
    return f"{_clip(where)}: unknown key '{_clip(key)}'; {hint}"


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {_short(raw)}")
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
    if origin is typing.Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            raise ConfigError(f"{name}: {_short(value)} is not one of {', '.join(map(str, args))}")
        return value
    if tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, name)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {_short(value)}; write e.g. {name.split('.')[-1]}: [a, b]")
        return [_convert(args[0], v, name) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{name}: {_short(value)} is too large for a floating-point number") from None
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # PyYAML (YAML 1.1) reads 1e-3 as a string: accept it as a number
        except ValueError:
            pass
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{name}: expected {tp.__name__}, got {_short(value)} ({type(value).__name__})")
    return value
