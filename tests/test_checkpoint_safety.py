"""A damaged or mismatching checkpoint is one clear message; good checkpoints stay restorable."""

import glob
import os
import subprocess

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import logging
from helpers import fill_disk, small_tmpfs, snapshot

from softcon_jax.checkpoint import (CheckpointMismatchError, Checkpointer, CheckpointSaveError,
                                    CheckpointUnreadableError, UNREADABLE_DIR)


@flax.struct.dataclass
class State:
    step: jax.Array
    params: dict
    opt_state: object


def make_state(scale=1.0, width=3):
    params = {"dense": {"kernel": jnp.full((4, width), scale), "bias": jnp.zeros(width)}}
    return State(jnp.array(int(scale), jnp.int32), params, optax.adamw(1e-3).init(params))


def abstract(state):
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), state)


@pytest.fixture
def workdir(tmp_path):
    ck = Checkpointer(str(tmp_path), async_save=False)
    ck.save(1, make_state(1.0))
    ck.save(2, make_state(2.0))
    ck.wait()
    ck.close()
    return str(tmp_path)


def _garble(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(bytes(b ^ 0x5A for b in data) or b"\x00")


DAMAGE = {
    "manifest": lambda d: _garble(os.path.join(d, "state", "manifest.ocdbt")),
    "tree_metadata": lambda d: open(os.path.join(d, "state", "_METADATA"), "w").close(),
    "array_data": lambda d: [_garble(p) for p in glob.glob(os.path.join(d, "state", "**", "d",
                                                                        "*"), recursive=True)],
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_unreadable_latest_checkpoint_is_moved_aside_and_the_previous_restored(
        workdir, damage, monkeypatch):
    step2 = os.path.join(workdir, "checkpoints", "2")
    DAMAGE[damage](step2)
    damaged = snapshot(step2)
    good = snapshot(os.path.join(workdir, "checkpoints", "1"))
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))

    ck = Checkpointer(workdir, async_save=False)
    # Read-only use: the error names the step directory, nothing is moved.
    with pytest.raises(CheckpointUnreadableError) as err:
        ck.restore_latest(abstract(make_state()), move_aside=False)
    assert f"checkpoint {step2} cannot be read" in str(err.value)
    assert len(str(err.value).splitlines()) == 1 and os.path.isdir(step2)

    restored = ck.restore_latest(abstract(make_state()))
    assert restored.step == 1 and int(restored.state.step) == 1
    np.testing.assert_array_equal(restored.state.params["dense"]["kernel"], np.ones((4, 3)))
    aside = os.path.join(workdir, UNREADABLE_DIR, "2")
    assert any(step2 in w and aside in w for w in warnings), warnings
    assert snapshot(aside) == damaged  # kept as it was, for inspection
    assert not os.path.exists(step2) and ck.all_steps() == [1]
    assert ck.restore_latest(abstract(make_state())).step == 1  # not retried
    assert snapshot(os.path.join(workdir, "checkpoints", "1")) == good
    ck.close()


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(workdir):
    for step in ("1", "2"):
        DAMAGE["manifest"](os.path.join(workdir, "checkpoints", step))
    ck = Checkpointer(workdir, async_save=False)
    with pytest.raises(CheckpointUnreadableError, match="no checkpoint in .* can be read"):
        ck.restore_latest(abstract(make_state()))
    assert sorted(os.listdir(os.path.join(workdir, UNREADABLE_DIR))) == ["1", "2"]
    ck.close()


def test_changed_model_lists_the_differing_keys_and_keeps_the_checkpoint(workdir):
    before = snapshot(os.path.join(workdir, "checkpoints"))
    ck = Checkpointer(workdir, async_save=False)
    with pytest.raises(CheckpointMismatchError) as err:
        ck.restore_latest(abstract(make_state(width=5)))
    msg = str(err.value)
    assert "the checkpoint's state does not match this config" in msg
    assert "params/dense/kernel: checkpoint float32[4, 3], this config float32[4, 5]" in msg
    assert os.path.join(workdir, "checkpoints", "2") in msg

    extra = make_state()
    extra = extra.replace(params=dict(extra.params, head={"kernel": jnp.zeros((3, 2))}))
    with pytest.raises(CheckpointMismatchError, match="params/head/kernel: in this config "
                                                      r"float32\[3, 2\], not in the checkpoint"):
        ck.restore(2, abstract(extra))
    assert snapshot(os.path.join(workdir, "checkpoints")) == before
    assert not os.path.exists(os.path.join(workdir, UNREADABLE_DIR))
    assert int(ck.restore_latest(abstract(make_state())).state.step) == 2
    ck.close()


def test_trainer_resumes_from_the_newest_readable_checkpoint(tmp_path):
    from configs import quickstart
    from softcon_jax import train

    c = quickstart.get_config("test")
    c.data.path, c.total_steps, c.checkpoint.every_steps = str(tmp_path / "data"), 8, 4
    c.checkpoint.async_save = False
    workdir = str(tmp_path / "run")
    straight = train.train(c, workdir)
    DAMAGE["manifest"](os.path.join(workdir, "checkpoints", "8"))
    resumed = train.train(c, workdir)  # warns, moves step 8 aside, resumes from step 4
    assert os.path.isdir(os.path.join(workdir, UNREADABLE_DIR, "8"))
    assert int(resumed.step) == 8
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize("fault", ["disk_full", "read_only"])
@pytest.mark.parametrize("async_save", [False, True])
def test_failed_save_is_one_error_and_keeps_the_previous_checkpoint(tmp_path, fault,
                                                                    async_save):
    """Disk full (or a read-only filesystem) during a save: one CheckpointSaveError naming the
    directory and the step, the previous checkpoint byte-identical, no temporary directory."""
    with small_tmpfs(tmp_path / "disk", 4096) as disk:
        ck = Checkpointer(disk, async_save=async_save)
        ck.save(1, make_state(1.0))
        ck.wait()
        checkpoints = os.path.join(disk, "checkpoints")
        good = snapshot(os.path.join(checkpoints, "1"))
        if fault == "disk_full":
            fill_disk(disk, leave_bytes=16384)
        else:
            subprocess.run(["mount", "-o", "remount,ro", disk], check=True)
        with pytest.raises(CheckpointSaveError) as err:
            ck.save(2, make_state(2.0, width=50_000))  # 0.8 MB per array: does not fit
            ck.wait()
        msg = str(err.value)
        assert len(msg.splitlines()) == 1, msg
        assert msg.startswith(f"could not write checkpoint step 2 to {checkpoints} ("), msg
        assert ("No space left on device" if fault == "disk_full"
                else "Read-only file system") in msg, msg
        assert "The last good checkpoint is step 1 (untouched)" in msg
        ck.wait()
        ck.close()
        assert os.listdir(checkpoints) == ["1"]  # no half-written step, no temporary dir
        assert snapshot(os.path.join(checkpoints, "1")) == good
        restored = Checkpointer(disk, async_save=False).restore_latest(abstract(make_state()))
        assert restored.step == 1
