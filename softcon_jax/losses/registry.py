"""Registry of loss functions, so that a config can choose a loss by name.

A loss is a plain function ``fn(q, k, ..., *, temperature, row_offset=0, ...) -> scalar``.
The trainer calls it through :func:`call` with two kinds of keyword arguments:

* ``offered``: what the framework has (``labels_q``, ``labels_k``, ``row_offset``,
  ``num_chunks``, ``temperature``, queues, ...). A loss declares the ones it needs; the
  others are not passed, so one loss can ignore labels and another use them.
* ``options``: the user's ``config.loss.kwargs``. These are strict: an option the loss does
  not declare is an error naming ``config.loss.kwargs.<key>`` and the accepted options, so a
  misspelt ``soft_wieght`` never trains silently with the default.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable

from softcon_jax.registry import Registry, UnknownNameError
from softcon_jax.cli import UserValueError

__all__ = ["LOSSES", "register", "get", "available", "call", "check_options",
           "UnknownLossError"]

LOSSES: Registry[Callable[..., Any]] = Registry("loss", "config.loss.name")
UnknownLossError = UnknownNameError  # the error `get` raises for an unknown name


def register(name: str, fn: Callable[..., Any] | None = None, *, overwrite: bool = False):
    """Registers ``fn`` under ``name``; used as ``@register("name")`` or ``register(name, fn)``.

    Registering a different function under a taken name raises ValueError unless
    ``overwrite=True``. Returns the function unchanged (so the decorator keeps it usable).
    """
    if fn is not None and not callable(fn):
        raise TypeError(f"register({name!r}) expects a function, got {fn!r}")
    return LOSSES.register(name, fn, overwrite=overwrite)


def get(name: str) -> Callable[..., Any]:
    """The loss registered under ``name``; UnknownLossError names config.loss.name."""
    return LOSSES.get(name)


def available() -> list[str]:
    """The registered loss names, sorted."""
    return LOSSES.names()


def _declared(fn: Callable[..., Any]) -> tuple[set[str], bool]:
    """(keyword names fn accepts, whether it takes **kwargs)."""
    params = inspect.signature(fn).parameters.values()
    names = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                   inspect.Parameter.KEYWORD_ONLY)}
    return names, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def check_options(fn: Callable[..., Any] | str, options: Mapping[str, Any] | None,
                  key: str = "config.loss.kwargs", framework: tuple[str, ...] = ()) -> None:
    """Raises ValueError for an option in ``options`` that ``fn`` does not accept.

    ``framework`` names arguments the framework passes itself; setting them as options is
    an error too (the framework's value would win or clash).
    """
    from softcon_jax.registry import close_match

    fn = get(fn) if isinstance(fn, str) else fn
    names, var_kw = _declared(fn)
    positional = [p.name for p in inspect.signature(fn).parameters.values()
                  if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD][:2]  # q, k
    accepted = sorted(names - set(framework) - set(positional))
    for option in options or {}:
        if option in framework:
            raise UserValueError(f"{key}.{option}: set by the framework, not an option of loss "
                                 f"{_describe(fn)}; options it accepts: "
                                 f"{', '.join(accepted) or 'none'}.")
        if not var_kw and option not in names:
            hint = close_match(option, accepted)
            raise UserValueError(f"{key}.{option}: loss {_describe(fn)} has no option "
                                 f"{option!r}.{f' Did you mean {hint!r}?' if hint else ''} "
                                 f"Options it accepts: {', '.join(accepted) or 'none'}.")


def call(fn: Callable[..., Any] | str, *args: Any,
         options: Mapping[str, Any] | None = None, **offered: Any) -> Any:
    """Calls ``fn(*args, **options, **declared offered)``.

    ``fn`` may be a function or a registered name. ``offered`` keyword arguments ``fn``
    does not declare are dropped (a loss that takes ``**kwargs`` gets all of them);
    ``options`` must all be accepted (see :func:`check_options`). A required argument that
    is neither given nor offered raises TypeError naming the loss and the argument.
    """
    fn = get(fn) if isinstance(fn, str) else fn
    options = dict(options or {})
    check_options(fn, options, framework=tuple(offered))
    names, var_kw = _declared(fn)
    accepted = offered if var_kw else {k: v for k, v in offered.items() if k in names}
    accepted = {**accepted, **options}
    try:
        inspect.signature(fn).bind(*args, **accepted)
    except TypeError as err:
        raise TypeError(
            f"cannot call loss {_describe(fn)}: {err}; offered keyword arguments: "
            f"{', '.join(sorted(offered)) or 'none'}") from None
    return fn(*args, **accepted)


def _describe(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}.{getattr(fn, '__qualname__', repr(fn))}"
