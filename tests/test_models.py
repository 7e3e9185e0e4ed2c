"""Backbones, heads, BatchNorm groups and Siamese masking (no torch needed).

Numerics are checked against float64 NumPy references; PyTorch parity is in
test_interop_parity.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import helpers
from softcon_jax import models
from softcon_jax.models import heads
from softcon_jax.models.layers import BatchNorm
from softcon_jax.models.vit import VisionTransformer

TINY = {
    "resnet18": dict(stage_sizes=(1, 1, 1, 1), widths=(8, 16, 16, 32)),
    "resnet50": dict(stage_sizes=(1, 1, 1, 1), widths=(8, 16, 16, 32)),
    "vit_small_patch14_dinov2": dict(img_size=28, embed_dim=32, depth=2, num_heads=2),
    "vit_base_patch14_dinov2": dict(img_size=28, embed_dim=48, depth=1, num_heads=4),
}


def random_variables(model, x, seed=0):
    """Random float32 variables of the model's shapes for input x (see helpers)."""
    shapes = jax.eval_shape(lambda k, x: model.init(k, x), jax.random.key(0), x)
    return helpers.random_variables(shapes, seed)


def _image(model, batch=4, seed=0):
    size = getattr(model, "img_size", 32)
    return jax.random.normal(jax.random.key(seed), (batch, size, size, model.in_channels))


@pytest.fixture(scope="module")
def tiny_vit():
    model = models.build_backbone("vit_small_patch14_dinov2", in_channels=13,
                                  **TINY["vit_small_patch14_dinov2"])
    x = _image(model)
    return model, random_variables(model, x), x


def test_registry_names_and_errors():
    names = models.available_backbones()
    for required in ("resnet18", "resnet50", "vit_small_patch14_dinov2",
                     "vit_base_patch14_dinov2"):
        assert required in names
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'. Did you mean 'resnet18'.*Available: resnet18"):
        models.build_backbone("resnet19", in_channels=3)
    with pytest.raises(ValueError, match="unknown argument.*embed_dim"):
        models.build_backbone("resnet50", in_channels=3, embed_dim=3)
    # The trainer's masking guard relies on ResNets having no num_patches.
    assert not hasattr(models.build_backbone("resnet18", in_channels=2), "num_patches")


@pytest.mark.parametrize("name,channels", [("resnet18", 13), ("resnet50", 2),
                                           ("vit_small_patch14_dinov2", 12),
                                           ("vit_base_patch14_dinov2", 2)])
def test_backbone_shapes(name, channels):
    model = models.build_backbone(name, in_channels=channels, **TINY[name])
    x = _image(model, batch=2)
    variables = jax.eval_shape(lambda k, x: model.init(k, x), jax.random.key(0), x)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    assert out.shape == (2, model.num_features)
    expected_features = {"resnet18": 32, "resnet50": 128, "vit_small_patch14_dinov2": 32,
                         "vit_base_patch14_dinov2": 48}[name]
    assert model.num_features == expected_features
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    if name.startswith("vit"):
        assert model.num_patches == 4  # 28 px / 14
        assert variables["params"]["pos_embed"].shape == (1, 5, model.num_features)
        assert "batch_stats" not in variables
    else:
        assert set(variables) == {"params", "batch_stats"}


def test_full_size_dimensions():
    # Shape-only: the real configurations, traced without computing anything.
    vit = models.build_backbone("vit_base_patch14_dinov2", in_channels=13)
    assert (vit.num_features, vit.num_patches) == (768, 256)
    shapes = jax.eval_shape(lambda k, x: vit.init(k, x), jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 224, 224, 13), jnp.float32))
    assert shapes["params"]["pos_embed"].shape == (1, 257, 768)
    assert shapes["params"]["patch_embed"]["proj"]["kernel"].shape == (14, 14, 13, 768)
    rn = models.build_backbone("resnet50", in_channels=2)
    assert rn.num_features == 2048
    with pytest.raises(ValueError, match="img_size=224, got input 112x112"):
        jax.eval_shape(lambda x: vit.init(jax.random.key(0), x),
                       jax.ShapeDtypeStruct((1, 112, 112, 13), jnp.float32))
    with pytest.raises(ValueError, match="13 channels, got shape"):
        jax.eval_shape(lambda x: vit.init(jax.random.key(0), x),
                       jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))


@pytest.mark.parametrize("name", ["resnet18", "vit_small_patch14_dinov2"])
def test_bf16_compute_with_fp32_params(name):
    model32 = models.build_backbone(name, in_channels=4, **TINY[name])
    model16 = models.build_backbone(name, in_channels=4, dtype=jnp.bfloat16, **TINY[name])
    x = _image(model32)
    variables = random_variables(model32, x)
    shapes16 = jax.eval_shape(lambda k, x: model16.init(k, x), jax.random.key(0), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes16))
    ref = model32.apply(variables, x)
    out = model16.apply(variables, x)
    assert out.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out, np.float32) - np.asarray(ref))
    assert err.max() <= 0.05 * np.abs(np.asarray(ref)).max()
    if "resnet" in name:  # train mode keeps float32 running statistics
        _, new = model16.apply(variables, x, train=True, mutable=["batch_stats"])
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(new))


