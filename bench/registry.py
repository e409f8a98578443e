"""One small registry type shared by models, datasets and methods (timm's ``@register_model`` in spirit)."""
from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import choice_error

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self.info: dict[str, dict[str, Any]] = {}

    def add(self, name: str, obj: T, **info: Any) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj
        self.info[name] = info
        return obj

    def register(self, name: str, **info: Any) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            return self.add(name, obj, **info)
        return deco

    def remove(self, name: str) -> None:
        self._items.pop(name, None)
        self.info.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise choice_error(self.kind, name, self._items) from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
