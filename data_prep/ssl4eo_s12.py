"""Convert SSL4EO-S12 (GeoTIFF tree or official LMDB) to ArrayRecord shards.

GeoTIFF tree: ``ROOT/<modality>/<location>/<season product id>/<band>.tif``,
4 seasons per location; 20 m and 60 m bands are resampled to the 10 m grid
(bilinear) and stacked in the official band order. ``--labels`` joins the
SSL4EO-S12-ML file ``{location: {season: ["class", ...]}}`` (an empty list is
an unlabelled season; a season without an entry is unlabelled too).

    python -m data_prep.ssl4eo_s12 --root ROOT --modality s2c \\
        --labels ssl4eo_multilabel.json --out DIR --num-shards 64
    python -m data_prep.ssl4eo_s12 --lmdb s2c.lmdb --modality s2c --out DIR --num-shards 64
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import os
import pickle

import numpy as np

from data_prep import geotiff, options
from softcon_jax import cli
from softcon_jax.data import shards, storage
from softcon_jax.data.records import NUM_CLASSES
from softcon_jax.data.shards import BadInputError

BANDS = {
    "s2c": ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"],
    "s2a": ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12"],
    "s1": ["VV", "VH"],
}
DTYPE = {"s2c": "uint16", "s2a": "uint16", "s1": "float32"}
TIMESTEPS = 4
log = logging.getLogger("data_prep")

LMDB_WARNING = (
    "The official LMDB form stores Python pickles. Read it only from files you trust: "
    "this reader refuses pickled objects other than bytes, tuples and numbers, but "
    "unpickling untrusted data is never safe."
)


def load_labels(path: str) -> dict[str, dict[str, list[str]]]:
    """The SSL4EO-S12-ML label file (local or URL), checked for structure."""
    try:
        labels = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise BadInputError(path, "label file does not exist") from None
    except json.JSONDecodeError as e:
        raise BadInputError(path, f"not valid JSON ({e})") from None
    if not isinstance(labels, dict) or not all(isinstance(v, dict) for v in labels.values()):
        raise BadInputError(path, "expected {location: {season: [class, ...]}}")
    return labels


def _class_index(value) -> int | None:
    """The class of one label value: "4" or 4 (0..8); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        k = value
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        k = int(value)
    else:
        return None
    return k if 0 <= k < NUM_CLASSES else None


def check_label_values(labels: dict, labels_path: str,
                       skip_bad: bool) -> tuple[dict, list[dict]]:
    """Rejects (or with ``skip_bad`` drops) entries that are not lists of classes 0..8.

    Each entry ``labels[location][season]`` must be a list whose items are class indices
    as strings (``"4"``) or integers (``4``); a string such as ``"48"`` is not a list of
    classes 4 and 8. A skipped entry leaves its season unlabelled. Returns the usable
    labels and the list of skipped entries.
    """
    usable, skipped = {}, []
    expected = (f"expected a list of class indices 0..{NUM_CLASSES - 1} as strings or "
                f"integers, e.g. [\"4\", \"8\"] ([] for a season without classes)")
    for loc in sorted(labels):
        for season in sorted(labels[loc]):
            entry = labels[loc][season]
            if not isinstance(entry, list):
                reason = f"label entry [{loc!r}][{season!r}] is {entry!r}; {expected}"
            else:
                bad = [v for v in entry if _class_index(v) is None]
                if not bad:
                    usable.setdefault(loc, {})[season] = entry
                    continue
                reason = (f"label entry [{loc!r}][{season!r}] = {entry!r} has "
                          f"{', '.join(repr(v) for v in bad[:3])}, not a class; {expected}")
            if not skip_bad:
                raise BadInputError(labels_path, reason)
            log.warning("skipping %s: %s", labels_path, reason)
            skipped.append({"item": f"{loc}/{season}", "path": labels_path, "reason": reason})
            usable.setdefault(loc, {})[season] = []  # the season stays, unlabelled
        usable.setdefault(loc, {})
    return usable, skipped


