"""ResNet-18/50 with torchvision's structure (v1.5: the bottleneck strides on its 3x3 conv).

Padding is torch-exact (explicit, not 'SAME', which differs at stride 2): conv1 7x7 s2 pad 3,
maxpool 3x3 s2 pad 1, 3x3 convs pad 1, 1x1 convs pad 0. Submodule names mirror the torch
keys (`layer1_0` is torch `layer1.0`, `downsample_0` is `downsample.0`) so the interop name
map is mechanical. Output: global-average-pooled features (B, num_features), as timm's
`resnet*` with `num_classes=0`.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from softcon_jax.models.layers import BatchNorm, kaiming_fan_out
from softcon_jax.models.registry import BACKBONES, BackboneSpec, TorchLayout

Dtype = Any

DEFAULT_WIDTHS = (64, 128, 256, 512)
STEM_WIDTH = 64  # timm and torchvision fix the 7x7 stem at 64 channels


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return ((k // 2, k // 2), (k // 2, k // 2))


def _conv(features: int, kernel: int, stride: int, dtype: Dtype, name: str) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=_pad(kernel),
                   use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                   kernel_init=kaiming_fan_out, name=name)


class BasicBlock(nn.Module):
    """torchvision BasicBlock: 3x3 conv (stride) - BN - ReLU - 3x3 conv - BN, + shortcut."""

    planes: int
    stride: int = 1
    downsample: bool = False
    bn_groups: int = 1
    dtype: Dtype = jnp.float32

    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = lambda name: BatchNorm(bn_groups=self.bn_groups, dtype=self.dtype, name=name)
        y = _conv(self.planes, 3, self.stride, self.dtype, "conv1")(x)
        y = nn.relu(bn("bn1")(y, train=train))
        y = _conv(self.planes, 3, 1, self.dtype, "conv2")(y)
        y = bn("bn2")(y, train=train)
        if self.downsample:
            x = _conv(self.planes, 1, self.stride, self.dtype, "downsample_0")(x)
            x = bn("downsample_1")(x, train=train)
        return nn.relu(y + x)


class Bottleneck(nn.Module):
    """torchvision Bottleneck v1.5: 1x1 - 3x3 (stride) - 1x1 (x4), BN after each, + shortcut."""

    planes: int
    stride: int = 1
    downsample: bool = False
    bn_groups: int = 1
    dtype: Dtype = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = lambda name: BatchNorm(bn_groups=self.bn_groups, dtype=self.dtype, name=name)
        out = self.planes * self.expansion
        y = _conv(self.planes, 1, 1, self.dtype, "conv1")(x)
        y = nn.relu(bn("bn1")(y, train=train))
        y = _conv(self.planes, 3, self.stride, self.dtype, "conv2")(y)
        y = nn.relu(bn("bn2")(y, train=train))
        y = _conv(out, 1, 1, self.dtype, "conv3")(y)
        y = bn("bn3")(y, train=train)
        if self.downsample:
            x = _conv(out, 1, self.stride, self.dtype, "downsample_0")(x)
            x = bn("downsample_1")(x, train=train)
        return nn.relu(y + x)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """torchvision-structured ResNet for any number of input channels.

    Attributes:
      arch: registry / timm name ('resnet18', 'resnet50').
      block: 'basic' or 'bottleneck'.
      stage_sizes: blocks per stage (timm `layers`).
      widths: base channels per stage (timm `channels`); the stem is always 64 wide.
      in_channels: input bands.
      bn_groups: see `softcon_jax.models.layers.BatchNorm`.
      dtype: compute dtype (parameters stay float32).
      remat: recompute each block's activations in the backward pass (`nn.remat`).
    """

    arch: str = "resnet50"
    block: str = "bottleneck"
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    widths: Sequence[int] = DEFAULT_WIDTHS
    in_channels: int = 3
    bn_groups: int = 1
    dtype: Dtype = jnp.float32
    remat: bool = False

    @property
    def num_features(self) -> int:
        """Feature dimension D of the pooled output."""
        return int(self.widths[-1]) * BLOCKS[self.block].expansion

    def timm_kwargs(self) -> dict:
        """kwargs such that `timm.create_model(arch, num_classes=0, **kw)` rebuilds this net."""
        kw: dict = {"in_chans": int(self.in_channels)}
        default = BACKBONES.get(self.arch).defaults if self.arch in BACKBONES else {}
        if tuple(self.stage_sizes) != tuple(default.get("stage_sizes", ())):
            kw["layers"] = [int(s) for s in self.stage_sizes]
        if tuple(self.widths) != DEFAULT_WIDTHS:
            kw["channels"] = [int(w) for w in self.widths]
        return kw

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False,
                 keep_indices: jax.Array | None = None) -> jax.Array:
        if keep_indices is not None:
            raise ValueError(f"{self.arch}: keep_indices (patch masking) needs a ViT backbone; "
                             f"a ResNet has no patch tokens.")
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"{self.arch}: expected NHWC input with {self.in_channels} "
                             f"channels, got shape {x.shape}.")
        block_cls = BLOCKS[self.block]
        if self.remat:
            block_cls = nn.remat(block_cls, static_argnums=(2,))
        x = x.astype(self.dtype)
        x = _conv(STEM_WIDTH, 7, 2, self.dtype, "conv1")(x)
        x = BatchNorm(bn_groups=self.bn_groups, dtype=self.dtype, name="bn1")(x, train=train)
        x = nn.relu(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        inplanes = STEM_WIDTH
        for s, (n_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for b in range(n_blocks):
                stride = 2 if (s > 0 and b == 0) else 1
                down = b == 0 and (stride != 1 or inplanes != width * block_cls.expansion)
                x = block_cls(planes=width, stride=stride, downsample=down,
                              bn_groups=self.bn_groups, dtype=self.dtype,
                              name=f"layer{s + 1}_{b}")(x, train)
                inplanes = width * block_cls.expansion
        # Pool in float32: the features feed losses and exports.
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)


# ==== PyTorch layout and registration =====================================================

class ResNetLayout(TorchLayout):
    """timm and torchvision share the ResNet names (`conv1`, `bn1`, `layer1.0.conv1`, ...).

    'torchvision' export needs the standard widths (torchvision has no width option).
    """

    first_layer = "conv1.weight"
    anchors = ("conv1.weight", "layer1.0.conv1.weight")
    ignored = r"^fc\.(weight|bias)$"
    formats = ("timm", "torchvision")

    def first_layer_init(self):
        return kaiming_fan_out

    def check_export(self, model, format):
        super().check_export(model, format)
        if format == "torchvision" and tuple(model.widths) != DEFAULT_WIDTHS:
            raise ValueError(f"format='torchvision' needs a ResNet with widths "
                             f"{DEFAULT_WIDTHS}; got {model.arch} with {tuple(model.widths)}. "
                             "Use format='timm'.")

    def export_extras(self, model, format, state_dict, sidecar):
        if format != "torchvision":
            return
        sidecar["torchvision_name"] = model.arch
        if tuple(model.stage_sizes) != tuple(BACKBONES.get(model.arch).defaults["stage_sizes"]):
            sidecar["torchvision_layers"] = [int(s) for s in model.stage_sizes]

    def describe_file(self, state_dict):
        keys = set(state_dict)
        if "conv1.weight" not in keys:
            return None
        layers = []
        for s in range(1, 5):
            idx = [int(m.group(1)) for k in keys if (m := re.match(rf"layer{s}\.(\d+)\.", k))]
            layers.append(1 + max(idx) if idx else 0)
        block = "bottleneck" if "layer1.0.conv3.weight" in keys else "basic"
        return (f"ResNet {block} blocks, layers={layers}, "
                f"in_chans={state_dict['conv1.weight'].shape[1]}")


LAYOUT = ResNetLayout()
BACKBONES.register("resnet18", BackboneSpec(ResNet, dict(block="basic", stage_sizes=(2, 2, 2, 2)),
                                            LAYOUT))
BACKBONES.register("resnet50", BackboneSpec(
    ResNet, dict(block="bottleneck", stage_sizes=(3, 4, 6, 3)), LAYOUT))
