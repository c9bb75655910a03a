"""The method registry: a name → method class mapping filled by ``@register_method`` (a leaf module).

Adding a method is one file in ``sslhub/methods/`` decorated with ``@register_method("name")``
plus one import line in ``sslhub/methods/__init__.py``; the CLI, the recipes and the
registry-parametrized tests pick it up from here. As in timm, the registry imports nothing of sslhub:
the ``sslhub.methods`` package imports every method (so importing anything in it registers them all).
"""
from __future__ import annotations

import difflib
from typing import Callable, TypeVar

_METHODS: dict[str, type] = {}
M = TypeVar("M", bound=type)


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: make a :class:`~sslhub.methods.base.Method` available under ``name``."""

    def deco(cls: M) -> M:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice ({_METHODS[name].__module__} and {cls.__module__})")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def get_method(name: str) -> type:
    """The method class registered as ``name``; a ``KeyError`` naming the close ones otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        close = difflib.get_close_matches(name, _METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown method {name!r}.{hint} Known methods: {', '.join(sorted(_METHODS))}") from None


def list_methods() -> dict[str, type]:
    return dict(sorted(_METHODS.items()))