def check_label_entries(labels: dict, tree: dict[str, list[str]], labels_path: str,
                        loc_root: str, skip_bad: bool) -> tuple[dict, list[dict]]:
    """Drops (with ``skip_bad``) or rejects entries for unknown locations/seasons.

    Returns the usable labels and the list of skipped entries.
    """
    usable, skipped = {}, []
    for loc in sorted(labels):
        for season in sorted(labels[loc]):
            if loc not in tree:
                reason = (f"label entry {loc}/{season} names an unknown location "
                          f"(no folder {storage.join(loc_root, loc)})")
            elif season not in tree[loc]:
                reason = (f"label entry {loc}/{season} names an unknown season "
                          f"(no folder {storage.join(loc_root, loc, season)})")
            else:
                usable.setdefault(loc, {})[season] = labels[loc][season]
                continue
            if not skip_bad:
                raise BadInputError(labels_path, reason)
            log.warning("skipping %s: %s", labels_path, reason)
            skipped.append({"item": f"{loc}/{season}", "path": labels_path, "reason": reason})
    return usable, skipped


_date_key = geotiff.acquisition_key


def match_labels_by_order(labels: dict, tree: dict[str, list[str]], labels_path: str,
                          skip_bad: bool) -> tuple[dict, list[dict]]:
    """Re-keys each location's label seasons onto its folders by acquisition order.

    For S1 (or S2 L2A products whose ids differ from the labelled L1C ones):
    the k-th labelled season by date is given to the k-th season folder by date
    (dates are the first ``YYYYMMDDTHHMMSS`` in the name). Locations whose
    season counts differ are rejected, or skipped with ``skip_bad``.
    """
    out, skipped = {}, []
    for loc, entries in labels.items():
        if loc not in tree:
            out[loc] = entries  # reported as unknown by check_label_entries
            continue
        src = sorted(entries, key=_date_key)
        dst = sorted(tree[loc], key=_date_key)
        if len(src) != len(dst):
            reason = (f"label entry {loc} has {len(src)} seasons but the location has "
                      f"{len(dst)} season folders; cannot match by order")
            if not skip_bad:
                raise BadInputError(labels_path, reason)
            log.warning("skipping %s: %s", labels_path, reason)
            skipped.append({"item": loc, "path": labels_path, "reason": reason})
            continue
        out[loc] = {d: entries[s] for s, d in zip(src, dst)}
    return out, skipped


def multi_hot(entry: list, where: str) -> np.ndarray:
    """Multi-hot (9,) uint8 from ["0", "4", ...]; BadInputError for bad classes."""
    out = np.zeros(NUM_CLASSES, np.uint8)
    if not isinstance(entry, list):
        raise BadInputError(where, f"label entry {entry!r} is not a list of class indices "
                                   f"0..{NUM_CLASSES - 1}")
    for c in entry:
        k = _class_index(c)
        if k is None:
            raise BadInputError(where, f"label {c!r} is not a class index 0..{NUM_CLASSES - 1}")
        out[k] = 1
    return out


# ----------------------------------------------------------------------------- GeoTIFF tree

def make_example(item: tuple, *, loc_root: str, spec: geotiff.Season, timesteps: int,
                 labels_path: str) -> dict:
    """Record of one location ``item = (location, seasons, labels or None)``."""
    location, seasons, loc_labels = item
    loc_dir = storage.join(loc_root, location)
    if len(seasons) != timesteps:
        raise BadInputError(loc_dir, f"expected {timesteps} season folders, found "
                                     f"{len(seasons)}: {seasons}")
    image = np.empty((timesteps, len(spec.bands), spec.size, spec.size), spec.dtype)
    filled = sum(geotiff.read_season(storage.join(loc_dir, s), spec, image[t])[1]
                 for t, s in enumerate(seasons))
    labels = np.zeros((timesteps, NUM_CLASSES), np.uint8)
    has_label = np.zeros(timesteps, bool)
    for t, s in enumerate(seasons):
        entry = (loc_labels or {}).get(s)
        if entry:
            labels[t] = multi_hot(entry, f"{labels_path} [{location}][{s}]")
            has_label[t] = True
    return {"image": image, "labels": labels, "has_label": has_label,
            "seasons": list(seasons), "location": location,
            "num_nonfinite_filled": filled}


def scan_tree(loc_root: str) -> dict[str, list[str]]:
    """{location: season folder names in acquisition-date order} of ``ROOT/<modality>``.

    Every modality's seasons are stored in date order (the date parsed from the product
    id, ``geotiff.acquisition_key``), not folder-name order, which for S1 puts S1A
    products before S1B ones whatever their dates.
    """
    if not storage.isdir(loc_root):
        raise BadInputError(loc_root, "modality folder does not exist")
    return geotiff.scan_locations(loc_root)


