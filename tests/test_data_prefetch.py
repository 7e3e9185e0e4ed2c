"""Device prefetch: same batches in the same order, exact input position, errors surface."""

import json
import time

import jax
import numpy as np
import pytest

from softcon_jax import data, sharding
from softcon_jax.data import DevicePrefetcher, synthetic


@pytest.fixture(scope="module")
def syn_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("syn"))
    synthetic.write_dataset(out, num_locations=12, num_shards=3, image_size=16)
    return out


def _host_iter(path):
    cfg = data.default_config()
    cfg.path, cfg.image_size, cfg.read_threads, cfg.views = path, 8, 1, "softcon"
    return iter(data.build_dataset(cfg, global_batch_size=8, seed=0))


def _to_device():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    return lambda b: sharding.host_batch_to_global(b, mesh)


def _assert_same(device_batch, host_batch):
    assert sorted(device_batch) == sorted(host_batch)
    for k, v in host_batch.items():
        assert isinstance(device_batch[k], jax.Array)
        np.testing.assert_array_equal(np.asarray(device_batch[k]), v)


@pytest.mark.parametrize("size", [0, 1, 3])
def test_same_batches_in_the_same_order_as_the_host_iterator(syn_dir, size):
    expected = [next(it) for it in [_host_iter(syn_dir)] for _ in range(5)]
    prefetcher = DevicePrefetcher(_host_iter(syn_dir), _to_device(), size)
    try:
        for want in expected:
            _assert_same(next(prefetcher), want)
    finally:
        prefetcher.close()


def test_state_is_the_position_of_consumed_batches_not_of_those_read_ahead(syn_dir):
    reference = _host_iter(syn_dir)
    expected = [next(reference) for _ in range(8)]
    prefetcher = DevicePrefetcher(_host_iter(syn_dir), _to_device(), size=3)
    for _ in range(2):
        next(prefetcher)
    deadline = time.time() + 30  # let the thread read 3 batches ahead
    while not prefetcher._queue.full() and time.time() < deadline:
        time.sleep(0.01)
    assert prefetcher._queue.full()
    state = prefetcher.get_state()
    prefetcher.close()

    # Grain's checkpoint handler writes get_state().decode() and reads it back with
    # json.loads into a plain Grain iterator (that is how the trainer restores).
    fresh = _host_iter(syn_dir)
    fresh.set_state(json.loads(state.decode()))
    for want in expected[2:5]:
        got = next(fresh)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])

    # And set_state on a running prefetcher drops what it had read ahead.
    again = DevicePrefetcher(_host_iter(syn_dir), _to_device(), size=2)
    next(again)
    again.set_state(state)
    try:
        _assert_same(next(again), expected[2])
        _assert_same(next(again), expected[3])
    finally:
        again.close()


class _Failing:
    """A host iterator whose third batch is unreadable."""

    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        if self.i == 3:
            raise ValueError("shard /data/train-00002.array_record: record 17 is corrupt")
        return {"x": np.full((8, 2), self.i, np.float32)}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def test_errors_of_the_input_reach_the_train_loop_with_their_message():
    prefetcher = DevicePrefetcher(_Failing(), _to_device(), size=2)
    assert float(next(prefetcher)["x"][0, 0]) == 1.0
    assert float(next(prefetcher)["x"][0, 0]) == 2.0
    with pytest.raises(ValueError, match="train-00002.array_record: record 17 is corrupt"):
        next(prefetcher)
    assert json.loads(prefetcher.get_state()) == {"i": 2}  # the last good batch
    prefetcher.close()


def test_negative_size_names_the_config_key():
    with pytest.raises(ValueError, match="config.prefetch_to_device=-1"):
        DevicePrefetcher(_Failing(), _to_device(), size=-1)