def test_random_keep_indices_per_sample():
    keep = models.random_keep_indices(jax.random.key(0), 8, 256, 0.75)
    assert keep.shape == (8, 64) and keep.dtype == jnp.int32
    keep = np.asarray(keep)
    for row in keep:
        assert np.all(np.diff(row) > 0)  # sorted, no repeats
        assert row.min() >= 0 and row.max() < 256
    assert len({tuple(r) for r in keep}) == 8  # drawn independently per sample
    other = np.asarray(models.random_keep_indices(jax.random.key(1), 8, 256, 0.75))
    assert not np.array_equal(keep, other)
    assert models.random_keep_indices(jax.random.key(0), 2, 4, 0.0).shape == (2, 4)
    with pytest.raises(ValueError, match="mask_ratio"):
        models.random_keep_indices(jax.random.key(0), 2, 4, 1.0)


def test_masking_keeps_cls_and_selected_tokens(tiny_vit):
    model, variables, x = tiny_vit
    keep = jnp.array([[3], [0], [2], [1]], jnp.int32)  # one patch per sample
    full = model.apply(variables, x, method=VisionTransformer.embed)
    masked = model.apply(variables, x, keep, method=VisionTransformer.embed)
    assert masked.shape == (4, 2, model.num_features)
    np.testing.assert_array_equal(masked[:, 0], full[:, 0])  # CLS always first
    for b in range(4):
        np.testing.assert_array_equal(masked[b, 1], full[b, 1 + int(keep[b, 0])])
    # Features of a masked view = the blocks applied to exactly those tokens.
    out = model.apply(variables, x, keep_indices=keep)
    ref = model.apply(variables, masked, method=VisionTransformer.encode)[:, 0]
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    # Keeping every patch (in any order) is the unmasked model: attention is permutation
    # equivariant once the position embedding has been added.
    perm = jnp.array([[3, 1, 0, 2]] * 4, jnp.int32)
    np.testing.assert_allclose(model.apply(variables, x, keep_indices=perm),
                               model.apply(variables, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="keep_indices must be"):
        model.apply(variables, x, keep_indices=keep[:2])


def test_resnet_rejects_masking():
    model = models.build_backbone("resnet18", in_channels=3, **TINY["resnet18"])
    x = _image(model, batch=2)
    variables = jax.eval_shape(lambda k, x: model.init(k, x), jax.random.key(0), x)
    with pytest.raises(ValueError, match="needs a ViT backbone"):
        jax.eval_shape(lambda v, x: model.apply(v, x, keep_indices=jnp.zeros((2, 1), int)),
                       variables, x)


def test_unknown_attention_implementation_names_the_config_key():
    model = models.build_backbone("vit_small_patch14_dinov2", in_channels=3,
                                  attention="flash", **TINY["vit_small_patch14_dinov2"])
    x = _image(model, batch=2)
    with pytest.raises(ValueError, match=r"attention='flash'.*backbone_kwargs.attention"):
        jax.eval_shape(lambda k, x: model.init(k, x), jax.random.key(0), x)


def test_drop_path_needs_rng_and_is_identity_in_eval():
    model = models.build_backbone("vit_small_patch14_dinov2", in_channels=2,
                                  drop_path_rate=0.5, **TINY["vit_small_patch14_dinov2"])
    x = _image(model)
    variables = random_variables(model, x)
    a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))


# --- BatchNorm ----------------------------------------------------------------------------

def _np_batchnorm_train(x, scale, bias, mean, var, groups, momentum=0.9, eps=1e-5):
    """float64 reference of torch BatchNorm (train) applied per group of B/G samples."""
    x = np.asarray(x, np.float64)
    b, c = x.shape[0], x.shape[-1]
    xg = x.reshape((groups, b // groups) + x.shape[1:])
    axes = tuple(range(1, xg.ndim - 1))
    mu = xg.mean(axis=axes, keepdims=True)
    v = xg.var(axis=axes, keepdims=True)
    y = ((xg - mu) / np.sqrt(v + eps)).reshape(x.shape) * scale + bias
    n = np.prod(xg.shape[1:-1])
    new_mean = momentum * mean + (1 - momentum) * mu.reshape(groups, c).mean(0)
    new_var = momentum * var + (1 - momentum) * (v.reshape(groups, c) * n / (n - 1)).mean(0)
    return y, new_mean, new_var


@pytest.mark.parametrize("groups,shape", [(1, (8, 3, 3, 5)), (4, (8, 3, 3, 5)), (2, (8, 6))])
def test_batchnorm_groups_match_numpy(groups, shape):
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, shape).astype(np.float32)
    c = shape[-1]
    variables = {"params": {"scale": rng.uniform(0.5, 1.5, c).astype(np.float32),
                            "bias": rng.normal(size=c).astype(np.float32)},
                 "batch_stats": {"mean": rng.normal(size=c).astype(np.float32),
                                 "var": rng.uniform(0.5, 2, c).astype(np.float32)}}
    bn = BatchNorm(bn_groups=groups)
    y, new = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    ref_y, ref_mean, ref_var = _np_batchnorm_train(
        x, variables["params"]["scale"], variables["params"]["bias"],
        variables["batch_stats"]["mean"], variables["batch_stats"]["var"], groups)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["batch_stats"]["mean"], ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["batch_stats"]["var"], ref_var, rtol=1e-5, atol=1e-6)
    # Eval mode normalises with the running statistics.
    y_eval = bn.apply(variables, x, train=False)
    stats = variables["batch_stats"]
    ref_eval = ((x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5)
                * variables["params"]["scale"] + variables["params"]["bias"])
    np.testing.assert_allclose(y_eval, ref_eval, rtol=1e-5, atol=1e-5)


