"""Checks `--config.a.b=value` overrides against the config before absl parses them.

`ml_collections.config_flags` reports a misspelt key with a long traceback that names
neither the key's level nor the keys that exist there. `check_argv` loads the config file
once (as config_flags does: the module's `get_config(arg)`) and fails with one line:

    --config.optimizer.learning_rate: config.optimizer has no key 'learning_rate'.
    Did you mean 'lr'? Keys there: b1, b2, grad_clip_norm, lr, ...
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any

from softcon_jax.cli import UsageError
from softcon_jax.registry import close_match

_OVERRIDE = re.compile(r"^--?config\.([A-Za-z0-9_.]+)(=.*)?$")


def config_path(argv: list[str]) -> str | None:
    """The `--config` value (`path[:arg]`) on the command line, or None."""
    for i, a in enumerate(argv):
        if a.startswith(("--config=", "-config=")):
            return a.split("=", 1)[1]
        if a in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def load_config(spec: str) -> Any:
    """`path[:arg]` -> `get_config(arg)` of that file (as config_flags loads it)."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise UsageError(f"--config {spec}: no such file {path!r}.")
    module_spec = importlib.util.spec_from_file_location("_softcon_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def check_keys(config: Any, keys: list[str]) -> None:
    """Raises UsageError for the first dotted key that is not in `config`."""
    for dotted in keys:
        node, where = config, "config"
        for part in dotted.split("."):
            group = hasattr(node, "keys") and hasattr(node, "__getitem__")  # ConfigDict, dict
            if not group or part not in node:
                if not group:
                    raise UsageError(f"--config.{dotted}: {where} is a value, not a group of "
                                     "keys.")
                names = sorted(node.keys())
                hint = close_match(part, names)
                raise UsageError(
                    f"--config.{dotted}: {where} has no key {part!r}."
                    + (f" Did you mean {hint!r}?" if hint else "")
                    + f" Keys there: {', '.join(names)}.")
            node, where = node[part], f"{where}.{part}"


def check_argv(argv: list[str]) -> None:
    """Checks every `--config.<key>` of `argv` (no-op without `--config`)."""
    keys = [m.group(1) for a in argv if (m := _OVERRIDE.match(a))]
    spec = config_path(argv)
    if not keys or spec is None:
        return
    check_keys(load_config(spec), keys)
