"""Dataclass configs loaded from TOML files and `key=value` overrides, every value checked on the way in.

Every configurable thing in llmlab is a dataclass whose defaults work. `load_config(Cls, path, overrides)`
starts from those defaults, applies the TOML file (tables map to nested dataclass fields), then the
overrides (`optim.lr=3e-4`, `model.n_layer=4`, values parsed as TOML literals, falling back to strings),
and finally `check_config` checks the whole result. Each failure is one ConfigError naming the key and the
fix: an unknown key (with the closest valid one), a value of the wrong type, a section given a single value,
a list of the wrong length, a non-finite number (nan and inf are never a setting), a value out of range.

Ranges are declared next to the fields, in the annotation, so the rule and the field are read together:

    lr: PositiveFloat = 6e-4                       # > 0
    betas: tuple[Beta, Beta] = (0.9, 0.95)         # two values, each in [0, 1)
    seed: NonNegativeInt = 0

Rules that tie fields together live in the dataclass's `check()` method, which `check_config` calls after
the fields have passed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import tomllib

from llmlab.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Range:
    """The interval a numeric field may take, e.g. `Annotated[float, Range(gt=0)]` for a learning rate."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def describe(self) -> str:
        low = f"> {self.gt:g}" if self.gt is not None else f">= {self.ge:g}" if self.ge is not None else ""
        high = f"< {self.lt:g}" if self.lt is not None else f"<= {self.le:g}" if self.le is not None else ""
        if low and high:
            left = f"({self.gt:g}" if self.gt is not None else f"[{self.ge:g}"
            right = f"{self.lt:g})" if self.lt is not None else f"{self.le:g}]"
            return f"in {left}, {right}"
        return low or high

    def holds(self, value: float) -> bool:
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))


class NonEmpty:
    """A string field that may not be empty (a name or a path)."""

    @staticmethod
    def describe() -> str:
        return "a non-empty string"

    @staticmethod
    def holds(value: str) -> bool:
        return bool(value.strip())


PositiveInt = Annotated[int, Range(gt=0)]          # sizes and counts
NonNegativeInt = Annotated[int, Range(ge=0)]       # counts where 0 means "none" or "off"
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegativeFloat = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, le=1)]
NonEmptyStr = Annotated[str, NonEmpty()]


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _nested_key(key: str, types_: dict[str, Any]) -> str | None:
    """'optim.lr' when `key` is 'lr' and a section field has such a key (a key written one level too high)."""
    for section, typ in types_.items():
        if dataclasses.is_dataclass(typ) and key in {f.name for f in dataclasses.fields(typ)}:
            return f"{section}.{key}"
    return None


def _unknown_key(key: str, types_: dict[str, Any], where: str) -> ConfigError:
    valid = list(types_)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    nested = _nested_key(key, types_)
    if close:
        hint = f"did you mean {close[0]!r}?"
    elif nested:
        hint = f"did you mean '{where}{nested}' (in the [{where}{nested.split('.')[0]}] section)?"
    else:
        hint = f"valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown config key '{where}{key}'; {hint}")


