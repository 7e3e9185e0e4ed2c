"""Trainer: sharded step equals single-device step, exact resume, clear config errors."""

import glob
import os

import jax
import numpy as np
import pytest

import helpers
from configs import quickstart
from softcon_jax import state as state_lib, step as step_lib
from softcon_jax import methods, optim, sharding, train


def _test_config(**overrides):
    config = quickstart.get_config("test")
    config.unlock()
    return helpers.set_dotted(config, overrides)


def _random_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    b, s, c = config.global_batch_size, config.data.image_size, config.data.in_channels
    labels = (rng.random((2, b, 9)) < 0.3).astype(np.float32)
    labels[:, :3] = 0.0  # a few unlabelled samples
    return {"view1": rng.normal(size=(b, s, s, c)).astype(np.float32),
            "view2": rng.normal(size=(b, s, s, c)).astype(np.float32),
            "labels1": labels[0], "labels2": labels[1]}


def _one_step(config, devices, batch):
    mesh = sharding.make_mesh(config.mesh, devices)
    method = methods.get(config.method)(config, mesh)
    tx, schedule = optim.make_optimizer(config)
    init_fn, rng, _, shardings = state_lib.create_train_state(config, method, tx, mesh)
    state = init_fn(rng)
    step = step_lib.jit_train_step(config, method, tx, schedule, mesh, shardings)
    for _ in range(2):  # two steps: the second one sees updated BN stats and EMA teacher
        state, metrics = step(state, sharding.host_batch_to_global(batch, mesh))
    return jax.device_get(state), jax.device_get(metrics)


def _assert_trees_close(a, b, rtol):
    """Relative difference ||a - b|| / ||b|| over the whole tree."""
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    diff = sum(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)
               for x, y in zip(leaves_a, leaves_b))
    norm = sum(np.sum(np.asarray(y, np.float64) ** 2) for y in leaves_b)
    assert np.sqrt(diff / norm) <= rtol, np.sqrt(diff / norm)


@pytest.mark.parametrize("overrides", [
    {},
    {"mesh.data": 4, "mesh.fsdp": 2, "model.mask_ratio": 0.5},
    {"grad_accum_steps": 2, "loss.num_chunks": 2},
])
def test_sharded_step_equals_single_device(overrides):
    assert jax.device_count() == 8
    # SGD, because its update is linear in the gradient. Adam maps gradients that are zero
    # in exact arithmetic (e.g. attention key biases) to +-lr from float noise, so its
    # parameters cannot agree to 1e-5 between any two summation orders.
    # LayerScale 1.0: with DINOv2's 1e-5 a random ViT's CLS token hardly depends on the
    # input, and the projector's BatchNorm then amplifies float noise.
    overrides = {"optimizer.name": "sgd", "optimizer.lr": 0.5, "optimizer.momentum": 0.9,
                 "schedule.warmup_steps": 0, "model.backbone_kwargs.init_values": 1.0,
                 **overrides}
    config = _test_config(**overrides)
    batch = _random_batch(config)
    state8, metrics8 = _one_step(config, jax.devices(), batch)
    config1 = _test_config(**{**overrides, "mesh.data": 1, "mesh.fsdp": 1})
    state1, metrics1 = _one_step(config1, jax.devices()[:1], batch)

    np.testing.assert_allclose(metrics8["loss/total"], metrics1["loss/total"], rtol=1e-5)
    assert np.isfinite(metrics8["loss/total"])
    # 2e-5: with jax 0.10.2 the accumulated, chunked variant lands at 1.003e-5 (float32
    # summation order over 2 micro-batches x 2 chunks x 8 devices); a real bug is >= 1e-3.
    _assert_trees_close(state8.params, state1.params, rtol=2e-5)
    _assert_trees_close(state8.model_state, state1.model_state, rtol=2e-5)
    assert int(state8.step) == int(state1.step) == 2


def test_per_device_batchnorm_differs_from_sync():
    """'per_device' BN (shuffle-BN emulation) really uses per-shard statistics."""
    config = _test_config(**{"model.backbone": "resnet18", "model.backbone_kwargs": {}})
    batch = _random_batch(config)
    _, sync = _one_step(config, jax.devices(), batch)
    _, per_dev = _one_step(_test_config(**{"model.backbone": "resnet18",
                                           "model.backbone_kwargs": {},
                                           "model.batch_norm": "per_device"}),
                           jax.devices(), batch)
    assert abs(float(sync["loss/total"]) - float(per_dev["loss/total"])) > 1e-6


def _params_of_run(workdir, config):
    return jax.device_get(train.train(config, str(workdir)).params)


