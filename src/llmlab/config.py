"""Dataclass configs loaded from TOML files and `key=value` overrides.

Every configurable thing in llmlab is a dataclass whose defaults work. `load_config(Cls, path, overrides)`
starts from those defaults, applies the TOML file (tables map to nested dataclass fields), then the
overrides (`optim.lr=3e-4`, `model.n_layer=4`, values parsed as TOML literals, falling back to strings).
An unknown key is a ConfigError that names the closest valid key; a value of the wrong type is one too.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import tomllib

from llmlab.errors import ConfigError

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown config key '{where}{key}'; {hint}")


def _coerce(value: Any, typ: Any, name: str) -> Any:
    """Check/convert a TOML value to a field's annotated type (int -> float allowed, None for Optionals)."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is typing.Literal:
        if value not in typing.get_args(typ):
            choices = ", ".join(repr(a) for a in typing.get_args(typ))
            raise ConfigError(f"config key {name!r} = {value!r} is not allowed; use one of {choices}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {name!r} needs a list, got {value!r}")
        (inner, *_) = typing.get_args(typ) or (Any,)
        return origin(_coerce(v, inner, name) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {name!r} needs a table, got {value!r}")
        return dict(value)
    if typ is Any:
        return value
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is bool and not isinstance(value, bool):
        raise ConfigError(f"config key {name!r} needs true or false, got {value!r}")
    if typ in (int, float, str) and (not isinstance(value, typ) or isinstance(value, bool) and typ is not bool):
        raise ConfigError(f"config key {name!r} needs a {typ.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], base: T | None = None, where: str = "") -> T:
    """Build a `cls` from a nested dict, starting from `base` (or the defaults); unknown keys are errors."""
    obj = base if base is not None else cls()
    types_ = _field_types(cls)
    changes = {}
    for key, value in data.items():
        if key not in types_:
            raise _unknown_key(key, list(types_), where)
        typ = types_[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = from_dict(type(current), value, current, where=f"{where}{key}.")
        else:
            changes[key] = _coerce(value, typ, f"{where}{key}")
    return dataclasses.replace(obj, **changes)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], parsed value). Values are TOML literals, else plain strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value; write e.g. optim.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key; write e.g. optim.lr=3e-4")
    if raw.strip() in ("null", "none", "None"):
        return key.split("."), None  # TOML has no null; this unsets an optional key (e.g. model.d_ff=null)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(path):
        out = {part: out}
    return out


def preset_names(package: str) -> list[str]:
    """Names of the TOML presets shipped in `package` (e.g. "llmlab.configs")."""
    from importlib import resources

    return sorted(p.name.removesuffix(".toml") for p in resources.files(package).iterdir() if p.name.endswith(".toml"))


def find_preset(name: str | Path, package: str = "llmlab.configs") -> Path:
    """A TOML file: `name` itself if it is an existing file, else the preset `name` shipped in `package`."""
    from importlib import resources

    path = Path(name)
    if path.is_file():
        return path
    if str(name) in preset_names(package):
        return Path(str(resources.files(package) / f"{name}.toml"))
    close = difflib.get_close_matches(str(name), preset_names(package), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"{name!r} is neither a TOML file nor a preset; {hint}presets: {', '.join(preset_names(package))}")


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing .toml file (see configs/)")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML ({e}); fix the syntax") from e


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple = (),
                base: T | None = None) -> T:
    """Defaults (or `base`) <- TOML file <- key=value overrides."""
    cfg = base if base is not None else cls()
    if path is not None:
        cfg = from_dict(cls, read_toml(path), cfg)
    for text in overrides:
        keys, value = parse_override(text)
        cfg = from_dict(cls, _nest(keys, value), cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Any) -> str:
    """Serialize a (nested) dataclass as TOML; None values are omitted since TOML has no null."""
    scalars, tables = [], []

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(str(k))} = {fmt(x)}" for k, x in v.items()) + "}"
        if isinstance(v, str):
            return json.dumps(v)
        return repr(v)

    def walk(obj: Any, prefix: str) -> None:
        own = []
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                tables.append((f"{prefix}{f.name}", v))
            elif v is not None:
                own.append(f"{f.name} = {fmt(v)}")
        return own

    scalars = walk(cfg, "")
    out = scalars[:]
    while tables:
        name, obj = tables.pop(0)
        out.append(f"\n[{name}]")
        out.extend(walk(obj, f"{name}."))
    return "\n".join(out) + "\n"
