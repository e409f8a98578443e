"""One small registry type shared by models, datasets and methods (timm's ``@register_model`` in spirit).

A name may have aliases: other spellings that :meth:`Registry.get` and ``in`` accept and :meth:`Registry.canonical`
maps to the registered name, which is the one records, run hashes and listings use (``vaft-d`` for ``vaft+d``: a
name without ``+`` for TOML bare keys, regular expressions and URLs)."""
from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import choice_error

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self._aliases: dict[str, str] = {}  # alias -> registered name
        # name families: "<prefix><rest>" resolved by a function of <rest> (timm:<model name>)
        self._families: dict[str, Callable[[str], T]] = {}
        self.family_info: dict[str, dict[str, Any]] = {}

    def add(self, name: str, obj: T, **info: Any) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj
        self.info[name] = info
        return obj

    def add_alias(self, alias: str, name: str) -> None:
        """``alias`` resolves to the registered ``name`` everywhere a name is looked up."""
        if name not in self._items:
            raise ValueError(f"{self.kind} {name!r} is not registered (alias {alias!r})")
        if alias in self._items or alias in self._aliases:
            raise ValueError(f"{self.kind} {alias!r} is already registered")
        self._aliases[alias] = name

    def canonical(self, name: str) -> str:
        """The registered name of ``name`` (itself unless it is an alias)."""
        return self._aliases.get(name, name)

    def aliases(self, name: str) -> list[str]:
        """The aliases of the registered ``name``."""
        return sorted(a for a, n in self._aliases.items() if n == name)

    def register(self, name: str, **info: Any) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            return self.add(name, obj, **info)
        return deco

    def add_family(self, prefix: str, resolve: Callable[[str], T], **info: Any) -> None:
        """Names ``<prefix><rest>`` resolve to ``resolve(rest)`` (which raises a one-line error for a bad ``rest``);
        ``info['placeholder']`` names ``rest`` in the accepted list of an unknown name."""
        self._families[prefix] = resolve
        self.family_info[prefix] = info

    def remove(self, name: str) -> None:
        self._items.pop(name, None)
        self.info.pop(name, None)
        self._aliases = {a: n for a, n in self._aliases.items() if n != name}

    def get(self, name: str) -> T:
        try:
            return self._items[self._aliases.get(name, name)]
        except KeyError:
            pass
        for prefix, resolve in self._families.items():
            if isinstance(name, str) and name.startswith(prefix):
                return resolve(name[len(prefix):])
        families = [f"{p}<{self.family_info[p].get('placeholder', 'name')}>" for p in self._families]
        raise choice_error(self.kind, name, [*self._items, *families]) from None

    def __contains__(self, name: object) -> bool:
        return (name in self._items or name in self._aliases
                or any(isinstance(name, str) and name.startswith(p) for p in self._families))

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
