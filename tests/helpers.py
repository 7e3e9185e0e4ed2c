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


def small_tmpfs(directory, size_kib):
    """Context manager: a `size_kib` KiB tmpfs mounted at `directory` (to fill a disk).

    Mounting needs root (CAP_SYS_ADMIN); where the machine refuses it, the calling test is
    skipped with the reason `mount` gave.
    """
    import contextlib
    import os
    import subprocess

    import pytest

    @contextlib.contextmanager
    def mounted():
        os.makedirs(directory, exist_ok=True)
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs",
                              str(directory)], capture_output=True, text=True)
        if res.returncode:
            pytest.skip(f"cannot mount a tmpfs to fill: {res.stderr.strip() or res.returncode}")
        try:
            yield str(directory)
        finally:
            subprocess.run(["umount", "-l", str(directory)], check=False)

    return mounted()


def fill_disk(directory, leave_bytes=0):
    """Writes `directory/filler` until the filesystem is full, then frees `leave_bytes`."""
    import errno
    import os

    path = os.path.join(directory, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    os.truncate(path, max(os.path.getsize(path) - leave_bytes, 0))
    return path