def test_batchnorm_errors():
    x = jnp.ones((6, 4))
    bn = BatchNorm(bn_groups=4)
    variables = BatchNorm().init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="not divisible by bn_groups=4"):
        bn.apply(variables, x, train=True, mutable=["batch_stats"])
    with pytest.raises(ValueError, match="more than one value per channel"):
        BatchNorm(bn_groups=6).apply(variables, x, train=True, mutable=["batch_stats"])


def test_batchnorm_sharded_batch_is_sync_and_groups_are_per_shard():
    # 8 fake devices (conftest): one group = sync-BN over the global batch; G = 8 = one
    # group per data shard, i.e. per-device BN.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(16, 4)) * np.arange(1, 17)[:, None]).astype(np.float32)
    variables = BatchNorm().init(jax.random.key(0), x, train=False)
    xs = jax.device_put(x, sharding)
    for groups in (1, 8):
        fn = jax.jit(lambda v, x: BatchNorm(bn_groups=groups).apply(
            v, x, train=True, mutable=["batch_stats"]))
        y, new = fn(variables, xs)
        ref_y, ref_mean, ref_var = _np_batchnorm_train(
            x, 1.0, 0.0, np.zeros(4), np.ones(4), groups)
        np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(new["batch_stats"]["var"], ref_var, rtol=1e-5)


def test_resnet_train_updates_running_stats():
    model = models.build_backbone("resnet18", in_channels=13, bn_groups=2, **TINY["resnet18"])
    x = _image(model)
    variables = random_variables(model, x)
    out, new = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert out.shape == (4, model.num_features)
    before = flatten_dict(variables["batch_stats"])
    after = flatten_dict(new["batch_stats"])
    assert before.keys() == after.keys()
    assert all(not np.allclose(before[k], after[k]) for k in before)


# --- heads --------------------------------------------------------------------------------

def _np_bn(x, scale=1.0, bias=0.0, eps=1e-5):
    return (x - x.mean(0)) / np.sqrt(x.var(0) + eps) * scale + bias


def test_moco_v3_mlp_matches_numpy():
    head = heads.MoCoV3MLP(hidden_dim=16, out_dim=8, num_layers=3, last_bn=True)
    x = np.random.default_rng(0).normal(size=(6, 12)).astype(np.float32)
    variables = head.init(jax.random.key(0), x)
    p = variables["params"]
    assert set(p) == {"linear0", "bn0", "linear1", "bn1", "linear2"}  # last BN: no affine
    assert set(variables["batch_stats"]) == {"bn0", "bn1", "bn2"}
    assert all(set(p[f"linear{i}"]) == {"kernel"} for i in range(3))  # bias-free Linears
    out, _ = head.apply(variables, x, train=True, mutable=["batch_stats"])
    h = np.asarray(x, np.float64)
    for i in range(2):
        h = h @ np.asarray(p[f"linear{i}"]["kernel"], np.float64)
        h = np.maximum(_np_bn(h, p[f"bn{i}"]["scale"], p[f"bn{i}"]["bias"]), 0.0)
    ref = _np_bn(h @ np.asarray(p["linear2"]["kernel"], np.float64))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)

    predictor = heads.MoCoV3MLP(hidden_dim=16, out_dim=8, num_layers=2, last_bn=False,
                                bn_groups=2)
    pv = predictor.init(jax.random.key(1), out)
    assert set(pv["batch_stats"]) == {"bn0"}
    z, _ = predictor.apply(pv, out, train=True, mutable=["batch_stats"])
    assert z.shape == (6, 8)


def test_seco_head_matches_numpy():
    head = models.SeCoHead(hidden_dim=10, out_dim=4)
    x = np.random.default_rng(0).normal(size=(3, 7)).astype(np.float32)
    v = head.init(jax.random.key(0), x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    ref = (np.maximum(x @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0.0) @ p["fc2"]["kernel"]
           + p["fc2"]["bias"])
    np.testing.assert_allclose(head.apply(v, x, train=True), ref, rtol=1e-5, atol=1e-5)
    assert "batch_stats" not in v
