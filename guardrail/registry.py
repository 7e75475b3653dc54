"""Backends registered by name, imported lazily so that heavy libraries (torch, transformers,
vllm, litellm) load only when the backend that needs them is chosen."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar, cast

from guardrail.errors import UnknownBackendError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a backend name to a factory, given directly or as ``"module:attribute"``."""

    def __init__(self, concept: str) -> None:
        self.concept = concept
        self._factories: dict[str, Callable[..., T]] = {}
        self._lazy: dict[str, str] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            self._factories[name] = factory
            return factory

        return decorator

    def register_lazy(self, name: str, target: str) -> None:
        """Register ``"package.module:Factory"`` (or ``:Class.factory``); the module is imported on
        first use."""
        self._lazy[name] = target

    def names(self) -> list[str]:
        return sorted({*self._factories, *self._lazy})

    def factory(self, name: str) -> Callable[..., T]:
        if name in self._factories:
            return self._factories[name]
        target = self._lazy.get(name)
        if target is None:
            known = ", ".join(self.names())
            raise UnknownBackendError(f"unknown {self.concept} {name!r}; known: {known}")
        module_name, _, attribute = target.partition(":")
        found: object = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
        factory = cast(Callable[..., T], found)
        self._factories[name] = factory
        return factory

    def create(self, name: str, *args: object, **kwargs: object) -> T:
        return self.factory(name)(*args, **kwargs)
