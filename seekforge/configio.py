"""Configs as dataclasses: strict loading from YAML/TOML/builtins, `key=value` overrides, atomic saving.

A typo in a config must stop a run before it spends GPU hours, so `from_dict` rejects unknown keys
(suggesting the closest valid one) and values of the wrong type (naming the key, the expected and the
got type). Numbers follow one rule everywhere: an int is accepted where a float is expected, a bool is
never accepted as a number. YAML is read with one fix over YAML 1.1: `3e-4` is a float (plain PyYAML
reads it as the string "3e-4" because the mantissa has no dot), so files and overrides agree.

The atomic file helpers live here because a config is the first file every run writes; checkpoints,
metrics and reports reuse them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import os
import re
import tempfile
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from seekforge.errors import ConfigError

T = TypeVar("T")

__all__ = [
    "from_dict",
    "to_dict",
    "load_config",
    "save_config",
    "parse_override",
    "apply_overrides",
    "read_config_file",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_dir",
]


# ---------------------------------------------------------------------------------------------------
# YAML with YAML-1.2-style floats


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3`, `3E+5` and `2e5` as floats (YAML 1.1 demands a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


# ---------------------------------------------------------------------------------------------------
# Atomic files


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or create inside `path` durable. A no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (PermissionError, IsADirectoryError):  # Windows cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> Path:
    """Write `data` to `path` so that readers see either the old file or the whole new one.

    Writes a temporary sibling, fsyncs it, renames it over `path`, fsyncs the directory. On any
    failure (a full disk included) the temporary file is removed and the old file is untouched.
    `durable=False` skips both fsyncs, for caches whose readers check a checksum: a running system
    still never shows a half-written file, but a power cut may leave one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from colleagues
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write_bytes` of `text` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------------
# dict -> dataclass, with strict checking


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is type(None):
        return "None"
    if tp is Any:
        return "any value"
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        args = get_args(tp)
        base = getattr(origin, "__name__", str(origin))
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{_type_name(args[0])}, ...]"
        return f"{base}[{', '.join(_type_name(a) for a in args)}]" if args else base
    return getattr(tp, "__name__", str(tp))


def _got(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} ({text})"


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _type_error(where: str, key: str, tp: Any, value: Any, hint: str = "") -> ConfigError:
    name = key or "the top level"
    fix = hint or f"set it to a value of type {_type_name(tp)}"
    return ConfigError(f"{where}: key '{name}' expects {_type_name(tp)}, got {_got(value)}; {fix}")


def _field_types(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError as err:  # a bug in the config class, not in the user's file
        raise TypeError(f"cannot resolve the annotations of {cls.__name__}: {err}") from err


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _unknown_key_error(where: str, prefix: str, cls: type, key: str) -> ConfigError:
    valid = [f.name for f in _init_fields(cls)]
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    hint = f" did you mean '{_join(prefix, close[0])}'?" if close else ""
    return ConfigError(
        f"{where}: unknown key '{_join(prefix, str(key))}' in {cls.__name__};{hint} "
        f"valid keys are: {', '.join(valid)}"
    )


def _convert(value: Any, tp: Any, where: str, key: str) -> Any:
    """Check `value` against annotation `tp`, returning it in the annotated shape (tuples, floats)."""
    if tp is Any:
        return value
    origin, args = get_origin(tp), get_args(tp)

    if tp is type(None):
        if value is None:
            return None
        raise _type_error(where, key, tp, value)

    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _type_error(where, key, tp, value)
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:  # Optional[X]: X's own, more precise message
            return _convert(value, arms[0], where, key)
        errors = []
        for arm in arms:
            try:
                return _convert(value, arm, where, key)
            except ConfigError as err:
                errors.append((arm, err))
        structural = [e for arm, e in errors if dataclasses.is_dataclass(arm) and isinstance(value, Mapping)]
        if len(structural) == 1:
            raise structural[0]
        raise _type_error(where, key, tp, value)

    if origin is Literal:
        for allowed in args:
            if type(value) is type(allowed) and value == allowed:
                return value
        raise ConfigError(
            f"{where}: key '{key}' must be one of {', '.join(repr(a) for a in args)}, got {_got(value)}"
        )

    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return _build(tp, value, where, key)
        raise _type_error(where, key, tp, value, f"write it as a section (a mapping of {tp.__name__}'s keys)")

    if origin in (list, Sequence) or tp in (list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise _type_error(where, key, tp, value, "write it as a list, e.g. [1, 2]")
        item = args[0] if args else Any
        return [_convert(v, item, where, f"{key}[{i}]") for i, v in enumerate(value)]

    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise _type_error(where, key, tp, value, "write it as a list, e.g. [1, 2]")
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = args[0] if args else Any
            return tuple(_convert(v, item, where, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _type_error(where, key, tp, value, f"give exactly {len(args)} items")
        return tuple(_convert(v, a, where, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))

    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _type_error(where, key, tp, value, "write it as a mapping")
        kt, vt = args if args else (Any, Any)
        return {
            _convert(k, kt, where, f"{key} (a key)"): _convert(v, vt, where, _join(key, str(k)))
            for k, v in value.items()
        }

    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _type_error(where, key, tp, value, "write a number such as 3e-4 or 0.1")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        hint = "write a whole number without a decimal point" if isinstance(value, float) else ""
        raise _type_error(where, key, tp, value, hint)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(where, key, tp, value, "write true or false")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(where, key, tp, value, "quote it to make it a string")
    if isinstance(tp, type) and issubclass(tp, os.PathLike) or tp is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise _type_error(where, key, tp, value, "write a path as a string")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member.value or value == member.name or value is member:
                return member
        raise ConfigError(
            f"{where}: key '{key}' must be one of {', '.join(repr(m.value) for m in tp)}, got {_got(value)}"
        )
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _type_error(where, key, tp, value)
    raise TypeError(f"configio cannot check the annotation {tp!r} of '{key}'")


def _build(cls: type[T], data: Mapping, where: str, prefix: str) -> T:
    if not isinstance(data, Mapping):
        raise _type_error(where, prefix, cls, data, f"write it as a section (a mapping of {cls.__name__}'s keys)")
    hints = _field_types(cls)
    fields = {f.name: f for f in _init_fields(cls)}
    for key in data:
        if key not in fields:
            raise _unknown_key_error(where, prefix, cls, key)
    missing = [
        name for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(
            f"{where}: missing required key(s) {', '.join(repr(_join(prefix, m)) for m in missing)} "
            f"of {cls.__name__}; add them"
        )
    kwargs = {key: _convert(value, hints[key], where, _join(prefix, key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{where}: {prefix + ': ' if prefix else ''}{err}") from err
    except (ValueError, TypeError) as err:  # a __post_init__ check
        raise ConfigError(f"{where}: invalid {cls.__name__}{' at ' + prefix if prefix else ''}: {err}") from err


def from_dict(cls: type[T], data: Mapping, where: str = "config") -> T:
    """Build dataclass `cls` from `data`, checking every key and type; `where` prefixes the errors."""
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if data is None:
        data = {}
    return _build(cls, data, where, "")


def to_dict(obj: Any) -> Any:
    """A dataclass (or container of them) as plain YAML/JSON-ready data: dicts, lists, scalars."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


# ---------------------------------------------------------------------------------------------------
# Files, builtins and overrides


def read_config_file(path: str | os.PathLike) -> dict:
    """The raw mapping in a .yaml/.yml/.toml file (an empty file is {})."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            data = _yaml_load(path.read_text(encoding="utf-8"))
        elif suffix == ".toml":
            with path.open("rb") as f:
                data = tomllib.load(f)
        else:
            raise ConfigError(f"{path}: unknown config format '{suffix}'; use a .yaml, .yml or .toml file")
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file: {err.strerror or err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (['a', 'b'], value), the value read with YAML scalar rules (`3e-4`, `true`, `[1, 2]`)."""
    key, sep, raw = text.partition("=")
    path = key.strip().split(".")
    if not sep or not all(p.strip() for p in path):
        raise ConfigError(f"override '{text}': write it as key=value or section.key=value")
    try:
        value = _yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': the value is not a YAML scalar or list: {err}") from err
    return [p.strip() for p in path], value


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        arms = [a for a in get_args(tp) if a is not type(None)]
        dcs = [a for a in arms if dataclasses.is_dataclass(a)]
        if len(dcs) == 1:
            return dcs[0]
        if len(arms) == 1:
            return arms[0]
    return tp


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return to_dict(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return to_dict(f.default_factory())
    return None


def apply_overrides(cls: type, data: dict, overrides: Sequence[str]) -> dict:
    """Apply `key=value` overrides to the raw mapping `data` (in place) after checking each key and value."""
    for text in overrides:
        path, value = parse_override(text)
        where = f"override '{text}'"
        node, tp = data, cls
        for depth, key in enumerate(path):
            last = depth == len(path) - 1
            if dataclasses.is_dataclass(tp):
                fields = {f.name: f for f in _init_fields(tp)}
                if key not in fields:
                    raise _unknown_key_error(where, ".".join(path[:depth]), tp, key)
                field_tp = _field_types(tp)[key]
                default = _field_default(fields[key])
            elif get_origin(tp) in (dict, Mapping) or tp in (dict, Mapping, Any):
                field_tp = get_args(tp)[1] if get_args(tp) else Any
                default = None
            else:
                raise ConfigError(
                    f"{where}: '{'.'.join(path[:depth])}' holds a value of type {_type_name(tp)}, not a section; "
                    f"drop '.{'.'.join(path[depth:])}'"
                )
            if last:
                _convert(value, field_tp, where, ".".join(path))
                node[key] = value
            else:
                child = node.get(key)
                if not isinstance(child, dict):
                    child = default if isinstance(default, dict) else {}
                    node[key] = child
                node, tp = child, _unwrap_optional(field_tp)
    return data


def load_config(
    cls: type[T],
    path_or_builtin: str | os.PathLike,
    builtins: Mapping[str, Mapping | Any] | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Build `cls` from a builtin name or a .yaml/.yml/.toml file, then apply `key=value` overrides.

    A name found in `builtins` wins over a file of that name; builtins are dicts or `cls` instances.
    """
    builtins = builtins or {}
    name = os.fspath(path_or_builtin)
    if name in builtins:
        base = builtins[name]
        data = to_dict(base) if dataclasses.is_dataclass(base) else dict(base)
        data = _deep_copy(data)
        where = f"builtin config '{name}'"
    elif Path(name).is_file():
        data = read_config_file(name)
        where = name
    elif Path(name).suffix.lower() in (".yaml", ".yml", ".toml") or os.sep in name:
        raise ConfigError(f"config file '{name}' not found; check the path")
    else:
        known = sorted(builtins)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" did you mean '{close[0]}'?" if close else ""
        choices = f"builtins are: {', '.join(known)}" if known else "there are no builtins"
        raise ConfigError(
            f"config '{name}' is neither a file nor a builtin name;{hint} {choices}; "
            "or give the path of a .yaml/.yml/.toml file"
        )
    apply_overrides(cls, data, overrides)
    return from_dict(cls, data, where=where + (" (with overrides)" if overrides else ""))


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_deep_copy(v) for v in data]
    return data


def save_config(obj: Any, path: str | os.PathLike) -> Path:
    """Write a config dataclass as YAML, atomically; `load_config(type(obj), path)` reads it back."""
    text = yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=False, allow_unicode=True)
    return atomic_write_text(path, text)
