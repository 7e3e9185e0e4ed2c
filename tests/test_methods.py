"""SeCo trainer, numerical guard and warm start from PyTorch weights."""

import jax
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import helpers
from configs import quickstart, seco
from softcon_jax import state as state_lib, step as step_lib
from softcon_jax import interop, methods, optim, sharding, train


def _seco_config(tmp_path=None, **overrides):
    c = seco.get_config("rn18")
    c.global_batch_size = 16
    c.total_steps = 3
    c.log_every_steps = 1
    c.data.image_size = 16
    c.data.num_workers = 0
    # The synthetic scenes are uint16 S2 L1C: normalise them as such (SeCo's uint8
    # quantiles would saturate every pixel).
    c.data.bands, c.data.in_channels = None, 13
    c.data.normalization, c.data.stats = "softcon", "s2c"
    c.data.path = str(tmp_path / "data") if tmp_path else ""
    c.data.synthetic = dict(num_locations=32, num_shards=2, image_size=20, bands=13,
                            timesteps=4, seed=0)
    c.model.dtype = "float32"
    c.model.backbone_kwargs = dict(stage_sizes=(1, 1, 1, 1), widths=(16, 32, 32, 32))
    c.model.head.hidden_dim, c.model.head.out_dim = 32, 16
    c.loss.queue_size = 32
    c.checkpoint.every_steps = 100
    return helpers.set_dotted(c, overrides)


def _seco_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    b, s, c = config.global_batch_size, config.data.image_size, config.data.in_channels
    return {k: rng.normal(size=(b, s, s, c)).astype(np.float32)
            for k in ("q", "k0", "k1", "k2")}


def _steps(config, devices, batch, n=2):
    mesh = sharding.make_mesh(config.mesh, devices)
    method = methods.get(config.method)(config, mesh)
    tx, schedule = optim.make_optimizer(config)
    init_fn, rng, _, shardings = state_lib.create_train_state(config, method, tx, mesh)
    state = init_fn(rng)
    if n == 0:
        return jax.device_get(state), None
    step = step_lib.jit_train_step(config, method, tx, schedule, mesh, shardings)
    for _ in range(n):
        state, metrics = step(state, sharding.host_batch_to_global(batch, mesh))
    return jax.device_get(state), jax.device_get(metrics)


def test_seco_sharded_step_equals_single_device_and_fills_queue():
    config = _seco_config(**{"model.batch_norm": "sync", "loss.kwargs.batch_negatives": True})
    batch = _seco_batch(config)
    s8, m8 = _steps(config, jax.devices(), batch)
    s1, m1 = _steps(_seco_config(**{"model.batch_norm": "sync", "mesh.data": 1,
                                    "loss.kwargs.batch_negatives": True}),
                    jax.devices()[:1], batch)
    np.testing.assert_allclose(m8["loss/seasonal_infonce"], m1["loss/seasonal_infonce"],
                               rtol=1e-5)
    np.testing.assert_allclose(s8.model_state["queues"], s1.model_state["queues"], atol=1e-5)
    # Two steps of 16 keys fill the 32-key queues once: the pointer wrapped to 0, and every
    # queue row is a unit-norm key.
    assert int(s8.model_state["queue_ptr"]) == 0
    norms = np.linalg.norm(s8.model_state["queues"], axis=-1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_seco_key_encoder_is_the_ema_of_the_query_encoder():
    config = _seco_config()
    batch = _seco_batch(config)
    init, _ = _steps(config, jax.devices(), batch, n=0)
    after, _ = _steps(config, jax.devices(), batch, n=1)
    m = config.teacher.momentum
    moved = 0.0
    for k0, q1, k1 in zip(jax.tree.leaves(init.model_state["key_encoder"]["params"]),
                          jax.tree.leaves(after.params),
                          jax.tree.leaves(after.model_state["key_encoder"]["params"])):
        np.testing.assert_allclose(k1, m * k0 + (1 - m) * q1, atol=1e-6)
        moved = max(moved, float(np.abs(k1 - k0).max()))
    assert moved > 0


def test_seco_trains_from_synthetic_data(tmp_path):
    state = train.train(_seco_config(tmp_path), str(tmp_path / "run"))
    assert int(state.step) == 3 and int(state.num_nonfinite) == 0


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_steps_are_never_applied(tmp_path, mode):
    config = quickstart.get_config("test")
    config.data.path = str(tmp_path / "data")
    config.optimizer.lr = float("inf")  # every update overflows
    config.schedule.warmup_steps = 0
    config.nonfinite = mode
    workdir = str(tmp_path / "run")
    if mode == "stop":
        with pytest.raises(train.NonFiniteError, match=r"config.nonfinite='stop'"):
            train.train(config, workdir)
        return
    state = train.train(config, workdir)
    assert int(state.num_nonfinite) == config.total_steps
    for leaf in jax.tree.leaves(state.params):
        assert np.all(np.isfinite(leaf))


def test_warm_start_from_timm_weights_reinitialises_only_the_first_layer(tmp_path):
    torch.manual_seed(0)
    rgb = timm.create_model("resnet18", in_chans=3, num_classes=0)
    path = tmp_path / "rn18_rgb.safetensors"
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(path))

    config = quickstart.get_config("test")
    config.model.backbone, config.model.backbone_kwargs = "resnet18", {}
    config.init = dict(weights=str(path), first_layer="reinit")
    mesh = sharding.make_mesh(config.mesh)
    method = methods.get("softcon")(config, mesh)
    tx, _ = optim.make_optimizer(config)
    init_fn, rng, _, shardings = state_lib.create_train_state(config, method, tx, mesh)
    state = state_lib.load_pretrained_backbone(config, method, init_fn(rng), shardings)

    # Student and teacher start equal but must not share buffers: the train step donates
    # the state, and one buffer donated twice fails at the first step.
    def buffers(tree):
        return {s.data.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)
                for s in x.addressable_shards}
    assert not buffers(state.params["backbone"]) & buffers(
        state.model_state["teacher"]["params"]["backbone"])

    for which in ("student", "teacher"):
        variables = jax.device_get(method.backbone_variables(state.model_state, state.params,
                                                             which))
        out = tmp_path / f"{which}.safetensors"
        interop.export_torch(method.backbone, variables, str(out), "timm")
        from safetensors.torch import load_file
        exported, original = load_file(str(out)), rgb.state_dict()
        assert exported["conv1.weight"].shape == (64, 13, 7, 7)
        for key, value in original.items():
            if key != "conv1.weight":
                torch.testing.assert_close(exported[key], value, rtol=0, atol=0)