def convert_tree(root: str, modality: str, out: str, *, num_shards: int, labels: str | None = None,
                 match_labels: str = "name", image_size: int | None = None,
                 num_workers: int = 0, resume: bool = False, skip_bad: bool = False,
                 compression: str = "uncompressed", fill_value: float | None = None,
                 engine: str = "local", beam_args: tuple = ()) -> dict:
    """Converts the GeoTIFF tree (local or URL); returns the written metadata.

    ``match_labels``: 'name' (label season keys are folder names) or 'order'
    (k-th labelled season by date -> k-th folder by date, see
    ``match_labels_by_order``). ``fill_value``: replace non-finite pixels (S1) by it
    instead of refusing the location (recorded in the metadata as ``nonfinite``).
    """
    bands = BANDS[modality]
    root = storage.check(root, "--root")
    labels = storage.check(labels, "--labels") if labels else labels
    storage.check(out, "--out")
    loc_root = storage.join(root, modality)
    tree = scan_tree(loc_root)
    if not tree:
        raise BadInputError(loc_root, "no location folders")
    label_skips: list[dict] = []
    label_map: dict = {}
    if labels:
        label_map, label_skips = check_label_values(load_labels(labels), labels, skip_bad)
        if match_labels == "order":
            label_map, more = match_labels_by_order(label_map, tree, labels, skip_bad)
            label_skips += more
        elif match_labels != "name":
            raise ValueError(f"match_labels={match_labels!r}: expected 'name' or 'order'")
        label_map, more = check_label_entries(label_map, tree, labels, loc_root, skip_bad)
        label_skips += more
    if image_size is None:
        first = next(((loc, s) for loc, ss in tree.items() for s in ss), None)
        if first is None:
            raise BadInputError(loc_root, "no season folders under any location")
        image_size = geotiff.infer_size(storage.join(loc_root, *first), bands)
    items = [(loc, tree[loc], label_map.get(loc)) for loc in sorted(tree)]
    spec = geotiff.Season(tuple(bands), image_size, DTYPE[modality],
                          f"{modality} ({DTYPE[modality]})", fill_value)
    fn = functools.partial(make_example, loc_root=loc_root, spec=spec, timesteps=TIMESTEPS,
                           labels_path=labels or "")
    metadata = {
        "dataset": "ssl4eo_s12", "modality": modality, "bands": bands,
        "dtype": DTYPE[modality], "timesteps": TIMESTEPS, "image_size": image_size,
        "num_classes": NUM_CLASSES, "has_labels": bool(labels),
        "source": storage.abspath(loc_root),
        "labels_file": storage.abspath(labels) if labels else None,
        "labels_matched_by": match_labels if labels else None,
    }
    if fill_value is not None:
        metadata["nonfinite"] = {"policy": "fill", "fill_value": fill_value}
    return shards.write_shards(out, items, fn, name=f"ssl4eo_s12_{modality}",
                               num_shards=num_shards, metadata=metadata,
                               num_workers=num_workers, resume=resume, skip_bad=skip_bad,
                               compression=compression, engine=engine, beam_args=beam_args,
                               pre_skipped=label_skips, desc=f"ssl4eo_s12 {modality}")



# ----------------------------------------------------------------------------- LMDB

