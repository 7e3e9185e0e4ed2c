"""Record schema: a location's seasons, labels and names as msgpack headers + raw arrays.

Version 3 (what the converters write) stores one location as 1 + T consecutive ArrayRecord
records: the location record, then one season record per season, so that a reader that
uses two of four seasons reads half the bytes (SoftCon reads 2 of 4 seasons, SeCo 3 of 5;
reading, not augmenting, is the host's main cost when the views are made on the
accelerator). ``metadata.json`` says ``"records_per_location": 1 + T``. Every record is::

    b"SCJR" | header length (u32, little-endian) | header | zero padding | array bytes

The header is a msgpack map (no pickle, safe to read from untrusted files). The location
record::

    {
      "schema":    "softcon_jax.location",   # constant, identifies the format
      "version":   3,                        # SCHEMA_VERSION
      "location":  "0000042",                # location id (str)
      "seasons":   ["20200321T...", ...],    # T season / timestamp names (str)
      "image":     {"dtype": "<u2", "shape": [T, C, H, W]},  # what the seasons hold
      "labels":    ARRAY,                    # (T, 9) uint8 multi-hot Dynamic World
      "has_label": ARRAY,                    # (T,) bool; False = unlabelled season
    }

and season record t: ``{"schema": "softcon_jax.season", "version": 3, "location": id,
"index": t, "image": ARRAY}`` with the (C, H, W) image of season t.

``ARRAY`` is the map ``{"dtype": "<u2", "shape": [..], "offset": n}``: the NumPy dtype
string (explicit byte order), the shape, and where its C-order bytes start, counted from
the record's first byte (a multiple of 64). Keeping the arrays outside the msgpack map
lets `decode` return them as views of the record bytes (a 13-band 264 px season is 1.8 MB;
copying it out of a msgpack ``bin`` cost as much host time as all of the device-mode input
work). Allowed dtypes are the plain numeric ones in ``ALLOWED_DTYPES``.

Older datasets hold one record per location, all seasons inside, and are still read:
version 2 (`encode`: the location header with ``"image": ARRAY`` (T, C, H, W), framed as
above) and version 1 (one msgpack map with ``"data": <bytes>`` in each ARRAY).

Labels are all zeros where ``has_label`` is False and for datasets without
labels (SeCo). Decoding returns read-only arrays that view the input bytes
(zero-copy); copy them before writing in place.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

SCHEMA_NAME = "softcon_jax.location"
SEASON_SCHEMA = "softcon_jax.season"
SCHEMA_VERSION = 3  # what `encode_location` (the converters) writes
WHOLE_VERSION = 2  # `encode`: one record per location, all seasons inside
MAGIC = b"SCJR"
_ALIGN = 64
NUM_CLASSES = 9  # Dynamic World classes (Brown et al. 2022), as SSL4EO-S12-ML's labels

# Plain numeric dtypes only: object/void dtypes could not round-trip safely.
ALLOWED_DTYPES = frozenset(
    np.dtype(d).str
    for d in ("u1", "<u2", "<u4", "i1", "<i2", "<i4", "<f2", "<f4", "<f8", "|b1")
)


class RecordError(ValueError):
    """A record does not follow the schema (the message says what is wrong)."""


def _pack_array(name: str, value: Any, dtype: Any = None) -> tuple[dict, np.ndarray]:
    arr = np.asarray(value, dtype=dtype)
    # Little-endian on disk whatever the host; bool and 1-byte types have no order.
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and arr.dtype.itemsize > 1):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    code = arr.dtype.str
    if code not in ALLOWED_DTYPES:
        raise RecordError(
            f"field {name!r}: dtype {arr.dtype} is not one of {sorted(ALLOWED_DTYPES)}")
    # The bytes as a flat uint8 view, not a copy: `_frame` copies them once, into the record.
    return ({"dtype": code, "shape": list(arr.shape)},
            np.ascontiguousarray(arr).reshape(-1).view(np.uint8))


def _array_spec(name: str, obj: Any, keys: set) -> tuple[np.dtype, tuple, int]:
    if not isinstance(obj, dict) or set(obj) != keys:
        raise RecordError(f"field {name!r}: expected an array map with "
                          f"{'/'.join(sorted(keys))}")
    code = obj["dtype"]
    if code not in ALLOWED_DTYPES:
        raise RecordError(f"field {name!r}: dtype {code!r} is not allowed")
    dtype = np.dtype(code)
    shape = tuple(int(s) for s in obj["shape"])
    return dtype, shape, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _unpack_array(name: str, obj: Any, raw: bytes) -> np.ndarray:
    """A version-2 ARRAY: a read-only view of its bytes in `raw`."""
    dtype, shape, expected = _array_spec(name, obj, {"dtype", "shape", "offset"})
    offset = obj["offset"]
    if not isinstance(offset, int) or offset < 0 or offset + expected > len(raw):
        raise RecordError(f"field {name!r}: {max(len(raw) - int(offset), 0)} bytes at "
                          f"offset {offset} for shape {shape} {dtype} (expected {expected})")
    return np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize,
                         offset=offset).reshape(shape)


def _unpack_array_v1(name: str, obj: Any) -> np.ndarray:
    dtype, shape, expected = _array_spec(name, obj, {"dtype", "shape", "data"})
    data = obj["data"]
    if len(data) != expected:
        raise RecordError(
            f"field {name!r}: {len(data)} bytes for shape {shape} {dtype} (expected {expected})"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _checked(example: dict) -> tuple[np.ndarray, list[str], dict]:
    """(image, season names, packed label arrays) of an example, its shapes checked."""
    image = np.asarray(example["image"])
    if image.ndim != 4:
        raise RecordError(f"image must be (T, C, H, W), got shape {image.shape}")
    t = image.shape[0]
    seasons = [str(s) for s in example["seasons"]]
    if len(seasons) != t:
        raise RecordError(f"{len(seasons)} season names for {t} timesteps")
    labels = example.get("labels")
    labels = np.zeros((t, NUM_CLASSES), np.uint8) if labels is None else np.asarray(labels)
    has_label = example.get("has_label")
    has_label = labels.any(axis=1) if has_label is None else np.asarray(has_label)
    if labels.shape != (t, NUM_CLASSES):
        raise RecordError(f"labels must be ({t}, {NUM_CLASSES}), got {labels.shape}")
    if has_label.shape != (t,):
        raise RecordError(f"has_label must be ({t},), got {has_label.shape}")
    if labels.min(initial=0) < 0 or labels.max(initial=0) > 1:
        raise RecordError("labels must be multi-hot (0 or 1)")
    return image, seasons, {"labels": _pack_array("labels", labels, np.uint8),
                            "has_label": _pack_array("has_label", has_label, bool)}


def _frame(header: dict, arrays: dict[str, tuple[dict, np.ndarray]]) -> bytes:
    """MAGIC | header length | msgpack header (with each array's offset) | aligned arrays."""
    for name, (spec, _) in arrays.items():
        header[name] = {**spec, "offset": 0}
    # The offsets' msgpack width changes the header's length: repeat until the arrays
    # start where the header they are written in ends.
    first, packed = None, b""
    while first != _aligned(len(MAGIC) + 4 + len(packed)):
        first = start = _aligned(len(MAGIC) + 4 + len(packed))
        for name, (_, data) in arrays.items():
            header[name]["offset"] = start
            start = _aligned(start + len(data))
        packed = msgpack.packb(header, use_bin_type=True)
    parts = [MAGIC, len(packed).to_bytes(4, "little"), packed]
    end = len(MAGIC) + 4 + len(packed)
    for name, (_, data) in arrays.items():
        parts += [bytes(header[name]["offset"] - end), data]
        end = header[name]["offset"] + len(data)
    return b"".join(parts)  # the one copy of the arrays' bytes


def _unframe(raw: bytes) -> dict:
    """The msgpack header of a framed record (version 2 and 3 layouts)."""
    size = int.from_bytes(raw[4:8], "little")
    return msgpack.unpackb(raw[8:8 + size], raw=False, strict_map_key=True)


def encode(example: dict) -> bytes:
    """Serialises one location to one record, all seasons inside (version 2).

    ``example`` needs ``image`` (T, C, H, W), ``seasons`` (T str) and
    ``location`` (str); ``labels`` (T, 9) and ``has_label`` (T,) default to
    "no labels". Raises ``RecordError`` when shapes disagree.
    """
    image, seasons, arrays = _checked(example)
    header = {"schema": SCHEMA_NAME, "version": WHOLE_VERSION,
              "location": str(example["location"]), "seasons": seasons}
    return _frame(header, {"image": _pack_array("image", image), **arrays})


def encode_location(example: dict) -> list[bytes]:
    """Serialises one location to 1 + T records (version 3, what the converters write):
    the location record (names, labels, the image's dtype and shape) and one record per
    season, so that a reader reads only the seasons it uses. Same ``example`` as `encode`.
    """
    image, seasons, arrays = _checked(example)
    spec, _ = _pack_array("image", image[:0])
    location = str(example["location"])
    header = {"schema": SCHEMA_NAME, "version": SCHEMA_VERSION, "location": location,
              "seasons": seasons, "image": {"dtype": spec["dtype"],
                                            "shape": list(image.shape)}}
    out = [_frame(header, arrays)]
    for t, season in enumerate(image):
        out.append(_frame({"schema": SEASON_SCHEMA, "version": SCHEMA_VERSION,
                           "location": location, "index": t},
                          {"image": _pack_array("image", season)}))
    return out


class Location:
    """One location of a version-3 dataset: its location record, and ``read_season(t)``
    returning the bytes of its season record t. `decode` of it reads a season only when
    ``example["image"][t]`` asks for it."""

    def __init__(self, header: bytes, read_season):
        self.header, self.read_season = header, read_season


class Seasons:
    """``example["image"]`` of a `Location`: (T, C, H, W) whose seasons are read and
    checked on first use (then kept); ``np.asarray`` reads them all."""

    def __init__(self, dtype: np.dtype, shape: tuple, location: str, read_season):
        self.dtype, self.shape, self.ndim = dtype, shape, len(shape)
        self._location, self._read, self._cache = location, read_season, {}

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            t = int(key) + (self.shape[0] if key < 0 else 0)
            if not 0 <= t < self.shape[0]:
                raise IndexError(f"season {key} of {self.shape[0]}")
            if t not in self._cache:
                self._cache[t] = self._season(t)
            return self._cache[t]
        return np.asarray(self)[key]

    def _season(self, t: int) -> np.ndarray:
        raw = self._read(t)
        try:
            obj = _unframe(raw) if bytes(raw[:4]) == MAGIC else None
        except Exception as e:  # msgpack raises several unrelated exception types.
            raise RecordError(f"season record {t}: not a msgpack record: "
                              f"{type(e).__name__}: {e}") from None
        if (not isinstance(obj, dict) or obj.get("schema") != SEASON_SCHEMA
                or obj.get("version") != SCHEMA_VERSION):
            raise RecordError(f"season record {t} of location {self._location!r}: not a "
                              f"{SEASON_SCHEMA!r} version {SCHEMA_VERSION} record")
        if obj.get("location") != self._location or obj.get("index") != t:
            raise RecordError(
                f"season record {t} of location {self._location!r} holds season "
                f"{obj.get('index')!r} of location {obj.get('location')!r}")
        img = _unpack_array("image", obj.get("image"), raw)
        if img.dtype != self.dtype or img.shape != self.shape[1:]:
            raise RecordError(f"season record {t} of location {self._location!r}: image "
                              f"{img.shape} {img.dtype}, the location record says "
                              f"{self.shape[1:]} {self.dtype}")
        return img

    def __iter__(self):
        return (self[t] for t in range(self.shape[0]))

    def __array__(self, dtype=None, copy=None):
        out = np.stack(list(self))
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"Seasons({self.shape}, {self.dtype}, location={self._location!r})"


def decode(raw: "bytes | Location") -> dict:
    """Parses one location: the bytes of a version 1 or 2 record, or a version-3
    `Location` (what `softcon_jax.data.open_dataset(...).source[i]` gives for those).

    Returns ``{"image": (T,C,H,W) source dtype, "labels": (T,9) uint8,
    "has_label": (T,) bool, "seasons": [T str], "location": str}``; for a `Location`,
    ``image`` is a `Seasons` that reads season t on ``image[t]``. Raises ``RecordError``
    for anything that is not a valid record of a supported schema version.
    """
    location = raw if isinstance(raw, Location) else None
    raw = location.header if location is not None else raw
    framed = bytes(raw[:4]) == MAGIC
    try:
        obj = _unframe(raw) if framed else msgpack.unpackb(raw, raw=False,
                                                           strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated exception types.
        raise RecordError(f"not a msgpack record: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict) or obj.get("schema") != SCHEMA_NAME:
        raise RecordError(f"not a {SCHEMA_NAME!r} record")
    version = obj.get("version")
    expected = (SCHEMA_VERSION if location is not None else WHOLE_VERSION) if framed else 1
    if version != expected:
        raise RecordError(
            f"record schema version {version!r} where {expected} was expected (this code "
            f"reads versions 1 and {WHOLE_VERSION} as one record per location, version "
            f"{SCHEMA_VERSION} as a location record and one record per season)")
    if location is not None:
        dtype, shape, _ = _array_spec("image", obj.get("image"), {"dtype", "shape"})
        if len(shape) != 4:
            raise RecordError(f"image must have 4 dims (T, C, H, W), got {shape}")
        image = Seasons(dtype, shape, str(obj["location"]), location.read_season)
        labels, has_label = (_unpack_array(k, obj.get(k), raw)
                             for k in ("labels", "has_label"))
    elif framed:
        image, labels, has_label = (_unpack_array(k, obj.get(k), raw)
                                    for k in ("image", "labels", "has_label"))
    else:
        image, labels, has_label = (_unpack_array_v1(k, obj.get(k))
                                    for k in ("image", "labels", "has_label"))
    seasons = list(obj["seasons"])
    if image.ndim != 4:
        raise RecordError(f"image must have 4 dims (T, C, H, W), got {image.shape}")
    t = image.shape[0]
    if labels.shape != (t, NUM_CLASSES) or has_label.shape != (t,) or len(seasons) != t:
        raise RecordError(
            f"inconsistent record: image {image.shape}, labels {labels.shape}, "
            f"has_label {has_label.shape}, {len(seasons)} seasons"
        )
    return {
        "image": image,
        "labels": labels,
        "has_label": has_label,
        "seasons": [str(s) for s in seasons],
        "location": str(obj["location"]),
    }


def records_per_location(meta: dict) -> int:
    """ArrayRecord records per location in a dataset: 1 + T for version 3 (its
    ``metadata.json`` says so), 1 for datasets written as one record per location."""
    return int(meta.get("records_per_location", 1))
