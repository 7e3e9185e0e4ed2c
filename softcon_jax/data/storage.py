"""Local paths and cloud URLs for the converters: one small layer over fsspec.

Every ``data_prep`` command accepts, wherever it takes a path, a local path or a URL of any
filesystem fsspec has installed (``gs://`` through gcsfs, the ``gcs`` extra; ``s3://``
through s3fs; ``memory://``...). A URL whose scheme has no installed filesystem is one
error naming the scheme and what to install, raised before anything is read or written;
a URL is never taken for a local folder named after its scheme.

Local paths go through ``os`` directly (the converters' hot loop lists and opens many small
files); URLs through ``fsspec.core.url_to_fs``. Shards are never written in place on a
bucket: the writer writes them to a local temporary folder and calls ``publish``, which
uploads under a temporary name and renames (a server-side copy on GCS) when complete, so a
final name never holds a partial object.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

from softcon_jax import cli

# Extras of this package (or packages) that provide a scheme's fsspec filesystem.
_INSTALL_HINT = {"gs": "pip install 'softcon-jax[gcs]' (gcsfs)",
                 "gcs": "pip install 'softcon-jax[gcs]' (gcsfs)",
                 "s3": "pip install s3fs", "s3a": "pip install s3fs",
                 "az": "pip install adlfs", "abfs": "pip install adlfs",
                 "hf": "pip install huggingface_hub"}


class StorageError(cli.UserError, OSError):
    """Reading or writing a path failed (disk full, permission denied, a storage library's
    own error); the message names the path and what was being read or written."""

    def __init__(self, message: str):
        super().__init__(message)  # one argument: pickles across worker processes

    def __str__(self) -> str:
        return str(self.args[0])


def is_url(path: str) -> bool:
    """True for ``scheme://...`` other than ``file://``."""
    scheme, sep, _ = str(path).partition("://")
    return bool(sep) and scheme != "file" and "/" not in scheme


def abspath(path: str) -> str:
    """A URL as is; a local path made absolute."""
    return path if is_url(path) else os.path.abspath(local(path))


def local(path: str) -> str:
    """``file:///x`` -> ``/x``; other paths unchanged."""
    return path[len("file://"):] if str(path).startswith("file://") else str(path)


def _fs_for(protocol_url: str):
    import fsspec  # caches its filesystem instances itself

    return fsspec.core.url_to_fs(protocol_url)[0]


def check(path: str, flag: str = "path") -> str:
    """``path`` if it is local or its scheme has an installed filesystem; else a one-line
    error naming the scheme and what to install. ``flag`` names the argument."""
    if not is_url(path):
        return local(path)
    scheme = path.split("://", 1)[0]
    try:
        import fsspec

        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as e:
        hint = _INSTALL_HINT.get(scheme, "install the fsspec filesystem package for it")
        raise cli.UserValueError(
            f"{flag} {path}: no filesystem for the scheme '{scheme}://' is installed "
            f"({hint}); nothing was read or written ({type(e).__name__}: {e})") from None
    return path


def fs(path: str):
    """(fsspec filesystem, path without the scheme) of URL ``path``."""
    scheme, rest = check(path).split("://", 1)
    return _fs_for(f"{scheme}://{rest.split('/', 1)[0]}"), rest


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_url(base) else os.path.join(base, *parts)


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    f, p = fs(path)
    return f.exists(p)


def isdir(path: str) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    f, p = fs(path)
    return f.isdir(p)


def scandir(path: str) -> dict[str, bool]:
    """{name: is a directory} of the entries of ``path``; FileNotFoundError if absent."""
    if not is_url(path):
        with os.scandir(path) as it:
            return {e.name: e.is_dir() for e in it}
    f, p = fs(path)
    if not f.isdir(p):
        raise FileNotFoundError(path)
    f.invalidate_cache(p)
    return {posixpath.basename(e["name"].rstrip("/")): e["type"] == "directory"
            for e in f.ls(p, detail=True) if e["name"].rstrip("/") != p.rstrip("/")}


def listdir(path: str) -> list[str]:
    """Sorted entry names of ``path``; [] when it does not exist."""
    try:
        return sorted(scandir(path))
    except FileNotFoundError:
        return []


def read_bytes(path: str) -> bytes:
    if not is_url(path):
        with open(path, "rb") as fh:
            return fh.read()
    f, p = fs(path)
    return f.cat_file(p)


def read_many(paths: list[str]) -> list[bytes]:
    """Bytes of every URL in ``paths``, fetched concurrently (one batch of requests)."""
    if not paths:
        return []
    f, _ = fs(paths[0])
    got = f.cat([fs(p)[1] for p in paths], on_error="return")
    out = []
    for p in paths:
        value = got[fs(p)[1]]
        if isinstance(value, BaseException):
            raise value
        out.append(value)
    return out


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def makedirs(path: str) -> None:
    if not is_url(path):
        os.makedirs(path, exist_ok=True)  # object stores have no folders to make


def remove(path: str) -> None:
    if not is_url(path):
        if os.path.exists(path):
            os.remove(path)
        return
    f, p = fs(path)
    if f.exists(p):
        f.rm_file(p)


def temp_name(path: str) -> str:
    """The temporary name of ``path`` for this process: ``<path>.tmp-<pid>``."""
    return f"{path}.tmp-{os.getpid()}"


def publish(local_file: str, dest: str, what: str, still_allowed=lambda: True) -> None:
    """Moves the finished ``local_file`` to ``dest`` atomically; ``what`` names it in errors.

    Local: ``os.replace``. URL: upload under a temporary name, then rename; the temporary
    object is removed on failure. ``still_allowed()`` is asked just before the rename (the
    shard writers pass "my parent is alive"): when False nothing is published.
    """
    if not is_url(dest):
        if not still_allowed():
            raise StorageError(f"{dest}: not published ({what}): the converter that started "
                               f"this worker has exited")
        os.replace(local_file, dest)
        return
    f, p = fs(dest)
    tmp = temp_name(p)
    try:
        f.put_file(local_file, tmp)
        if not still_allowed():
            raise StorageError(f"{dest}: not published ({what}): the converter that started "
                               f"this worker has exited")
        f.copy(tmp, p)  # a server-side copy: the object appears complete or not at all
        f.rm_file(tmp)
    except StorageError:
        _quiet_rm(f, tmp)
        raise
    except Exception as e:
        _quiet_rm(f, tmp)
        raise StorageError(f"{dest}: uploading {what} failed ({type(e).__name__}: {e})") \
            from e


def _quiet_rm(f, p: str) -> None:
    try:
        if f.exists(p):
            f.rm_file(p)
    except Exception:  # the original error matters more than a failed cleanup
        pass


def write_json_atomic(path: str, obj: Any, what: str) -> None:
    """Writes JSON to ``path`` under a temporary name, then renames it into place."""
    data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
    if is_url(path):
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
            fh.write(data)
        try:
            publish(fh.name, path, what)
        finally:
            os.remove(fh.name)
        return
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise StorageError(f"{path}: writing {what} failed ({_os_reason(e)}); the previous "
                           f"file, if any, is unchanged") from e
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _os_reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}"