class _RestrictedUnpickler(pickle.Unpickler):
    """Allows only what ``pickle.dumps((bytes, shape))`` needs."""

    _ALLOWED = {("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
                ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")


_LMDB_ENVS: dict = {}


def _lmdb_env(path: str):
    if path not in _LMDB_ENVS:
        try:
            import lmdb
        except ImportError:
            raise ImportError("--lmdb needs the 'lmdb' package: pip install lmdb") from None
        _LMDB_ENVS[path] = lmdb.open(path, readonly=True, lock=False, readahead=False,
                                     subdir=os.path.isdir(path), max_readers=512)
    return _LMDB_ENVS[path]


def make_lmdb_example(key: str, *, path: str, bands: list[str], dtype: str) -> dict:
    """Record of LMDB entry ``key``: value ``pickle((array.tobytes(), shape))``."""
    where = f"{path}[{key!r}]"
    with _lmdb_env(path).begin() as txn:
        value = txn.get(key.encode())
    if value is None:
        raise BadInputError(where, "key not found")
    try:
        raw, shape = _RestrictedUnpickler(io.BytesIO(value)).load()
        shape = tuple(int(s) for s in shape)
    except Exception as e:  # any malformed pickle
        raise BadInputError(where, f"value is not pickle((bytes, shape)): {e}") from None
    dt = np.dtype(dtype)
    if len(shape) != 4 or shape[1] != len(bands) or shape[2] != shape[3]:
        raise BadInputError(where, f"shape {shape}, expected (T, {len(bands)}, H, H)")
    if len(raw) != int(np.prod(shape)) * dt.itemsize:
        raise BadInputError(where, f"{len(raw)} bytes for shape {shape} as {dt} "
                                   f"(wrong --lmdb-dtype?)")
    image = np.frombuffer(raw, dt).reshape(shape)
    t = shape[0]
    return {"image": image, "labels": np.zeros((t, NUM_CLASSES), np.uint8),
            "has_label": np.zeros(t, bool), "seasons": [f"season{i}" for i in range(t)],
            "location": key}


def convert_lmdb(path: str, modality: str, out: str, *, num_shards: int,
                 dtype: str | None = None, num_workers: int = 0, resume: bool = False,
                 skip_bad: bool = False, compression: str = "uncompressed") -> dict:
    """Converts the official LMDB form (trusted files only, see LMDB_WARNING)."""
    log.warning(LMDB_WARNING)
    if not os.path.exists(path):
        raise BadInputError(path, "LMDB path does not exist")
    env = _lmdb_env(path)
    with env.begin() as txn:
        keys = [k.decode() for k in txn.cursor().iternext(keys=True, values=False)]
    keys = [k for k in keys if not k.startswith("__")]  # e.g. __len__ / __keys__ entries
    if not keys:
        raise BadInputError(path, "LMDB has no entries")
    keys.sort(key=lambda k: (0, int(k), "") if k.isdigit() else (1, 0, k))
    dtype = dtype or DTYPE[modality]
    bands = BANDS[modality]
    first = make_lmdb_example(keys[0], path=path, bands=bands, dtype=dtype)
    t, _, size, _ = first["image"].shape
    fn = functools.partial(make_lmdb_example, path=path, bands=bands, dtype=dtype)
    metadata = {
        "dataset": "ssl4eo_s12", "modality": modality, "bands": bands, "dtype": dtype,
        "timesteps": int(t), "image_size": int(size), "num_classes": NUM_CLASSES,
        "has_labels": False, "source": os.path.abspath(path),
    }
    return shards.write_shards(out, keys, fn, name=f"ssl4eo_s12_{modality}",
                               num_shards=num_shards, metadata=metadata,
                               num_workers=num_workers, resume=resume, skip_bad=skip_bad,
                               compression=compression,
                               desc=f"ssl4eo_s12 lmdb {modality}")


# ----------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Convert SSL4EO-S12 to ArrayRecord shards (see module docstring).",
        epilog="WARNING (--lmdb): " + LMDB_WARNING)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--root", help="GeoTIFF tree root holding s1/ s2a/ s2c/")
    src.add_argument("--lmdb", help="official LMDB file/folder. TRUSTED FILES ONLY: it holds "
                                    "pickles (see the warning below)")
    p.add_argument("--modality", required=True, choices=sorted(BANDS))
    p.add_argument("--labels", help="ssl4eo_multilabel.json (SSL4EO-S12-ML); GeoTIFF tree only")
    p.add_argument("--match-labels", choices=["name", "order"], default="name",
                   help="join label seasons to season folders by exact name (S2 L1C, the "
                        "labelled products) or by acquisition-date order (S1, S2 L2A)")
    p.add_argument("--image-size", type=int, default=None,
                   help="10 m grid size in px (default: read from the first 10 m band)")
    p.add_argument("--lmdb-dtype", default=None,
                   help="array dtype in the LMDB (default uint16 for S2, float32 for S1)")
    options.add_common_args(p)
    options.add_nonfinite_args(p)
    a = options.parse_args(p, argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        force=True)
    if a.lmdb and a.labels:
        p.error("--labels can only be joined with --root (the LMDB form has no season names)")
    if a.lmdb:
        if a.engine != "local" or storage.is_url(a.lmdb):
            p.error("--lmdb reads a local LMDB with the local engine only")
        meta = convert_lmdb(a.lmdb, a.modality, a.out, num_shards=a.num_shards,
                            dtype=a.lmdb_dtype, num_workers=a.num_workers,
                            resume=a.resume, skip_bad=a.skip_bad, compression=a.compression)
    else:
        meta = convert_tree(a.root, a.modality, a.out, num_shards=a.num_shards,
                            labels=a.labels, match_labels=a.match_labels,
                            image_size=a.image_size,
                            num_workers=a.num_workers, resume=a.resume,
                            skip_bad=a.skip_bad, compression=a.compression,
                            fill_value=options.fill_value(p, a), engine=a.engine,
                            beam_args=tuple(a.beam_args))
    print(options.summary(meta, a.out))


if __name__ == "__main__":
    cli.run(main)
