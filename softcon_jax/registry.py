"""One registry helper for everything a config chooses by name.

Losses (`config.loss.name`), backbones (`config.model.backbone`), methods (`config.method`),
view builders (`config.data.views`), optimizers and evaluation tasks are each a `Registry`:

    LOSSES = Registry("loss", "config.loss.name")

    @LOSSES.register("my_loss")
    def my_loss(q, k, *, temperature): ...

    LOSSES.get(config.loss.name)   # UnknownNameError naming the key, a close match, the list

A user module outside the package registers its own entries when it is imported; list it in
`config.imports` (a tuple of module names) and the trainer imports it first
(`import_modules`).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from softcon_jax.cli import UserKeyError

T = TypeVar("T")


def close_match(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate a misspelling of `name` most likely meant, or None."""
    candidates = list(candidates)
    found = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if found:
        return found[0]
    lowered = name.lower()
    name_initials = "".join(part[:1] for part in lowered.split("_"))
    for c in candidates:
        if len(name_initials) > 1 and c.lower() == name_initials:  # 'learning_rate' -> 'lr'
            return c
    for c in candidates:  # 'lr' for 'learning_rate', 'vit_small' for a longer name
        if lowered and (lowered in c.lower() or c.lower() in lowered):
            return c
        initials = "".join(part[:1] for part in c.split("_"))
        if len(initials) > 1 and lowered == initials.lower():
            return c
    return None


class UnknownNameError(UserKeyError, ValueError):
    """A config chose a name nothing is registered under. One line: key, match, choices."""

    def __init__(self, key: str, what: str, name: Any, available: list[str]):
        hint = close_match(str(name), available)
        message = (f"{key}={name!r}: unknown {what} {name!r}."
                   + (f" Did you mean {hint!r}?" if hint else "")
                   + f" Available: {', '.join(available) or 'none'}.")
        super().__init__(message)
        self.key, self.name, self.available = key, name, available

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class Registry(Generic[T]):
    """Name -> entry, filled by `register`; `get` fails with the config key it serves."""

    def __init__(self, what: str, config_key: str, providers: tuple[str, ...] = ()):
        """`providers`: modules that register the built-in entries, imported on the first
        lookup (as big_vision's registries import their modules by name), so a caller that
        never imported them still finds the built-ins."""
        self.what, self.config_key = what, config_key
        self._entries: dict[str, T] = {}
        self._providers = tuple(providers)

    def _load_providers(self) -> None:
        providers, self._providers = self._providers, ()
        for module in providers:
            importlib.import_module(module)

    def register(self, name: str, entry: T | None = None, *, overwrite: bool = False):
        """`@REG.register("name")` or `REG.register("name", entry)`; returns the entry."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} name must be a non-empty string, got {name!r}")

        def add(e: T) -> T:
            existing = self._entries.get(name)
            if existing is not None and existing is not e and not overwrite:
                raise ValueError(f"a {self.what} named {name!r} is already registered "
                                 f"({_describe(existing)}); pick another name or pass "
                                 "overwrite=True")
            self._entries[name] = e
            return e

        return add if entry is None else add(entry)

    def get(self, name: str, key: str | None = None) -> T:
        self._load_providers()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(key or self.config_key, self.what, name,
                                   self.names()) from None

    def names(self) -> list[str]:
        self._load_providers()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load_providers()
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def items(self):
        self._load_providers()
        return sorted(self._entries.items())


def import_modules(names: Iterable[str] | None, key: str = "config.imports") -> None:
    """Imports user modules that register losses, backbones, methods or views."""
    for name in names or ():
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise UserKeyError(f"{key}: cannot import {name!r} ({e}). It must be importable "
                              "from the working directory or PYTHONPATH.") from e


def _describe(entry: Callable[..., Any] | Any) -> str:
    module = getattr(entry, "__module__", None) or "?"
    return f"{module}.{getattr(entry, '__qualname__', repr(entry))}"
