"""PyTorch parity of the Flax backbones through `softcon_jax.interop` (torch on the CPU).

Export: random Flax weights -> file -> timm / torchvision with strict loading -> the same
features. Import: random timm weights -> file -> Flax -> the same features, and exporting
again gives back the same tensors. Tolerance: max |diff| <= 1e-4 x max |reference|, fp32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
import helpers
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file as load_torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import checkpoint_filter_fn

from softcon_jax import interop, models

torch.set_num_threads(1)  # shared CI cores; the models here are small
RTOL = 1e-4
VIT_S = "vit_small_patch14_dinov2"
TINY_VIT = dict(embed_dim=64, depth=2, num_heads=2)


def random_variables(model, seed=0):
    """Random float32 Flax variables with non-trivial BN statistics and LayerScale gammas."""
    return helpers.random_variables(interop.abstract_variables(model), seed)


def randomize_torch(module: torch.nn.Module, seed=0) -> None:
    """Perturbs a timm model so nothing is at its init value (BN stats, LayerScale, ...)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith(("running_var", "gamma")) or (
                    name.endswith(".weight") and t.ndim == 1):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith(("running_mean", ".bias", "cls_token", "pos_embed")):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)


def torch_features(module: torch.nn.Module, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module.eval()(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)).numpy()


def assert_close(out, ref):
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.shape == ref.shape
    scale = np.abs(ref).max()
    err = np.abs(out - ref).max()
    assert err <= RTOL * scale, f"max |diff| {err:.3g} > {RTOL} x feature scale {scale:.3g}"


def inputs(batch, size, channels, seed=1):
    return np.random.default_rng(seed).normal(size=(batch, size, size, channels)).astype(
        np.float32)


# --- export -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,channels", [("resnet18", 13), ("resnet18", 2),
                                           ("resnet50", 13), ("resnet50", 2)])
def test_export_resnet_loads_in_timm_and_torchvision(tmp_path, arch, channels):
    model = models.build_backbone(arch, in_channels=channels)
    variables = random_variables(model)
    x = inputs(2, 32, channels)
    ours = interop.backbone_features(model, variables, x)

    bands = [f"B{i}" for i in range(channels)]
    meta = interop.export_torch(model, variables, tmp_path / "rn.safetensors", "timm",
                                band_order=bands, normalization={"kind": "softcon"})
    assert json.loads((tmp_path / "rn.safetensors.json").read_text()) == meta
    assert meta["timm_name"] == arch and meta["in_chans"] == channels
    assert meta["band_order"] == bands and meta["normalization"] == {"kind": "softcon"}
    sd = load_torch(tmp_path / "rn.safetensors")
    assert sd["bn1.num_batches_tracked"].dtype == torch.int64
    net = timm.create_model(meta["timm_name"], num_classes=0, **meta["timm_kwargs"])
    net.load_state_dict(sd, strict=True)
    assert_close(ours, torch_features(net, x))

    interop.export_torch(model, variables, tmp_path / "tv.safetensors", "torchvision")
    tv_sd = load_torch(tmp_path / "tv.safetensors")
    tv = getattr(torchvision.models, arch)(weights=None)
    tv.conv1 = torch.nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
    tv.fc = torch.nn.Identity()
    tv.load_state_dict(tv_sd, strict=True)
    assert_close(ours, torch_features(tv, x))


