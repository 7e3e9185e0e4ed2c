"""Record schema: one record per location, all its seasons, a msgpack header + raw arrays.

A record (version 2) is::

    b"SCJR" | header length (u32, little-endian) | header | zero padding | array bytes

The header is a msgpack map (no pickle, safe to read from untrusted files)::

    {
      "schema":    "softcon_jax.location",   # constant, identifies the format
      "version":   2,                        # SCHEMA_VERSION
      "location":  "0000042",                # location id (str)
      "seasons":   ["20200321T...", ...],    # T season / timestamp names (str)
      "image":     ARRAY,                    # (T, C, H, W), source dtype
      "labels":    ARRAY,                    # (T, 9) uint8 multi-hot Dynamic World
      "has_label": ARRAY,                    # (T,) bool; False = unlabelled season
    }

where ``ARRAY`` is the map ``{"dtype": "<u2", "shape": [..], "offset": n}``: the NumPy
dtype string (explicit byte order), the shape, and where its C-order bytes start, counted
from the record's first byte (a multiple of 64). Keeping the arrays outside the msgpack
map lets `decode` return them as views of the record bytes: a 4-season 13-band 264 px
image is 7.2 MB, and copying it out of a msgpack `bin` (what version 1 did, with the bytes
inside the map) cost as much host time per record as all of the device-mode input work.
Allowed dtypes are the plain numeric ones in ``ALLOWED_DTYPES``. Version 1 records (one
msgpack map with ``"data": <bytes>`` in each ARRAY) are still read.

Labels are all zeros where ``has_label`` is False and for datasets without
labels (SeCo). Decoding returns read-only arrays that view the input bytes
(zero-copy); copy them before writing in place.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

SCHEMA_NAME = "softcon_jax.location"
SCHEMA_VERSION = 2
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


def _pack_array(name: str, value: Any, dtype: Any = None) -> tuple[dict, bytes]:
    arr = np.asarray(value, dtype=dtype)
    # Little-endian on disk whatever the host; bool and 1-byte types have no order.
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and arr.dtype.itemsize > 1):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    code = arr.dtype.str
    if code not in ALLOWED_DTYPES:
        raise RecordError(
            f"field {name!r}: dtype {arr.dtype} is not one of {sorted(ALLOWED_DTYPES)}")
    return {"dtype": code, "shape": list(arr.shape)}, np.ascontiguousarray(arr).tobytes()


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


def encode(example: dict) -> bytes:
    """Serialises one location to bytes.

    ``example`` needs ``image`` (T, C, H, W), ``seasons`` (T str) and
    ``location`` (str); ``labels`` (T, 9) and ``has_label`` (T,) default to
    "no labels". Raises ``RecordError`` when shapes disagree.
    """
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
    arrays = {"image": _pack_array("image", image),
              "labels": _pack_array("labels", labels, np.uint8),
              "has_label": _pack_array("has_label", has_label, bool)}
    header = {"schema": SCHEMA_NAME, "version": SCHEMA_VERSION,
              "location": str(example["location"]), "seasons": seasons}
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
    out = bytearray(MAGIC + len(packed).to_bytes(4, "little") + packed)
    for name, (_, data) in arrays.items():
        out += bytes(header[name]["offset"] - len(out)) + data
    return bytes(out)


def decode(raw: bytes) -> dict:
    """Parses bytes written by ``encode``.

    Returns ``{"image": (T,C,H,W) source dtype, "labels": (T,9) uint8,
    "has_label": (T,) bool, "seasons": [T str], "location": str}``.
    Raises ``RecordError`` for anything that is not a valid record of a
    supported schema version.
    """
    v2 = bytes(raw[:4]) == MAGIC
    try:
        if v2:
            size = int.from_bytes(raw[4:8], "little")
            obj = msgpack.unpackb(raw[8:8 + size], raw=False, strict_map_key=True)
        else:
            obj = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated exception types.
        raise RecordError(f"not a msgpack record: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict) or obj.get("schema") != SCHEMA_NAME:
        raise RecordError(f"not a {SCHEMA_NAME!r} record")
    version = obj.get("version")
    if version != (SCHEMA_VERSION if v2 else 1):
        raise RecordError(f"record schema version {version!r} is not supported (this code "
                          f"reads versions 1 and {SCHEMA_VERSION})")
    if v2:
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