def _show(value: Any) -> str:
    """A value as a user would write it (TOML-like): 1.5, inf, "text", [0.9]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else str(value)
    return repr(value)


def _default_hint(default: Any) -> str:
    return "" if default is dataclasses.MISSING else f" (default {_show(default)})"


def _bad(name: str, value: Any, problem: str, fix: str, default: Any = dataclasses.MISSING) -> ConfigError:
    return ConfigError(f"config key {name}={_show(value)} {problem}; {fix}{_default_hint(default)}")


def _coerce(value: Any, typ: Any, name: str, default: Any = dataclasses.MISSING) -> Any:
    """Check/convert a value to a field's annotated type (int -> float allowed, None for Optionals) and its
    rules."""
    origin = typing.get_origin(typ)
    if origin is Annotated:
        inner, *rules = typing.get_args(typ)
        value = _coerce(value, inner, name, default)
        for rule in rules:
            if hasattr(rule, "holds") and value is not None and not rule.holds(value):
                fix = f"set {name} to a value {rule.describe()}" if isinstance(rule, Range) \
                    else f"set {name} to {rule.describe()}"
                raise _bad(name, value, f"must be {rule.describe()}", fix, default)
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(typ), name, default)
    if origin is typing.Literal:
        choices = typing.get_args(typ)
        if isinstance(value, bool) or value not in choices:
            raise _bad(name, value, "is not allowed", f"use one of {', '.join(_show(c) for c in choices)}",
                       default)
        return value
    if origin in (list, tuple):
        return _coerce_sequence(value, typ, name, default)
    if origin is dict or typ is dict:
        if not isinstance(value, dict):
            raise _bad(name, value, "needs a table", f"write {name} = {{key = value, ...}}", default)
        return dict(value)
    if dataclasses.is_dataclass(typ):
        if isinstance(value, typ):
            return check_config(value, f"{name}.")
        raise ConfigError(f"config key {name} is a section, not a value (got {_show(value)}); write its keys "
                          f"under [{name}] in TOML or as {name}.KEY=VALUE overrides")
    if typ is Any:
        return value
    return _coerce_scalar(value, typ, name, default)


def _coerce_union(value: Any, args: tuple, name: str, default: Any) -> Any:
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, name, default)
        except ConfigError as e:
            errors.append(e)
    raise errors[0]


def _coerce_sequence(value: Any, typ: Any, name: str, default: Any) -> Any:
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if not isinstance(value, (list, tuple)):
        raise _bad(name, value, "needs a list", f"write {name} = [...]", default)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise _bad(name, value, f"needs {len(args)} values, got {len(value)}",
                       f"give a list of {len(args)}", default)
        return tuple(_coerce(v, a, name, default) for v, a in zip(value, args, strict=True))
    inner = args[0] if args else Any
    return origin(_coerce(v, inner, name, default) for v in value)


def _coerce_scalar(value: Any, typ: Any, name: str, default: Any) -> Any:
    if typ is bool:
        if not isinstance(value, bool):
            raise _bad(name, value, "needs true or false", f"write {name}=true or {name}=false", default)
        return value
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typ in (int, float, str) and (not isinstance(value, typ) or isinstance(value, bool)):
        kind = {int: "an integer", float: "a number", str: "a string"}[typ]
        fix = f"quote it: {name}='\"{value}\"'" if typ is str else f"give {name} {kind}"
        raise _bad(name, value, f"needs {kind}", fix, default)
    if typ is float and not math.isfinite(value):
        raise _bad(name, value, "is not a finite number",
                   f"give {name} a finite value (nan and inf are refused)", default)
    return value


def _defaults(cls: type) -> Any:
    """An instance of `cls` with its defaults (for the hints in messages), or None if it needs arguments."""
    try:
        return cls()
    except TypeError:
        return None


def from_dict(cls: type[T], data: dict[str, Any], base: T | None = None, where: str = "") -> T:
    """Build a `cls` from a nested dict, starting from `base` (or the defaults); unknown keys are errors."""
    if not isinstance(data, dict):
        section = f"[{where.rstrip('.')}]" if where else "the top level"
        raise ConfigError(f"config {section} must be a table of keys, got {_show(data)}")
    obj = base if base is not None else cls()
    types_ = _field_types(cls)
    defaults = _defaults(cls)
    changes = {}
    for key, value in data.items():
        if key not in types_:
            raise _unknown_key(key, types_, where)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = from_dict(type(current), value, current, where=f"{where}{key}.")
        else:
            default = getattr(defaults, key, dataclasses.MISSING)
            changes[key] = _coerce(value, types_[key], f"{where}{key}", default)
    return dataclasses.replace(obj, **changes)


def check_config(cfg: T, where: str = "") -> T:
    """Check every field of a (nested) config dataclass against its annotation, then each section's own
    `check()` (rules between fields); return it with values normalised (ints as floats where floats are due).

    `where` prefixes key names in messages ("optim." when checking an OptimConfig on its own).
    """
    types_ = _field_types(type(cfg))
    defaults = _defaults(type(cfg))
    changes = {}
    for key, typ in types_.items():
        value = getattr(cfg, key)
        default = getattr(defaults, key, dataclasses.MISSING)
        checked = _coerce(value, typ, f"{where}{key}", default)
        if checked is not value:
            changes[key] = checked
    cfg = dataclasses.replace(cfg, **changes) if changes else cfg
    if hasattr(cfg, "check"):
        cfg.check()
    return cfg


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

    return sorted(p.name.removesuffix(".toml") for p in resources.files(package).iterdir()
                  if p.name.endswith(".toml"))


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
    raise ConfigError(f"{name!r} is neither a TOML file nor a preset; {hint}presets: "
                      f"{', '.join(preset_names(package))}")


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing .toml file (see configs/)")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid TOML ({e}); fix the syntax") from e
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror}); check its permissions") from e


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple = (),
                base: T | None = None) -> T:
    """Defaults (or `base`) <- TOML file <- key=value overrides, then `check_config` on the result."""
    cfg = base if base is not None else cls()
    if path is not None:
        cfg = from_dict(cls, read_toml(path), cfg)
    for text in overrides:
        keys, value = parse_override(text)
        cfg = from_dict(cls, _nest(keys, value), cfg)
    return check_config(cfg)


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
