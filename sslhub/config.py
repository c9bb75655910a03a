"""Typed configuration: dataclasses built from plain dicts with every key and type checked.

``from_dict(Cls, data, where="recipe.yaml")`` turns the YAML of a recipe into nested dataclasses.
An unknown key or a value of the wrong type is an error that names the dotted key, the file and
what was expected, e.g. ``recipe.yaml: optim.lr: expected float, got 'fast' (str)``.

A config dataclass rejects a value of the right type but out of range from its own ``__post_init__``
with :func:`check`, which raises :class:`InvalidValue` ``(key, message)``::

    @dataclass
    class SimCLRConfig(MethodConfig):
        temperature: float = 0.5

        def __post_init__(self):
            check(self.temperature > 0, "temperature", "must be > 0 (the paper: 0.5)")

``from_dict`` turns that into a :class:`ConfigError` naming the file, the dotted key and the value,
``recipes/x.yaml: method_args.temperature=0.0: must be > 0 (the paper: 0.5)`` (a nested dataclass's
keys get their prefix, ``method_args.views.scale``); a config built directly in Python raises the
:class:`InvalidValue` itself (a ``ValueError``: ``temperature: must be > 0 (the paper: 0.5)``).
So every value is checked when the recipe loads, before any data is read.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from sslhub.errors import SslhubError


class ConfigError(SslhubError, ValueError):
    """A recipe or config value is missing, unknown, of the wrong type or out of range.

    ``key`` (the dotted key) and ``where`` (the file) are set when the error is about one key of a file, so a
    caller that knows the value came from elsewhere (``--set``) can say so."""

    def __init__(self, message: str, key: str | None = None, where: str | None = None):
        super().__init__(message)
        self.key, self.where = key, where


class InvalidValue(SslhubError, ValueError):
    """Raised by a config dataclass's ``__post_init__`` (through :func:`check`): ``key`` (a field name, or a
    dotted path below it) holds a value that is never valid; ``message`` says what is expected.  ``from_dict``
    turns it into a :class:`ConfigError`; a config built in Python raises it as it is."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def check(condition: bool, key: str, message: str) -> None:
    """``InvalidValue(key, message)`` unless ``condition``; call it from a config's ``__post_init__``, one check
    per rule, e.g. ``check(0 <= self.momentum <= 1, "momentum", "must be in [0, 1] (the paper: 0.99)")``."""
    if not condition:
        raise InvalidValue(key, message)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(tp: Any, value: Any, key: str, where: str) -> Any:
    origin = get_origin(tp)
    fail = ConfigError(f"{where}: {key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})", key, where)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key, where)
            except ConfigError:
                pass
        raise fail
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise fail
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail
        return from_dict(tp, value, where, prefix=f"{key}.")
    if tp in (tuple, list):
        if isinstance(value, (list, tuple)):
            return tp(value)
        raise fail
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise fail
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: {key}: expected {len(args)} values, got {len(value)}", key, where)
            items = [_convert(a, v, f"{key}[{i}]", where) for i, (a, v) in enumerate(zip(args, value))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(item_tp, v, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return origin(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise fail
        args = get_args(tp)
        if args:
            return {k: _convert(args[1], v, f"{key}.{k}", where) for k, v in value.items()}
        return dict(value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 and 3e-4 as strings: any form float() takes is a float
            try:
                return float(value)
            except ValueError:
                pass
        raise fail
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise fail


def from_dict(cls: type, data: dict | None, where: str = "config", prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking every key and type (see module docstring)."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'top level'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), fields, n=1)
        hint = f" (did you mean {prefix}{close[0]!r}?)" if close else f" (known keys: {', '.join(fields)})"
        raise ConfigError(f"{where}: unknown key {prefix}{k!r}{hint}", f"{prefix}{k}", where)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            value = data[name]
            if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
                # a nested block overrides the field's own default (e.g. a method's view settings), not
                # the nested class's defaults: keys the recipe leaves out keep the field's default
                default = f.default if f.default is not dataclasses.MISSING else (
                    f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
                if default is not None:
                    value = {**to_dict(default), **value}
            kwargs[name] = _convert(hints[name], value, f"{prefix}{name}", where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise ConfigError(f"{where}: missing required key {prefix}{name!r}")
    try:
        return cls(**kwargs)
    except InvalidValue as e:  # a value the dataclass's __post_init__ rejects: name the file, key and value
        if e.key in kwargs:
            value = kwargs[e.key]
        elif e.key in fields and fields[e.key].default is not dataclasses.MISSING:
            value = fields[e.key].default
        else:  # a key that is not a plain field (or a default from a factory): no value to show
            raise ConfigError(f"{where}: {prefix}{e.key}: {e.message}", f"{prefix}{e.key}", where) from None
        raise ConfigError(f"{where}: {prefix}{e.key}={value!r}: {e.message}", f"{prefix}{e.key}", where) from None


def to_dict(obj: Any) -> Any:
    """Dataclasses → plain dicts/lists (tuples become lists), JSON- and YAML-friendly."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
