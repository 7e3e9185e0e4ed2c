"""Record schema: round trips, versioning, and refusal of anything but the schema."""

import pickle

import msgpack
import numpy as np
import pytest

from softcon_jax.data import records


def _example(dtype=np.uint16, t=4, c=13, s=8, seed=0):
    rng = np.random.default_rng(seed)
    image = (rng.random((t, c, s, s)) * 10000).astype(dtype)
    labels = (rng.random((t, 9)) < 0.3).astype(np.uint8)
    labels[1] = 0
    has_label = labels.any(axis=1)
    return {"image": image, "labels": labels, "has_label": has_label,
            "seasons": [f"2020{m:02d}01T000000_T31XYZ" for m in range(1, t + 1)],
            "location": "0001234"}


def _location(parts: list[bytes], reads: list | None = None) -> records.Location:
    """A version-3 location over `encode_location`'s parts; `reads` logs the seasons read."""
    def read_season(t):
        if reads is not None:
            reads.append(t)
        return parts[1 + t]
    return records.Location(parts[0], read_season)


def _round_trip(ex: dict, layout: str) -> dict:
    if layout == "whole":
        return records.decode(records.encode(ex))
    out = records.decode(_location(records.encode_location(ex)))
    return {**out, "image": np.asarray(out["image"])}


@pytest.mark.parametrize("layout", ["per_season", "whole"])
@pytest.mark.parametrize("dtype,c,t", [(np.uint16, 13, 4), (np.uint8, 12, 5), (np.float32, 2, 4)])
def test_round_trip_keeps_values_dtype_and_metadata(dtype, c, t, layout):
    ex = _example(dtype, t=t, c=c)
    out = _round_trip(ex, layout)
    assert out["image"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out["image"], ex["image"])
    assert out["labels"].dtype == np.uint8 and out["labels"].shape == (t, 9)
    np.testing.assert_array_equal(out["labels"], ex["labels"])
    assert out["has_label"].dtype == bool
    np.testing.assert_array_equal(out["has_label"], ex["has_label"])
    assert out["seasons"] == ex["seasons"] and out["location"] == "0001234"


def test_big_endian_input_is_stored_little_endian():
    ex = _example(np.dtype(">u2"))
    out = records.decode(records.encode(ex))
    assert out["image"].dtype == np.dtype("<u2")
    np.testing.assert_array_equal(out["image"], ex["image"].astype("<u2"))


def test_missing_labels_mean_unlabelled():
    ex = _example()
    del ex["labels"], ex["has_label"]
    out = records.decode(records.encode(ex))
    assert not out["labels"].any() and not out["has_label"].any()


def _header(raw: bytes) -> dict:
    """The layout the module docstring documents: magic, u32 LE length, msgpack header."""
    assert raw[:4] == b"SCJR"
    return msgpack.unpackb(raw[8:8 + int.from_bytes(raw[4:8], "little")], raw=False)


def _with_header(raw: bytes, header: dict) -> bytes:
    """`raw` with its header replaced; the arrays stay at their offsets."""
    packed = msgpack.packb(header, use_bin_type=True)
    start = header["image"]["offset"]  # the first array
    assert 8 + len(packed) <= start
    return (b"SCJR" + len(packed).to_bytes(4, "little") + packed
            + bytes(start - 8 - len(packed)) + raw[start:])


def test_record_is_a_msgpack_header_and_aligned_array_bytes():
    ex = _example()
    raw = records.encode(ex)
    obj = _header(raw)
    assert obj["schema"] == records.SCHEMA_NAME and obj["version"] == records.WHOLE_VERSION
    assert obj["image"]["dtype"] == "<u2" and obj["image"]["shape"] == [4, 13, 8, 8]
    for name in ("image", "labels", "has_label"):
        assert obj[name]["offset"] % 64 == 0
    start = obj["image"]["offset"]
    stored = np.frombuffer(raw[start:start + ex["image"].nbytes], "<u2").reshape(4, 13, 8, 8)
    np.testing.assert_array_equal(stored, ex["image"])
    out = records.decode(raw)  # a view of the record bytes, not a copy
    assert np.shares_memory(out["image"], np.frombuffer(raw, np.uint8))
    assert not out["image"].flags.writeable


