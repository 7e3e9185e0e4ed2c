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


@pytest.mark.parametrize("dtype,c,t", [(np.uint16, 13, 4), (np.uint8, 12, 5), (np.float32, 2, 4)])
def test_round_trip_keeps_values_dtype_and_metadata(dtype, c, t):
    ex = _example(dtype, t=t, c=c)
    out = records.decode(records.encode(ex))
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


def test_record_is_plain_msgpack_with_version():
    obj = msgpack.unpackb(records.encode(_example()), raw=False)
    assert obj["schema"] == records.SCHEMA_NAME and obj["version"] == records.SCHEMA_VERSION
    assert obj["image"]["dtype"] == "<u2" and obj["image"]["shape"] == [4, 13, 8, 8]


def test_other_version_is_rejected_with_clear_message():
    obj = msgpack.unpackb(records.encode(_example()), raw=False)
    obj["version"] = 99
    with pytest.raises(records.RecordError, match="version 99"):
        records.decode(msgpack.packb(obj, use_bin_type=True))


def test_pickle_and_garbage_are_rejected():
    with pytest.raises(records.RecordError):
        records.decode(pickle.dumps(_example()))
    with pytest.raises(records.RecordError):
        records.decode(b"\x00\x01garbage")


def test_object_dtype_and_truncated_data_are_rejected():
    obj = msgpack.unpackb(records.encode(_example()), raw=False)
    obj["image"]["dtype"] = "|O"
    with pytest.raises(records.RecordError, match="not allowed"):
        records.decode(msgpack.packb(obj, use_bin_type=True))
    obj = msgpack.unpackb(records.encode(_example()), raw=False)
    obj["image"]["data"] = obj["image"]["data"][:-2]
    with pytest.raises(records.RecordError, match="bytes for shape"):
        records.decode(msgpack.packb(obj, use_bin_type=True))


def test_encode_checks_shapes():
    ex = _example()
    ex["labels"] = ex["labels"][:, :5]
    with pytest.raises(records.RecordError, match="labels must be"):
        records.encode(ex)
    ex = _example()
    ex["seasons"] = ex["seasons"][:3]
    with pytest.raises(records.RecordError, match="season names"):
        records.encode(ex)
