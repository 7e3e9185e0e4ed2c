"""Helpers shared by several test modules (tests/ is on sys.path through conftest.py)."""

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict


def random_variables(shapes, seed=0):
    """Random float32 variables for a tree of shapes (faster than tracing initialisers).

    Non-trivial BN statistics and LayerScale gammas (init 1e-5 would hide the blocks).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for path, s in flatten_dict(shapes).items():
        if path[-1] in ("var", "scale", "gamma"):
            a = rng.uniform(0.5, 1.5, s.shape)
        elif path[-1] == "kernel":
            a = rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
        else:
            a = rng.normal(size=s.shape) * 0.1
        out[path] = jnp.asarray(a, jnp.float32)
    return unflatten_dict(out)


def set_dotted(config, overrides: dict):
    """config['a']['b'] = v for every 'a.b': v of overrides; returns config."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        target = config
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config


def snapshot(directory):
    """{relative path: bytes} of every file under `directory` (to check data is untouched)."""
    import os

    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, directory)] = fh.read()
    return out
