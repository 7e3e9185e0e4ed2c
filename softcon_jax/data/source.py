"""A converted dataset directory: `metadata.json` plus ArrayRecord shards.

Every reader of the project (the Grain pipeline, the online kNN monitor, statistics,
benchmarks) opens a dataset through `open_dataset`, so the checks and error messages are the
same everywhere: a missing `metadata.json` or shard names the file and the command that writes
it. A shard that cannot be opened (truncated, corrupt) or a record that cannot be read raises
`CorruptShardError` naming the shard and, where known, the record index in it (the location
and its record for record schema 3, where a location is 1 + T records).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os

import grain
from etils import epath

from softcon_jax import cli
from softcon_jax.data import records


class CorruptShardError(cli.UserValueError):
    """A shard of a converted dataset cannot be read; the message names it."""


def _fix(directory: str) -> str:
    return (f"check the dataset with python -m data_prep.verify {directory}, then restore or "
            f"reconvert the damaged shard")


def shard_problem(path: str) -> str | None:
    """Why ArrayRecord cannot open shard `path` (None when it can)."""
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(path)
    except Exception as e:  # the reader raises plain RuntimeError/ValueError
        return str(e) or type(e).__name__
    ok = reader.ok()
    try:
        reader.close()  # re-raises the error the reader met while opening
    except Exception as e:
        return str(e) or type(e).__name__
    return None if ok else "unreadable"


class NamedSource(grain.sources.RandomAccessDataSource):
    """Locations over the shards of a dataset; read errors name the shard and record.

    ``source[i]`` is the bytes of location i's record, or, for a dataset stored as
    ``records_per_location = 1 + T`` records per location (record schema 3), a
    `records.Location` whose seasons are read when used (``records.decode`` takes both).
    """

    def __init__(self, inner, paths: list[str], counts: list[int], directory: str,
                 records_per_location: int = 1):
        self._inner, self._paths, self._directory = inner, list(paths), directory
        self._k = int(records_per_location)
        self._starts = [0]  # first location of each shard
        for c in counts:
            self._starts.append(self._starts[-1] + int(c))

    def __len__(self) -> int:
        return len(self._inner) // self._k

    def where(self, index: int) -> tuple[str, int]:
        """(shard path, location index in it) of location `index`."""
        i = min(bisect.bisect_right(self._starts, index) - 1, len(self._paths) - 1)
        return self._paths[i], index - self._starts[i]

    def _error(self, index: int, part: int, e: Exception) -> CorruptShardError:
        shard, local = self.where(int(index))
        what = (f"record {local}" if self._k == 1 else
                f"location {local} (record {local * self._k + part})")
        return CorruptShardError(
            f"shard {shard} {what}: cannot be read ({type(e).__name__}: {e}); "
            f"{_fix(self._directory)}.")

    def _read(self, index: int, part: int = 0) -> bytes:
        try:
            return self._inner[int(index) * self._k + part]
        except (IndexError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise self._error(index, part, e) from None

    def __getitem__(self, index):
        if not -len(self) <= int(index) < len(self):
            raise IndexError(f"location {index} of {len(self)}")
        index = int(index) % len(self)
        if self._k == 1:
            return self._read(index)
        return records.Location(self._read(index),
                                lambda t: self._read(index, 1 + int(t)))

    def __repr__(self) -> str:
        return f"NamedSource({self._directory}, {len(self._paths)} shards)"


@dataclasses.dataclass
class Dataset:
    """An opened dataset directory: its metadata and a random-access record source."""

    path: str                 # the directory (local or gs://)
    meta: dict                # metadata.json
    meta_path: str            # its path, for messages
    source: grain.sources.RandomAccessDataSource

    def __len__(self) -> int:
        return len(self.source)


def load_metadata(path: str) -> tuple[dict, str]:
    """(metadata dict, metadata file path) of a converted dataset directory."""
    meta_path = epath.Path(path) / "metadata.json"  # local paths or gs://
    if not meta_path.exists():
        raise cli.UserFileNotFoundError(
            f"data path {path!r}: {meta_path} not found; convert a dataset with "
            f"python -m data_prep.ssl4eo_s12 / data_prep.seco / data_prep.synthetic")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise cli.UserValueError(f"{meta_path} is not valid JSON ({e}); restore it or "
                                 f"reconvert the dataset") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("shards"), list):
        raise cli.UserValueError(f"{meta_path} has no 'shards' list; it is not the metadata "
                                 f"of a converted dataset (python -m data_prep.*)")
    check_shard_names(meta["shards"], str(meta_path))
    return meta, str(meta_path)


def shard_name_problem(entry) -> str | None:
    """Why ``entry`` of a metadata ``shards`` list is not a plain file name (None if it is).

    Shards live in the dataset folder itself: a path (``../x``, ``/abs/x``, ``sub/x``,
    ``gs://b/x``) would read data outside the folder the user named.
    """
    if not isinstance(entry, str):
        return f"a {type(entry).__name__}, not a file name"
    if entry in ("", ".", ".."):
        return "not a file name"
    if "/" in entry or "\\" in entry:
        return "a path; shard names must be plain file names inside the dataset folder"
    if "\x00" in entry:
        return "contains a NUL character"
    return None


def check_shard_names(names: list, meta_path: str) -> None:
    """Refuses a ``shards`` list entry that is not a plain file name, naming it."""
    for entry in names:
        problem = shard_name_problem(entry)
        if problem is not None:
            raise cli.UserValueError(
                f"{meta_path}: shard entry {entry!r} is {problem}; nothing outside the "
                f"dataset folder is read. Fix the entry or reconvert the dataset")


def open_dataset(path: str) -> Dataset:
    """Opens `path` (metadata.json + the shards it lists); every shard must exist and open."""
    meta, meta_path = load_metadata(path)
    paths = [os.path.join(path, s) for s in meta["shards"]]
    for p in paths:
        if not epath.Path(p).exists():
            raise cli.UserFileNotFoundError(
                f"shard {p} listed in {meta_path} does not exist; restore it or reconvert "
                f"the dataset")
    try:
        inner = grain.sources.ArrayRecordDataSource(paths)
    except Exception as e:  # truncated or corrupt shard: find which one
        for p in paths:
            problem = shard_problem(p)
            if problem is not None:
                raise CorruptShardError(
                    f"shard {p} listed in {meta_path} cannot be opened (truncated or "
                    f"corrupt: {problem}); {_fix(path)}.") from None
        raise CorruptShardError(f"the shards listed in {meta_path} cannot be opened "
                                f"({type(e).__name__}: {e}); {_fix(path)}.") from None
    k = records.records_per_location(meta)
    counts = meta.get("shard_num_records")  # locations per shard
    if counts is not None and (len(counts) != len(paths) or sum(counts) * k != len(inner)):
        raise CorruptShardError(
            f"the shards listed in {meta_path} hold {len(inner)} records, the metadata says "
            f"{sum(counts) * k} ({_shard_count_diff(paths, counts, k)}); {_fix(path)}.")
    if counts is None:  # older metadata: count per shard (cheap, reads the footers)
        counts = [_num_records(p) // k for p in paths]
    return Dataset(path, meta, meta_path, NamedSource(inner, paths, counts, path, k))


def _num_records(path: str) -> int:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(path)
    try:
        return reader.num_records()
    finally:
        reader.close()


def _shard_count_diff(paths: list[str], counts: list[int], k: int) -> str:
    for p, c in zip(paths, counts):
        n = _num_records(p)
        if n != c * k:
            per = "" if k == 1 else f" ({c} locations x {k} records)"
            return f"shard {p} has {n} records, expected {c * k}{per}"
    return "per-shard counts differ from the metadata"


def ensure_synthetic_data(data_config, key="config.data.synthetic"):
    """Writes the built-in synthetic dataset first when the config asks for one.

    `config.data.synthetic` (`enabled` plus `softcon_jax.data.synthetic.write_dataset` arguments)
    makes the quickstart and the `runlocal` configs self-contained; turn it off with
    `--config.data.synthetic.enabled=False`. It never overwrites other data (see
    `softcon_jax.data.synthetic.ensure_synthetic_dataset`).
    """
    from softcon_jax.data import synthetic  # the writer is not needed otherwise
    synthetic.ensure_synthetic_dataset(data_config.path, data_config.get("synthetic"), key=key)
