"""Shared ArrayRecord shard writer used by every converter.

- Items (one per location) are assigned to shards deterministically: the
  caller's item order, split into ``num_shards`` contiguous, near-equal chunks.
  The same inputs and shard count therefore give byte-identical shards.
- Shards are written in parallel by ``num_workers`` processes (0 = in this
  process), each under a temporary name and moved into place with
  ``os.replace`` once complete, so a final name never holds a partial shard.
- A finished shard leaves a small marker ``.shards/<shard>.json`` (its record
  count, skipped inputs and a fingerprint of its inputs). ``resume=True`` keeps
  shards whose marker matches and rewrites the others.
- ``metadata.json`` is written last (atomically): its presence means the whole
  dataset is complete.
- Nothing that this run did not write is replaced or deleted. A directory that already
  holds a dataset (``metadata.json``) is reused when it is exactly the dataset this run
  would write (same inputs, parameters and shard count; nothing is rewritten) and refused
  otherwise. Shards of an unfinished conversion (no ``metadata.json``) are replaced only
  with ``resume=True`` (``--resume``), which keeps those whose inputs are unchanged. Files
  of other names in the directory are never touched.
- ``out_dir`` may be a URL (``gs://...``, ``softcon_jax.data.storage``): shards are written to a
  local temporary folder and uploaded under a temporary name renamed when complete; the
  rules above hold the same way.
- A storage error (disk full, permission denied, a library's own error) is one
  ``StorageError`` naming the path and what was written; the temporary file is removed,
  finished shards stay. Workers (``softcon_jax.data.workers``) never publish after the converter.
- ``metadata.json`` lists at most ``MAX_SKIPPED_LISTED`` skipped inputs; the full list is
  the side file ``skipped.jsonl`` (one JSON object a line), named by ``skipped_file``.

The module is a little over 400 lines long: planning, writing, resuming and finishing a
conversion share one protocol (markers, fingerprints, temporary names) kept in one place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from softcon_jax import cli
from softcon_jax.data import records, storage
from softcon_jax.data.storage import StorageError

log = logging.getLogger("data_prep")

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
MARKER_DIR = ".shards"
SKIPPED_FILE = "skipped.jsonl"
MAX_SKIPPED_LISTED = 100


class BadInputError(cli.UserValueError):
    """An input file or folder is unusable; ``path`` names it."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)  # args kept so the error pickles across processes
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def shard_filename(name: str, index: int, count: int) -> str:
    """``<name>-00000-of-00004.array_record``."""
    return f"{name}-{index:05d}-of-{count:05d}.array_record"


def assign_shards(num_items: int, num_shards: int) -> list[range]:
    """Contiguous near-equal split of ``range(num_items)`` into ``num_shards``."""
    bounds = np.linspace(0, num_items, num_shards + 1).round().astype(int)
    return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def read_metadata(directory: str) -> dict | None:
    """The dataset's metadata, or None when the dataset is absent/incomplete."""
    path = storage.join(directory, METADATA_FILE)
    if not storage.exists(path):
        return None
    return storage.read_json(path)


