"""Check a converted dataset: ``python -m data_prep.verify DIR``.

Reads every location (its location record and every season record, or its one record in
datasets written before record schema 3) of every shard listed in ``DIR/metadata.json``
and checks that it decodes, that image shape (T, C, H, W) and dtype match the metadata,
that float pixels are finite, that labels are 0/1 and zero where ``has_label`` is False,
that locations are unique and that the per-shard and total location counts match the
metadata. Prints the counts and one line per bad location (shard file and location index
in it); exits with status 1 if anything is bad. A shard that cannot be opened
(truncated, corrupt) is one BAD line naming it. A ``shards`` entry that is not a plain file
name inside DIR (``../x``, an absolute path) is an error naming it; nothing outside DIR is
read. Non-finite pixels are counted per location (BAD lines), and the pixels a conversion
replaced (``--nonfinite fill``, recorded in the metadata) are reported.

DIR may be a URL (``gs://bucket/path``; see ``softcon_jax.data.storage``): each shard is then
downloaded to a temporary file, checked and deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from collections import Counter

import numpy as np
from tqdm import tqdm

from softcon_jax import cli
from softcon_jax.data import records, shards, source, storage


def check_record(ex: dict, meta: dict) -> list[str]:
    """Problems of one decoded record (empty list = good)."""
    problems = []
    size = meta["image_size"]
    want = (meta["timesteps"], len(meta["bands"]), size, size)
    img = ex["image"]
    if img.shape != want:
        problems.append(f"image shape {img.shape}, expected {want}")
    if img.dtype != np.dtype(meta["dtype"]):
        problems.append(f"image dtype {img.dtype}, expected {meta['dtype']}")
    if img.dtype.kind == "f" and not np.isfinite(img).all():
        problems.append(f"{int((~np.isfinite(img)).sum())} non-finite pixels (NaN/inf); "
                        f"training must not see them: reconvert with --nonfinite fill")
    if ex["labels"].max(initial=0) > 1:
        problems.append("labels not multi-hot 0/1")
    if ex["labels"][~ex["has_label"]].any():
        problems.append("labels set on a season marked unlabelled")
    if len(set(ex["seasons"])) != len(ex["seasons"]):
        problems.append(f"duplicate season names {ex['seasons']}")
    return problems


def _read_location(reader, i: int, k: int) -> dict:
    """Location i of a shard of ``k`` records per location, every season read."""
    if k == 1:
        return records.decode(reader.read([i])[0])
    parts = reader.read(list(range(i * k, (i + 1) * k)))
    ex = records.decode(records.Location(parts[0], lambda t: parts[1 + t]))
    return {**ex, "image": np.asarray(ex["image"])}  # reads and checks every season


def verify(directory: str, *, progress: bool = True) -> dict:
    """Returns ``{"num_records", "num_shards", "num_bad", "bad": [(shard, index, reason)],
    "num_labelled_seasons", "num_seasons"}``."""

    directory = storage.check(directory, "dataset")
    meta_path = storage.join(directory, shards.METADATA_FILE)
    try:
        meta = shards.read_metadata(directory)
    except ValueError as e:
        raise cli.UserValueError(f"{meta_path} is not valid JSON ({e})") from None
    if meta is None:
        raise cli.UserFileNotFoundError(f"{meta_path} not found (missing or incomplete "
                                        f"conversion)")
    if not isinstance(meta, dict) or not isinstance(meta.get("shards"), list):
        raise cli.UserValueError(f"{meta_path} has no 'shards' list; not the metadata of a "
                                 f"converted dataset")
    source.check_shard_names(meta["shards"], meta_path)
    k = records.records_per_location(meta)
    bad: list[tuple[str, int, str]] = []
    locations: Counter = Counter()
    where: dict[str, tuple[str, int]] = {}
    total = labelled = seasons = unopened = nonfinite = 0
    expected_counts = meta.get("shard_num_records") or [None] * len(meta["shards"])
    bar = tqdm(total=meta.get("num_records"), desc="verify", unit="rec", disable=not progress)
    for shard, expected in zip(meta["shards"], expected_counts):
        with _local_copy(storage.join(directory, shard)) as path:
            if path is None:
                bad.append((shard, -1, "shard file missing"))
                continue
            counts = _verify_shard(path, shard, expected, k, meta, bad, bar, locations, where)
        total += counts["total"]
        labelled += counts["labelled"]
        seasons += counts["seasons"]
        unopened += counts["unopened"]
        nonfinite += counts["nonfinite"]
    bar.close()
    for loc, count in locations.items():
        if count > 1:
            bad.append((*where[loc], f"location {loc!r} occurs {count} times"))
    if not unopened and total != meta.get("num_records"):
        bad.append(("metadata.json", -1, f"{total} records read, metadata says "
                                         f"{meta.get('num_records')}"))
    bad_records = {(s, i) for s, i, _ in bad}
    return {"num_records": total, "num_shards": len(meta["shards"]), "bad": bad,
            "num_bad": len(bad_records), "num_seasons": seasons,
            "num_labelled_seasons": labelled, "num_skipped": meta.get("num_skipped", 0),
            "num_nonfinite": nonfinite, "nonfinite_filled": meta.get("nonfinite")}


@contextlib.contextmanager
def _local_copy(path: str):
    """``path`` itself when local, else a downloaded temporary copy; None if missing."""
    if not storage.is_url(path):
        yield path if os.path.exists(path) else None
        return
    if not storage.exists(path):
        yield None
        return
    tmp = tempfile.mkdtemp(prefix="softcon-verify-")
    try:
        fs, p = storage.fs(path)
        local = os.path.join(tmp, os.path.basename(p))
        fs.get_file(p, local)
        yield local
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _verify_shard(path, shard, expected, k, meta, bad, bar, locations, where) -> dict:
    """Checks one local shard file; appends to ``bad``; returns its counts."""
    from array_record.python.array_record_module import ArrayRecordReader

    counts = dict(total=0, labelled=0, seasons=0, unopened=0, nonfinite=0)
    problem = source.shard_problem(path)  # truncated/corrupt: the reader cannot open it
    if problem is not None:
        bad.append((shard, -1, f"cannot be opened (truncated or corrupt): {problem}"
                               + (f"; metadata says {expected} records" if expected
                                  is not None else "")))
        counts["unopened"] = 1
        bar.update(expected or 0)
        return counts
    reader = ArrayRecordReader(path)
    n, extra = divmod(reader.num_records(), k)
    if extra:
        bad.append((shard, -1, f"{reader.num_records()} records, not a multiple of the "
                               f"{k} records per location"))
    if expected is not None and n != expected:
        bad.append((shard, -1, f"{n} locations, metadata says {expected}"))
    for i in range(n):
        counts["total"] += 1
        bar.update(1)
        try:
            ex = _read_location(reader, i, k)
        except Exception as e:
            bad.append((shard, i, f"cannot read/decode: {e}"))
            continue
        for problem in check_record(ex, meta):
            bad.append((shard, i, problem))
        if ex["image"].dtype.kind == "f":
            counts["nonfinite"] += int((~np.isfinite(ex["image"])).sum())
        locations[ex["location"]] += 1
        where.setdefault(ex["location"], (shard, i))
        counts["labelled"] += int(ex["has_label"].sum())
        counts["seasons"] += len(ex["seasons"])
    try:
        reader.close()
    except Exception as e:
        bad.append((shard, -1, f"read error: {e}"))
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir", help="dataset directory (holding metadata.json)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    r = verify(a.dir, progress=not a.no_progress)
    print(f"{a.dir}: {r['num_records']} records in {r['num_shards']} shards, "
          f"{r['num_labelled_seasons']}/{r['num_seasons']} seasons labelled, "
          f"{r['num_skipped']} inputs skipped at conversion, {r['num_nonfinite']} non-finite "
          f"pixels, {r['num_bad']} bad")
    filled = r["nonfinite_filled"]
    if filled:
        print(f"{a.dir}: the conversion replaced {filled.get('num_pixels', '?')} non-finite "
              f"pixels in {filled.get('num_locations', '?')} locations by "
              f"{filled.get('fill_value')} (--nonfinite {filled.get('policy')})")
    for shard, index, reason in r["bad"]:
        print(f"BAD {shard} index {index}: {reason}" if index >= 0 else f"BAD {shard}: {reason}")
    return 1 if r["bad"] else 0


if __name__ == "__main__":
    cli.run(main)