@pytest.mark.parametrize("channels,img_size,batch", [(13, 224, 1), (2, 56, 2)])
def test_export_vit_s14_loads_in_timm(tmp_path, channels, img_size, batch):
    model = models.build_backbone(VIT_S, in_channels=channels, img_size=img_size)
    variables = random_variables(model)
    x = inputs(batch, img_size, channels)
    ours = interop.backbone_features(model, variables, x)

    meta = interop.export_torch(model, variables, tmp_path / "vit.safetensors")
    assert meta["timm_kwargs"] == {"in_chans": channels, "img_size": img_size}
    assert meta["img_size"] == img_size
    net = timm.create_model(VIT_S, num_classes=0, **meta["timm_kwargs"])
    sd = load_torch(tmp_path / "vit.safetensors")
    assert sd["pos_embed"].shape == (1, 1 + (img_size // 14) ** 2, 384)
    net.load_state_dict(sd, strict=True)
    assert_close(ours, torch_features(net, x))

    # DINOv2-native: the timm tensors plus a mask_token; timm's converter accepts it.
    dmeta = interop.export_torch(model, variables, tmp_path / "d.safetensors", "dinov2")
    dsd = load_torch(tmp_path / "d.safetensors")
    assert set(dsd) == set(sd) | {"mask_token"} and dsd["mask_token"].shape == (1, 384)
    assert dmeta["dinov2_hub"]["model"] == "dinov2_vits14"
    net.load_state_dict(checkpoint_filter_fn(dsd, net), strict=True)


def test_export_tiny_variants_rebuild_from_sidecar(tmp_path):
    # Small test/quickstart models: the sidecar's timm_kwargs rebuild them in timm.
    cases = [(models.build_backbone("resnet50", in_channels=2, stage_sizes=(1, 2, 1, 1),
                                    widths=(8, 16, 32, 16)), 32),
             (models.build_backbone(VIT_S, in_channels=12, img_size=20, patch_size=4,
                                    embed_dim=32, depth=2, num_heads=2, init_values=0.1), 20)]
    for i, (model, size) in enumerate(cases):
        variables = random_variables(model, seed=i)
        x = inputs(2, size, model.in_channels)
        meta = interop.export_torch(model, variables, tmp_path / f"m{i}.safetensors")
        net = timm.create_model(meta["timm_name"], num_classes=0, **meta["timm_kwargs"])
        net.load_state_dict(load_torch(tmp_path / f"m{i}.safetensors"), strict=True)
        assert net.num_features == model.num_features == meta["num_features"]
        assert_close(interop.backbone_features(model, variables, x), torch_features(net, x))


def test_export_errors(tmp_path):
    vit = models.build_backbone(VIT_S, in_channels=2, img_size=28, **TINY_VIT)
    rn18 = models.build_backbone("resnet18", in_channels=2)
    rn50 = models.build_backbone("resnet50", in_channels=2)
    with pytest.raises(ValueError, match="'torchvision' is not available for vit_small.*available: timm, dinov2"):
        interop.export_torch(vit, random_variables(vit), tmp_path / "a.safetensors",
                             "torchvision")
    with pytest.raises(ValueError, match="'dinov2' is not available for resnet18.*available: timm, torchvision"):
        interop.export_torch(rn18, {}, tmp_path / "a.safetensors", "dinov2")
    with pytest.raises(ValueError, match="expected one of"):
        interop.export_torch(rn18, {}, tmp_path / "a.safetensors", "onnx")
    with pytest.raises(ValueError, match="band_order has 3 names but the model has 2"):
        interop.export_torch(rn18, {}, tmp_path / "a.safetensors", band_order=["a"] * 3)
    with pytest.raises(interop.StateDictMismatchError,
                       match=r"(?s)missing keys.*layer1\.0\.conv3\.weight.*shape mismatches"):
        interop.export_torch(rn50, random_variables(rn18), tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


# --- import -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,channels,suffix", [("resnet18", 13, ".safetensors"),
                                                  ("resnet50", 2, ".pth"),
                                                  (VIT_S, 2, ".safetensors")])
def test_import_round_trip(tmp_path, arch, channels, suffix):
    vit = arch.startswith("vit")
    kwargs = dict(img_size=56) if vit else {}
    net = timm.create_model(arch, num_classes=0, in_chans=channels, **kwargs)
    randomize_torch(net)
    reference = {k: v.numpy() for k, v in net.state_dict().items()}
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save(net.state_dict(), path)
    else:
        interop.write_state_dict(reference, path)

    model, variables = interop.import_torch(path, arch, channels, **kwargs)
    x = inputs(2, 56 if vit else 32, channels)
    assert_close(interop.backbone_features(model, variables, x), torch_features(net, x))

    interop.export_torch(model, variables, tmp_path / "again.safetensors")
    again = load_numpy(tmp_path / "again.safetensors")
    assert set(again) == set(reference)
    for key, value in reference.items():
        assert again[key].dtype == value.dtype, key
        np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_import_resamples_dinov2_grid_like_timm(tmp_path):
    # DINOv2 weights live on a 37x37 grid (518 px); SoftCon trains at 224 px (16x16).
    src = timm.create_model(VIT_S, num_classes=0, img_size=518, **TINY_VIT)
    randomize_torch(src)
    sd = dict(src.state_dict())
    sd["mask_token"] = torch.zeros(1, 64)  # DINOv2-native file
    assert sd["pos_embed"].shape == (1, 1 + 37 * 37, 64)
    interop.write_state_dict({k: v.numpy() for k, v in sd.items()}, tmp_path / "d.safetensors")

    dst = timm.create_model(VIT_S, num_classes=0, img_size=224, **TINY_VIT)
    dst.load_state_dict(checkpoint_filter_fn(dict(sd), dst), strict=True)
    model, variables = interop.import_torch(tmp_path / "d.safetensors", VIT_S, 3,
                                            img_size=224, **TINY_VIT)
    pos = np.asarray(variables["params"]["pos_embed"])
    np.testing.assert_allclose(pos, dst.pos_embed.detach().numpy(), rtol=0, atol=2e-6)
    x = inputs(1, 224, 3)
    assert_close(interop.backbone_features(model, variables, x), torch_features(dst, x))

    # Without antialias: timm's resampler with antialias=False (not DINOv2's formula).
    _, plain = interop.import_torch(tmp_path / "d.safetensors", VIT_S, 3, img_size=224,
                                    pos_embed_antialias=False, **TINY_VIT)
    ref = resample_abs_pos_embed(sd["pos_embed"], (16, 16), antialias=False)
    np.testing.assert_allclose(plain["params"]["pos_embed"], ref.numpy(), rtol=0, atol=2e-6)


def dinov2_interpolate_pos_encoding(pos_embed, w, h, patch_size=14, interpolate_offset=0.1,
                                    interpolate_antialias=False):
    """Transcription of facebookresearch/dinov2 `vision_transformer.py`
    `DinoVisionTransformer.interpolate_pos_encoding` for an input of w x h pixels."""
    import math
    N = pos_embed.shape[1] - 1
    pos_embed = pos_embed.float()
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch_size, h // patch_size
    M = int(math.sqrt(N))
    assert N == M * M
    kwargs = {}
    if interpolate_offset:
        sx = float(w0 + interpolate_offset) / M
        sy = float(h0 + interpolate_offset) / M
        kwargs["scale_factor"] = (sx, sy)
    else:
        kwargs["size"] = (w0, h0)
    patch_pos_embed = torch.nn.functional.interpolate(
        patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic",
        antialias=interpolate_antialias, **kwargs)
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


@pytest.mark.parametrize("img_size", [224, 98])
def test_import_dinov2_interpolation_matches_the_official_formula(tmp_path, img_size):
    src = timm.create_model(VIT_S, num_classes=0, img_size=518, **TINY_VIT)
    randomize_torch(src)
    sd = {k: v.numpy() for k, v in src.state_dict().items()}
    sd["pos_embed"] = np.random.default_rng(0).normal(size=sd["pos_embed"].shape).astype(
        np.float32)  # an embedding of unit scale, like DINOv2's
    interop.write_state_dict(sd, tmp_path / "d.safetensors")
    model, variables = interop.import_torch(tmp_path / "d.safetensors", VIT_S, 3,
                                            img_size=img_size, pos_embed_interpolation="dinov2",
                                            **TINY_VIT)
    ref = dinov2_interpolate_pos_encoding(torch.from_numpy(sd["pos_embed"]), img_size,
                                          img_size).numpy()
    pos = np.asarray(variables["params"]["pos_embed"])
    np.testing.assert_allclose(pos, ref, rtol=0, atol=2e-5)  # float32 kernel vs float64
    # timm's resampling is a different embedding (up to ~1.5 at unit scale for 224 px).
    _, timm_vars = interop.import_torch(tmp_path / "d.safetensors", VIT_S, 3,
                                        img_size=img_size, **TINY_VIT)
    assert np.abs(np.asarray(timm_vars["params"]["pos_embed"]) - ref).max() > 0.1
    # The features equal DINOv2's own forward at img_size: timm's model on the 518 grid
    # with the embedding replaced by DINOv2's interpolation.
    dst = timm.create_model(VIT_S, num_classes=0, img_size=img_size, **TINY_VIT)
    dst_sd = {k: torch.from_numpy(v) for k, v in sd.items()}
    dst_sd["pos_embed"] = torch.from_numpy(ref)
    dst.load_state_dict(dst_sd, strict=True)
    x = inputs(1, img_size, 3)
    assert_close(interop.backbone_features(model, variables, x), torch_features(dst, x))
    with pytest.raises(ValueError, match="pos_embed_interpolation='bilinear'"):
        interop.import_torch(tmp_path / "d.safetensors", VIT_S, 3,
                             pos_embed_interpolation="bilinear", **TINY_VIT)


def test_import_dinov2_training_checkpoint_names(tmp_path):
    # DINOv2 training checkpoints: {'model': {'teacher.backbone.blocks.<chunk>.<i>...',
    # 'student.backbone...'}} with mask_token; the EMA teacher is chosen.
    teacher = timm.create_model(VIT_S, num_classes=0, img_size=28, **TINY_VIT)
    student = timm.create_model(VIT_S, num_classes=0, img_size=28, **TINY_VIT)
    randomize_torch(teacher, seed=1)
    randomize_torch(student, seed=2)

    def native(net, prefix):
        out = {}
        for k, v in net.state_dict().items():
            k = k.replace("blocks.1.", "blocks.1.1.").replace("blocks.0.", "blocks.0.0.")
            out[prefix + k] = v
        out[prefix + "mask_token"] = torch.zeros(1, 64)
        return out

    ckpt = {"model": {**native(teacher, "teacher.backbone."),
                      **native(student, "student.backbone.")}, "iteration": 7}
    torch.save(ckpt, tmp_path / "train.pth")
    model, variables = interop.import_torch(tmp_path / "train.pth", VIT_S, 3, img_size=28,
                                            **TINY_VIT)
    x = inputs(2, 28, 3)
    assert_close(interop.backbone_features(model, variables, x), torch_features(teacher, x))
    _, sv = interop.import_torch(tmp_path / "train.pth", VIT_S, 3, img_size=28,
                                 key_prefix="student.backbone.", **TINY_VIT)
    assert_close(interop.backbone_features(model, sv, x), torch_features(student, x))


def test_first_layer_reinit_and_from_rgb(tmp_path):
    rgb = timm.create_model("resnet18", num_classes=0)
    randomize_torch(rgb)
    interop.write_state_dict({k: v.numpy() for k, v in rgb.state_dict().items()},
                             tmp_path / "rgb.safetensors")
    file_conv1 = rgb.conv1.weight.detach().numpy()

    model, fresh = interop.import_torch(tmp_path / "rgb.safetensors", "resnet18", 13, seed=3)
    kernel = np.asarray(fresh["params"]["conv1"]["kernel"])
    assert kernel.shape == (7, 7, 13, 64)
    # torchvision's init: kaiming normal, fan_out, relu gain -> std sqrt(2 / (64 * 49)).
    assert abs(kernel.std() / np.sqrt(2 / (64 * 49)) - 1) < 0.1
    np.testing.assert_array_equal(np.asarray(fresh["params"]["layer1_0"]["conv1"]["kernel"]),
                                  rgb.layer1[0].conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
    _, other_seed = interop.import_torch(tmp_path / "rgb.safetensors", "resnet18", 13, seed=4)
    assert not np.allclose(other_seed["params"]["conv1"]["kernel"], kernel)

    # from_rgb: a 13-band input whose bands all equal a grey image g gives the RGB
    # model's features on (g, g, g).
    model, adapted = interop.import_torch(tmp_path / "rgb.safetensors", "resnet18", 13,
                                          first_layer="from_rgb")
    np.testing.assert_allclose(
        np.asarray(adapted["params"]["conv1"]["kernel"]).transpose(3, 2, 0, 1),
        np.repeat(file_conv1.mean(1, keepdims=True) * 3 / 13, 13, axis=1), rtol=1e-6,
        atol=1e-7)
    grey = inputs(2, 32, 1)
    assert_close(interop.backbone_features(model, adapted, np.repeat(grey, 13, axis=-1)),
                 torch_features(rgb, np.repeat(grey, 3, axis=-1)))
    with pytest.raises(ValueError, match="first_layer='copy'"):
        interop.import_torch(tmp_path / "rgb.safetensors", "resnet18", 13, first_layer="copy")


def test_import_errors_list_keys_and_shapes(tmp_path):
    rn18 = timm.create_model("resnet18", num_classes=0, in_chans=2)
    sd = {k: v.numpy() for k, v in rn18.state_dict().items()}
    interop.write_state_dict(sd, tmp_path / "rn18.safetensors")

    with pytest.raises(interop.StateDictMismatchError) as e:
        interop.import_torch(tmp_path / "rn18.safetensors", "resnet50", 2)
    msg = str(e.value)
    assert "rn18.safetensors: checkpoint does not match resnet50" in msg
    assert "ResNet basic blocks, layers=[2, 2, 2, 2], in_chans=2" in msg
    assert "missing keys" in msg and "layer1.0.conv3.weight" in msg
    assert "shape mismatches" in msg
    assert "layer1.0.conv1.weight: file (64, 64, 3, 3) vs model (64, 64, 1, 1)" in msg

    broken = dict(sd)
    del broken["layer2.0.bn1.running_var"]
    broken["layer9.extra.weight"] = np.zeros(3, np.float32)
    broken["layer3.1.conv2.weight"] = np.zeros((256, 256, 1, 1), np.float32)
    interop.write_state_dict(broken, tmp_path / "broken.safetensors")
    with pytest.raises(interop.StateDictMismatchError) as e:
        interop.import_torch(tmp_path / "broken.safetensors", "resnet18", 2)
    msg = str(e.value)
    assert "missing keys (1): layer2.0.bn1.running_var" in msg
    assert "unexpected keys (1): layer9.extra.weight" in msg
    assert ("shape mismatches (1): layer3.1.conv2.weight: file (256, 256, 1, 1) vs model "
            "(256, 256, 3, 3)") in msg

    # Classifier heads are not part of the backbone and are ignored.
    with_fc = dict(sd, **{"fc.weight": np.zeros((10, 512), np.float32),
                          "fc.bias": np.zeros(10, np.float32)})
    interop.write_state_dict(with_fc, tmp_path / "fc.safetensors")
    interop.import_torch(tmp_path / "fc.safetensors", "resnet18", 2)

    with pytest.raises(ValueError, match="arch='resnet51': unknown backbone 'resnet51'. Did you mean 'resnet50'"):
        interop.import_torch(tmp_path / "rn18.safetensors", "resnet51", 2)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        interop.import_torch(tmp_path / "nope.safetensors", "resnet18", 2)
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported checkpoint suffix '.npz'"):
        interop.import_torch(tmp_path / "w.npz", "resnet18", 2)


def test_interop_import_does_not_import_torch():
    code = ("import sys, softcon_jax.interop, softcon_jax.models; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).parents[1]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