def _fingerprint(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass
class Task:
    """One shard to write: its items, in order, and where it goes."""

    out_dir: str
    filename: str
    items: list
    make_example: Callable[[Any], dict]
    skip_bad: bool
    fingerprint: str
    options: str = "group_size:1,uncompressed"


def write_shard(task: Task, progress: Callable[[int], None] = lambda n: None,
                still_allowed: Callable[[], bool] = lambda: True) -> dict:
    """Writes one shard atomically and its marker; returns the marker dict.

    The shard is written to a temporary file (next to it for a local ``out_dir``, in a
    local temporary folder for a URL) and published under its final name only when
    complete and ``still_allowed()``. Every engine (local processes, Beam) runs this.
    """
    final = storage.join(task.out_dir, task.filename)
    if storage.is_url(task.out_dir):
        staging = tempfile.mkdtemp(prefix="softcon-shard-")
        tmp = os.path.join(staging, task.filename)
    else:
        staging, tmp = None, storage.temp_name(final)
    try:
        marker = _write_records(task, tmp, final, progress)
        storage.publish(tmp, final, f"shard {task.filename}", still_allowed)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
    storage.write_json_atomic(storage.join(task.out_dir, MARKER_DIR, task.filename + ".json"),
                      marker, f"the marker of shard {task.filename}")
    return marker


def _write_records(task: Task, tmp: str, final: str, progress) -> dict:
    """Writes the task's locations to the local file ``tmp``; returns the marker dict."""
    from array_record.python.array_record_module import ArrayRecordWriter

    skipped, nonfinite = [], {}
    count = 0
    per_location = None  # records per location: 1 + T, the same for every location
    try:
        writer = ArrayRecordWriter(tmp, task.options)
    except Exception as e:
        raise _storage_error(e, final, tmp) from e
    try:
        for item in task.items:
            try:
                example = task.make_example(item)
            except BadInputError as e:
                if not task.skip_bad:
                    raise
                log.warning("skipping %s (%s)", e.path, e.reason)
                skipped.append({"item": _jsonable(item), "path": e.path, "reason": e.reason})
            else:
                filled = example.pop("num_nonfinite_filled", 0)
                if filled:
                    nonfinite[example["location"]] = int(filled)
                parts = records.encode_location(example)
                if per_location not in (None, len(parts)):
                    raise records.RecordError(
                        f"location {example['location']!r} has {len(parts) - 1} seasons, "
                        f"the shard's first location {per_location - 1}; every location "
                        "of a dataset needs the same number of seasons")
                per_location = len(parts)
                for part in parts:
                    _checked_write(writer, part, final, tmp)
                count += 1
            progress(1)
    except BaseException:
        try:
            writer.close()
        except Exception:  # already failed: the first error is the one to report
            pass
        raise
    try:
        writer.close()
    except Exception as e:
        raise _storage_error(e, final, tmp) from e
    return {"fingerprint": task.fingerprint, "num_records": count,
            "records_per_location": per_location, "skipped": skipped,
            "nonfinite_filled": nonfinite, "filename": task.filename}


def _checked_write(writer, part: bytes, final: str, tmp: str) -> None:
    try:
        writer.write(part)
    except Exception as e:
        raise _storage_error(e, final, tmp) from e
    if not writer.ok():
        raise _storage_error(RuntimeError("the ArrayRecord writer failed"), final, tmp)


def _storage_error(e: BaseException, final: str, tmp: str) -> StorageError:
    reason = (e.strerror if isinstance(e, OSError) and e.strerror
              else f"{type(e).__name__}: {e}")
    return StorageError(f"{final}: writing the shard failed ({reason}; temporary file "
                        f"{tmp}); finished shards are unchanged, the temporary file is "
                        f"removed. Free space or fix permissions, then rerun with --resume")


def _jsonable(obj: Any) -> Any:
    """`obj` as plain JSON values (tuples become lists; anything else its str)."""
    return json.loads(json.dumps(obj, default=str))


def check_out_dir(out_dir: str, tasks: Sequence[Task], base: str, *,
                  resume: bool) -> dict | None:
    """Refuses to write where this run would replace data it did not write.

    Returns the existing metadata when ``out_dir`` already holds exactly the dataset of
    ``tasks`` (then nothing needs writing), None when writing may go ahead.
    """
    meta_path = storage.join(out_dir, METADATA_FILE)
    if storage.exists(meta_path):
        try:
            meta = read_metadata(out_dir)
        except (OSError, json.JSONDecodeError) as e:
            raise cli.UserValueError(
                f"{out_dir} already holds a {METADATA_FILE} that cannot be read ({e}); "
                f"it is left as it is. Choose another output directory (--out), or move "
                f"{meta_path} aside yourself.") from None
        same = (isinstance(meta, dict) and meta.get("fingerprint") == base
                and meta.get("shards") == [t.filename for t in tasks]
                and all(_finished_marker(out_dir, t) is not None for t in tasks))
        if same:
            return meta
        what = (f"a {meta.get('dataset', 'converted')!r} dataset of "
                f"{meta.get('num_records', '?')} records" if isinstance(meta, dict)
                else "a dataset")
        raise cli.UserValueError(
            f"{out_dir} already holds {what} ({meta_path}) that differs from what this "
            f"command would write (other inputs, parameters or shard count); existing "
            f"datasets are never replaced. Choose another output directory (--out), or "
            f"delete {out_dir} yourself if you no longer need it.")
    if not resume:
        names = set(storage.listdir(out_dir))
        present = [t.filename for t in tasks if t.filename in names]
        if present:
            more = f" and {len(present) - 3} more" if len(present) > 3 else ""
            raise cli.UserValueError(
                f"{out_dir} holds shards of an unfinished conversion ({', '.join(present[:3])}"
                f"{more}) and no {METADATA_FILE}; they are left as they are. Rerun with "
                f"--resume to keep the finished shards whose inputs are unchanged and "
                f"rewrite the others, or choose an empty output directory (--out).")
    return None


def remove_own_leftovers(out_dir: str, filenames: Sequence[str]) -> None:
    """Removes temporary files of an interrupted run of this dataset (its names only)."""
    prefixes = (tuple(f"{f}.tmp-" for f in filenames)
                + tuple(f"{f}.json.tmp-" for f in filenames) + (f"{METADATA_FILE}.tmp-",))
    for directory in (out_dir, storage.join(out_dir, MARKER_DIR)):
        for f in storage.listdir(directory):
            if f.startswith(prefixes):
                storage.remove(storage.join(directory, f))


def _finished_marker(out_dir: str, task: Task) -> dict | None:
    path = storage.join(out_dir, MARKER_DIR, task.filename + ".json")
    if not (storage.exists(path) and storage.exists(storage.join(out_dir, task.filename))):
        return None
    try:
        marker = storage.read_json(path)
    except (OSError, json.JSONDecodeError):
        return None
    return marker if marker.get("fingerprint") == task.fingerprint else None


def plan(out_dir: str, items: Sequence[Any], make_example: Callable[[Any], dict], *,
         name: str, num_shards: int, metadata: dict, skip_bad: bool = False,
         compression: str = "uncompressed") -> tuple[list[Task], str]:
    """(one Task per shard, the dataset fingerprint) of a conversion."""
    items = list(items)
    if num_shards < 1:
        raise cli.UserValueError(f"--num-shards must be >= 1, got {num_shards}")
    if num_shards > len(items):
        raise cli.UserValueError(f"--num-shards {num_shards} is more than the {len(items)} "
                                 f"locations found")
    options = f"group_size:1,{compression}"
    base = _fingerprint(FORMAT_VERSION, records.SCHEMA_VERSION, name, num_shards, metadata,
                        options)
    tasks = []
    for i, idx in enumerate(assign_shards(len(items), num_shards)):
        shard_items = [items[j] for j in idx]
        tasks.append(Task(out_dir, shard_filename(name, i, num_shards), shard_items,
                          make_example, skip_bad,
                          _fingerprint(base, [repr(x) for x in shard_items]), options))
    return tasks, base


def write_shards(
    out_dir: str,
    items: Sequence[Any],
    make_example: Callable[[Any], dict],
    *,
    name: str,
    num_shards: int,
    metadata: dict,
    num_workers: int = 0,
    resume: bool = False,
    skip_bad: bool = False,
    pre_skipped: Sequence[dict] = (),
    compression: str = "uncompressed",
    desc: str = "records",
    engine: str = "local",
    beam_args: Sequence[str] = (),
) -> dict:
    """Writes ``make_example(item)`` for every item into ArrayRecord shards.

    ``make_example`` returns a dict accepted by ``records.encode_location`` (each location
    is written as 1 + T records, record schema 3; every location needs the same T) or raises
    ``BadInputError``; with ``skip_bad`` that item is logged, skipped and
    listed in the metadata (``num_skipped``, ``skipped``), otherwise the error
    propagates and no metadata is written. With ``num_workers > 0`` or the Beam engine it
    must be picklable (a module-level function or ``functools.partial`` of one). It may add
    ``num_nonfinite_filled`` (pixels it replaced), summed per location in the metadata.
    ``compression`` is an ArrayRecord option (``uncompressed``, ``zstd:3``,
    ``snappy``...): uncompressed reads about 3x faster, zstd saves ~30 % disk.
    Records are always written with ``group_size:1`` (fast random access).
    ``pre_skipped`` lists inputs the caller already skipped (same dict form:
    item, path, reason) so the summary counts them too. ``metadata`` (dataset,
    modality, bands, dtype, timesteps, image_size, ...) is merged into the
    written ``metadata.json``, which is returned. ``engine``: ``local`` (``num_workers``
    processes) or ``beam`` (an Apache Beam pipeline with the options ``beam_args``; see
    ``softcon_jax.data.beam_engine``); both run ``write_shard`` once per shard, so their output
    is byte-identical.
    """
    out_dir = storage.check(out_dir, "--out")
    tasks, base = plan(out_dir, items, make_example, name=name, num_shards=num_shards,
                       metadata=metadata, skip_bad=skip_bad, compression=compression)
    existing = check_out_dir(out_dir, tasks, base, resume=resume)
    if existing is not None:
        log.info("%s already holds this dataset (%d records); nothing rewritten", out_dir,
                 existing["num_records"])
        return existing
    storage.makedirs(storage.join(out_dir, MARKER_DIR))
    remove_own_leftovers(out_dir, [t.filename for t in tasks])

    markers: dict[str, dict] = {}
    todo = []
    for task in tasks:
        marker = _finished_marker(out_dir, task) if resume else None
        if marker is not None:
            markers[task.filename] = marker
        else:
            todo.append(task)
    if resume and markers:
        log.info("resume: %d of %d shards already complete", len(markers), len(tasks))

    if engine == "beam":
        from softcon_jax.data import beam_engine

        beam_engine.run(todo, beam_args, desc, write_shard)
        for task in todo:
            marker = _finished_marker(out_dir, task)
            if marker is None:
                raise StorageError(f"{storage.join(out_dir, task.filename)}: the Beam "
                                   f"pipeline finished without writing this shard")
            markers[task.filename] = marker
    elif engine == "local":
        from softcon_jax.data import workers

        try:
            markers.update(workers.run(todo, num_workers, desc, write_shard))
        finally:  # what workers stopped mid-shard left behind
            remove_own_leftovers(out_dir, [t.filename for t in tasks])
    else:
        raise cli.UserValueError(f"--engine {engine!r}: expected 'local' or 'beam'")
    return _finish(out_dir, [markers[t.filename] for t in tasks], tasks, metadata,
                   pre_skipped, base=base, options=tasks[0].options)


def _finish(out_dir: str, ordered: list[dict], tasks: list[Task], metadata: dict,
            pre_skipped: Sequence[dict], *, base: str, options: str) -> dict:
    """Writes the skipped list and ``metadata.json`` (last); returns the metadata."""
    per_location = {m.get("records_per_location") for m in ordered} - {None}
    if len(per_location) > 1:
        raise records.RecordError(
            f"{out_dir}: the shards hold {sorted(k - 1 for k in per_location)} seasons per "
            "location; every location of a dataset needs the same number")
    skipped = [_jsonable(s) for s in pre_skipped] + [s for m in ordered for s in m["skipped"]]
    nonfinite = {loc: n for m in ordered for loc, n in m.get("nonfinite_filled", {}).items()}
    meta = dict(metadata)
    if skipped:
        text = "".join(json.dumps(s, sort_keys=True) + "\n" for s in skipped)
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as fh:
            fh.write(text)
        try:
            storage.publish(fh.name, storage.join(out_dir, SKIPPED_FILE), "the skipped list")
        finally:
            if os.path.exists(fh.name):
                os.remove(fh.name)
    if "nonfinite" in meta:
        meta["nonfinite"] = dict(meta["nonfinite"], num_pixels=sum(nonfinite.values()),
                                 num_locations=len(nonfinite))
    meta.update(
        format_version=FORMAT_VERSION,
        record_schema_version=records.SCHEMA_VERSION,
        num_records=sum(m["num_records"] for m in ordered),  # locations
        records_per_location=per_location.pop() if per_location else 1,
        num_shards=len(tasks),
        array_record_options=options,
        shards=[t.filename for t in tasks],
        shard_num_records=[m["num_records"] for m in ordered],
        num_skipped=len(skipped),
        skipped=skipped[:MAX_SKIPPED_LISTED],
        skipped_file=SKIPPED_FILE if skipped else None,
        fingerprint=base,
    )
    storage.write_json_atomic(storage.join(out_dir, METADATA_FILE), meta, METADATA_FILE)
    log.info("wrote %d records in %d shards to %s (%d skipped)",
             meta["num_records"], len(tasks), out_dir, len(skipped))
    return meta
