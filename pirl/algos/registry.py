"""A small name -> function registry for the pure advantage and loss functions of ``pirl.algos``.

Trainers and configs name the functions they use (``algo.advantage: gae``); the registry turns the
name into the function. Registering a name twice, or asking for an unknown one, is an error.
"""
from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)

_REGISTRY: dict[str, Callable] = {}


def register(name: str) -> Callable[[F], F]:
    """Decorator: record ``fn`` under ``name`` and return it unchanged."""

    def wrap(fn: F) -> F:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise KeyError(f"algos registry: {name!r} is already registered to {_REGISTRY[name]}")
        _REGISTRY[name] = fn
        return fn

    return wrap


def get(name: str) -> Callable:
    """Return the function registered under ``name``; unknown names raise ``KeyError``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"algos registry: unknown {name!r}; known: {sorted(_REGISTRY)}") from None


def names() -> list[str]:
    """All registered names, sorted."""
    return sorted(_REGISTRY)