def test_stop_after_step_and_resume_matches_uninterrupted(tmp_path):
    data_path = str(tmp_path / "data")
    straight = _params_of_run(tmp_path / "straight", _test_config(**{"data.path": data_path}))

    stopped = _test_config(**{"data.path": data_path, "stop_after_step": 3})
    train.train(stopped, str(tmp_path / "resumed"))
    ckpts = os.listdir(tmp_path / "resumed" / "checkpoints")
    assert "3" in ckpts and "8" not in ckpts
    resumed = _params_of_run(tmp_path / "resumed", _test_config(**{"data.path": data_path}))

    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    assert glob.glob(str(tmp_path / "resumed" / "tensorboard" / "events.out.tfevents.*"))


def test_bfloat16_batch_gives_the_same_step_as_float32_for_a_bfloat16_model():
    # The trainer ships views in the model's compute dtype (config.data.dtype unset): for a
    # bf16 model that must change nothing, since the first layer rounds to bf16 anyway.
    import ml_dtypes

    config = _test_config(**{"model.dtype": "bfloat16"})
    batch = _random_batch(config)
    state32, metrics32 = _one_step(config, jax.devices(), batch)
    b16 = {k: v.astype(ml_dtypes.bfloat16) if k.startswith("view") else v
           for k, v in batch.items()}
    state16, metrics16 = _one_step(config, jax.devices(), b16)
    np.testing.assert_allclose(metrics16["loss/total"], metrics32["loss/total"], rtol=1e-6)
    _assert_trees_close(state16, state32, rtol=1e-6)


def test_loop_syncs_with_the_devices_only_at_log_and_checkpoint_steps(tmp_path, monkeypatch):
    # No device-to-host synchronisation inside the loop except at logging steps
    # (and checkpoint steps, and the first step, which reports the compile time).
    import threading

    config = _test_config(**{"data.path": str(tmp_path / "data"), "total_steps": 9,
                             "log_every_steps": 3, "checkpoint.every_steps": 9})
    calls = {"steps": 0}
    synced_at = []
    jit_train_step = train.jit_train_step

    def counting_jit_train_step(*args, **kwargs):
        step_fn = jit_train_step(*args, **kwargs)

        def counted(*a):
            calls["steps"] += 1
            return step_fn(*a)
        return counted

    def recording(fn):
        def wrapper(*a, **k):
            if threading.current_thread() is threading.main_thread():
                synced_at.append(calls["steps"])
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(train, "jit_train_step", counting_jit_train_step)
    for name in ("device_get", "block_until_ready"):
        monkeypatch.setattr(jax, name, recording(getattr(jax, name)))
    # Every implicit conversion (np.asarray, float(), .item(), ...) reads ArrayImpl._value.
    from jax._src.array import ArrayImpl
    monkeypatch.setattr(ArrayImpl, "_value", property(recording(ArrayImpl._value.fget)))
    train.train(config, str(tmp_path / "run"))
    assert calls["steps"] == 9
    # Set-up before the first step (0) may sync; then only the first step (compile time),
    # the log steps 3, 6, 9 and the checkpoint step 9.
    assert {s for s in synced_at if s > 0} == {1, 3, 6, 9}, synced_at


def test_mesh_that_does_not_divide_batch_is_a_clear_error():
    config = _test_config(global_batch_size=12)
    mesh = sharding.make_mesh(config.mesh)
    with pytest.raises(ValueError, match=r"config.global_batch_size=12 .*8 batch shards"):
        train.validate(config, mesh)


def test_mesh_larger_than_device_count_is_a_clear_error():
    with pytest.raises(ValueError, match=r"config.mesh asks for data=16"):
        sharding.make_mesh({"data": 16, "fsdp": 1})


def test_unknown_names_list_the_alternatives():
    config = _test_config(**{"loss.name": "no_such_loss"})
    mesh = sharding.make_mesh(config.mesh)
    with pytest.raises(Exception, match=r"no_such_loss.*soft_contrastive"):
        methods.get("softcon")(config, mesh)
    with pytest.raises(ValueError, match=r"config.method='nope'.*softcon"):
        methods.get("nope")
    with pytest.raises(ValueError, match=r"config.optimizer.name='adam'.*adamw"):
        optim.make_optimizer(_test_config(**{"optimizer.name": "adam"}))


@pytest.mark.parametrize("key, value, message", [
    ("model.dtype", "float16", r"config.model.dtype='float16'.*bfloat16"),
    ("data.dtype", "uint8", r"config.data.dtype='uint8'.*bfloat16"),
])
def test_bad_dtypes_fail_before_anything_runs(key, value, message):
    config = _test_config(**{key: value})
    with pytest.raises(ValueError, match=message):
        train.validate(config, sharding.make_mesh(config.mesh))


def test_device_prefetch_does_not_change_the_run(tmp_path):
    # The prefetch thread only moves where batches are placed on the devices, not which.
    data_path = str(tmp_path / "data")
    runs = [_params_of_run(tmp_path / f"prefetch_{n}",
                           _test_config(**{"data.path": data_path, "prefetch_to_device": n}))
            for n in (0, 3)]
    for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1])):
        np.testing.assert_array_equal(a, b)
