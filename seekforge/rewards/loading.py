"""Reward functions by name, or from the user's own code, as a trainer config asks for them."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

from seekforge.errors import ConfigError
from seekforge.rewards.rules import accuracy_reward, format_reward
from seekforge.rewards.safe import RewardFn
from seekforge.rewards.shaping import length_penalty, repetition_penalty
from seekforge.tasks import Row

REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "length": length_penalty,
    "repetition": repetition_penalty,
}
# What the trainer passes besides (prompt, completion): a Row's fields.
ROW_FIELDS = ("task", "answer", "solution", "meta")


def row_fields(row: Row) -> dict[str, Any]:
    """The keyword arguments a reward gets for `row`: reward(prompt, completion, **row_fields(row))."""
    return {field: getattr(row, field) for field in ROW_FIELDS}


def load_reward_functions(spec: str | list[str | dict[str, Any]]) -> dict[str, RewardFn]:
    """Reward functions by name, in order.

    spec: "accuracy,format", or a list whose items are a name ("accuracy"), a user function
    ("path/to/file.py:function_name" or "package.module:function_name"), or a dict with "name"
    and options bound as keyword arguments: {"name": "length", "max_length": 1024, "buffer": 256}.
    Each function must accept (prompt, completion, **row_fields); an option a function needs and
    lacks is an error here rather than at the first training step."""
    items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    if not items:
        raise ConfigError(f"no reward functions in {spec!r}; valid names: {', '.join(REWARDS)} or path.py:function")
    loaded: dict[str, RewardFn] = {}
    for item in items:
        if isinstance(item, dict):
            options = dict(item)
            name = options.pop("name", None)
        else:
            name, options = item, {}
        if not isinstance(name, str) or not name:
            raise ConfigError(f"reward item {item!r} has no name; write e.g. {{'name': 'accuracy'}}")
        fn = _resolve(name)
        _check_signature(name, fn, options)
        key = name.rsplit(":", 1)[-1]
        if key in loaded:
            raise ConfigError(f"reward {key!r} is listed twice; list each reward once")
        loaded[key] = _bind(fn, key, options) if options else fn
    return loaded


def _resolve(name: str) -> RewardFn:
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise ConfigError(f"unknown reward {name!r}; valid names: {', '.join(REWARDS)}, or path/to/file.py:function")
    where, attr = name.rsplit(":", 1)
    module = _load_file(where) if where.endswith(".py") or "/" in where else _import(where)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{where} has no function {attr!r}")
    return fn


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"cannot import reward module {module!r}: {e}") from e


def _load_file(path: str):
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise ConfigError(f"reward file {path} does not exist")
    # Registered in sys.modules (under a name unique to the file) so that dataclasses and
    # pickling inside the user's module work as in an imported one.
    module_name = "seekforge_user_reward_" + hashlib.blake2b(str(file).encode(), digest_size=6).hexdigest()
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise ConfigError(f"reward file {path} failed to load: {type(e).__name__}: {e}") from e
    return module


def _check_signature(name: str, fn: RewardFn, options: dict[str, Any]) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: trust them
    try:
        signature.bind("prompt", "completion", **{**dict.fromkeys(ROW_FIELDS), **options})
    except TypeError as e:
        raise ConfigError(
            f"reward {name!r} cannot be called as {name}(prompt, completion, **row_fields) with options "
            f"{options}: {e}. Give it a **kwargs parameter and the options it needs."
        ) from e


def _bind(fn: RewardFn, name: str, options: dict[str, Any]) -> RewardFn:
    def bound(prompt: str, completion: str, **fields: Any) -> float | None:
        return fn(prompt, completion, **{**fields, **options})

    bound.__name__ = name
    bound.__doc__ = fn.__doc__
    return bound