def test_version_3_location_is_a_location_record_then_one_record_per_season():
    ex = _example(t=4)
    parts = records.encode_location(ex)
    assert len(parts) == 5
    head = _header(parts[0])
    assert head["schema"] == records.SCHEMA_NAME and head["version"] == records.SCHEMA_VERSION
    assert head["image"] == {"dtype": "<u2", "shape": [4, 13, 8, 8]}  # no pixels in it
    assert len(parts[0]) < ex["image"][0].nbytes
    for t, raw in enumerate(parts[1:]):
        obj = _header(raw)
        assert (obj["schema"], obj["version"]) == (records.SEASON_SCHEMA, records.SCHEMA_VERSION)
        assert obj["location"] == ex["location"] and obj["index"] == t
        assert obj["image"]["shape"] == [13, 8, 8] and obj["image"]["offset"] % 64 == 0
    reads = []
    out = records.decode(_location(parts, reads))
    assert out["image"].shape == (4, 13, 8, 8) and out["image"].dtype == np.uint16
    assert reads == []  # nothing read until a season is asked for
    season = out["image"][2]
    np.testing.assert_array_equal(season, ex["image"][2])
    assert np.shares_memory(season, np.frombuffer(parts[3], np.uint8))  # a view, no copy
    out["image"][-2], out["image"][0]
    assert reads == [2, 0]  # season 2 once (kept), then season 0; 1 and 3 never read
    np.testing.assert_array_equal(np.asarray(out["image"]), ex["image"])
    np.testing.assert_array_equal(out["labels"], ex["labels"])


def test_version_3_season_records_are_checked_against_their_location():
    ex, other = _example(t=3), _example(t=3, s=4, seed=1)
    other["location"] = "elsewhere"
    parts = records.encode_location(ex)
    swapped = [parts[0], parts[2], parts[1], parts[3]]
    with pytest.raises(records.RecordError, match="season record 0 .* holds season 1"):
        records.decode(_location(swapped))["image"][0]
    foreign = [parts[0], records.encode_location(other)[1], *parts[2:]]
    with pytest.raises(records.RecordError, match="of location 'elsewhere'"):
        records.decode(_location(foreign))["image"][0]
    other["location"] = ex["location"]
    small = [parts[0], records.encode_location(other)[1], *parts[2:]]
    with pytest.raises(records.RecordError, match=r"\(13, 4, 4\) uint16, the location"):
        records.decode(_location(small))["image"][0]
    with pytest.raises(records.RecordError, match="season record 1"):
        records.decode(_location([parts[0], parts[1], b"garbage", parts[3]]))["image"][1]
    with pytest.raises(IndexError):
        records.decode(_location(parts))["image"][3]
    with pytest.raises(records.RecordError, match="version 3 where 2 was expected"):
        records.decode(parts[0])  # a location record alone is not a whole location


def test_version_1_records_are_still_read():
    ex = _example()
    v1 = msgpack.packb({
        "schema": records.SCHEMA_NAME, "version": 1, "location": ex["location"],
        "seasons": ex["seasons"],
        "image": {"dtype": "<u2", "shape": list(ex["image"].shape),
                  "data": ex["image"].astype("<u2").tobytes()},
        "labels": {"dtype": "|u1", "shape": [4, 9], "data": ex["labels"].tobytes()},
        "has_label": {"dtype": "|b1", "shape": [4], "data": ex["has_label"].tobytes()},
    }, use_bin_type=True)
    out = records.decode(v1)
    np.testing.assert_array_equal(out["image"], ex["image"])
    np.testing.assert_array_equal(out["labels"], ex["labels"])
    assert out["seasons"] == ex["seasons"]


def test_other_version_is_rejected_with_clear_message():
    raw = records.encode(_example())
    obj = _header(raw)
    obj["version"] = 99
    with pytest.raises(records.RecordError, match="version 99"):
        records.decode(_with_header(raw, obj))


def test_pickle_and_garbage_are_rejected():
    with pytest.raises(records.RecordError):
        records.decode(pickle.dumps(_example()))
    with pytest.raises(records.RecordError):
        records.decode(b"\x00\x01garbage")


def test_object_dtype_and_truncated_data_are_rejected():
    raw = records.encode(_example())
    obj = _header(raw)
    obj["image"]["dtype"] = "|O"
    with pytest.raises(records.RecordError, match="not allowed"):
        records.decode(_with_header(raw, obj))
    with pytest.raises(records.RecordError, match="'has_label'.*bytes at offset"):
        records.decode(raw[:-2])  # a truncated record (the last array is has_label)


@pytest.mark.parametrize("encode", [records.encode, records.encode_location])
def test_encode_checks_shapes(encode):
    ex = _example()
    ex["labels"] = ex["labels"][:, :5]
    with pytest.raises(records.RecordError, match="labels must be"):
        encode(ex)
    ex = _example()
    ex["seasons"] = ex["seasons"][:3]
    with pytest.raises(records.RecordError, match="season names"):
        encode(ex)
