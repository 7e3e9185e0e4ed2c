"""Registry of loss functions, so that a config can choose a loss by name.

A loss is a plain function ``fn(q, k, ..., *, temperature, row_offset=0, ...) -> scalar``.
The trainer calls it through :func:`call`, which passes only the keyword arguments that the
function declares, so a loss asks for exactly what it needs (``labels_q``, ``num_chunks``,
its own options from ``config.loss.kwargs``, ...).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

__all__ = ["register", "get", "available", "call", "UnknownLossError"]

LossFn = TypeVar("LossFn", bound=Callable[..., Any])

_REGISTRY: dict[str, Callable[..., Any]] = {}


class UnknownLossError(KeyError):
    """Raised by :func:`get` for a name that no loss was registered under."""

    def __str__(self) -> str:  # KeyError would quote the whole message.
        return str(self.args[0])


def register(name: str, fn: Callable[..., Any] | None = None, *, overwrite: bool = False):
    """Registers ``fn`` under ``name``; used as ``@register("name")`` or ``register(name, fn)``.

    Registering a different function under a taken name raises ValueError unless
    ``overwrite=True``. Returns the function unchanged (so the decorator keeps it usable).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a loss name must be a non-empty string, got {name!r}")

    def decorator(f: LossFn) -> LossFn:
        if not callable(f):
            raise TypeError(f"register({name!r}) expects a function, got {f!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not f and not overwrite:
            raise ValueError(
                f"a loss named {name!r} is already registered ({_describe(existing)}); "
                f"pick another name or pass overwrite=True")
        _REGISTRY[name] = f
        return f

    return decorator if fn is None else decorator(fn)


def get(name: str) -> Callable[..., Any]:
    """Returns the loss registered under ``name``; UnknownLossError lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownLossError(
            f"unknown loss {name!r} (config key loss.name); available losses: "
            f"{', '.join(available())}") from None


def available() -> list[str]:
    """Returns the registered loss names, sorted."""
    return sorted(_REGISTRY)


def call(fn: Callable[..., Any] | str, *args: Any, **kwargs: Any) -> Any:
    """Calls ``fn(*args, **kw)`` with only the keyword arguments ``fn`` declares.

    ``fn`` may be a function or a registered name. If ``fn`` takes ``**kwargs`` it gets all
    of them. Keyword arguments it does not declare are dropped; a required argument that is
    neither given positionally nor offered raises TypeError naming the loss and the missing
    argument.
    """
    if isinstance(fn, str):
        fn = get(fn)
    sig = inspect.signature(fn)
    params = sig.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        accepted = kwargs
    else:
        names = {p.name for p in params
                 if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                               inspect.Parameter.KEYWORD_ONLY)}
        accepted = {key: value for key, value in kwargs.items() if key in names}
    try:
        sig.bind(*args, **accepted)
    except TypeError as err:
        raise TypeError(
            f"cannot call loss {_describe(fn)}: {err}; offered keyword arguments: "
            f"{', '.join(sorted(kwargs)) or 'none'}") from None
    return fn(*args, **accepted)


def _describe(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}.{getattr(fn, '__qualname__', repr(fn))}"
