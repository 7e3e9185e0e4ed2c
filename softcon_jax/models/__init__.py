"""Backbones and heads (flax.linen), chosen by name.

`build_backbone(name, in_channels=C, dtype=..., bn_groups=..., **overrides)` returns a
module called as `module.apply(variables, x, train=bool, keep_indices=None,
mutable=['batch_stats'] when train and the model has BN)`, x (B, H, W, C) -> (B, D).
Names are the timm names, so an exported file loads with `timm.create_model(name, ...)`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from softcon_jax.models import heads
from softcon_jax.models.heads import MoCoV3MLP, SeCoHead
from softcon_jax.models.layers import BatchNorm
from softcon_jax.models.resnet import ResNet
from softcon_jax.models.vit import VisionTransformer

# Architecture fields per name; build_backbone kwargs override them.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "resnet18": dict(block="basic", stage_sizes=(2, 2, 2, 2)),
    "resnet50": dict(block="bottleneck", stage_sizes=(3, 4, 6, 3)),
    "vit_small_patch14_dinov2": dict(patch_size=14, embed_dim=384, depth=12, num_heads=6,
                                     mlp_ratio=4.0, img_size=224),
    "vit_base_patch14_dinov2": dict(patch_size=14, embed_dim=768, depth=12, num_heads=12,
                                    mlp_ratio=4.0, img_size=224),
    "vit_large_patch14_dinov2": dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16,
                                     mlp_ratio=4.0, img_size=224),
}

_CLASSES: dict[str, type[nn.Module]] = {
    "resnet18": ResNet, "resnet50": ResNet,
    "vit_small_patch14_dinov2": VisionTransformer,
    "vit_base_patch14_dinov2": VisionTransformer,
    "vit_large_patch14_dinov2": VisionTransformer,
}


def available_backbones() -> list[str]:
    """Sorted backbone names accepted by `build_backbone`."""
    return sorted(_CLASSES)


def build_backbone(name: str, *, in_channels: int, dtype: Any = jnp.float32,
                   bn_groups: int = 1, **kwargs: Any) -> nn.Module:
    """Builds backbone `name` for `in_channels` input bands.

    Args:
      name: one of `available_backbones()`.
      in_channels: input bands (13 S2 L1C, 12 S2 L2A, 2 S1, ...).
      dtype: compute dtype (jnp.bfloat16 for mixed precision); parameters stay float32.
      bn_groups: BatchNorm statistics groups (ResNet only; see `layers.BatchNorm`).
      **kwargs: architecture overrides. ViT: img_size, patch_size, embed_dim, depth,
        num_heads, mlp_ratio, init_values, drop_path_rate. ResNet: stage_sizes, widths
        (per-stage base channels; timm `layers`, `channels`).
    """
    if name not in _CLASSES:
        raise ValueError(f"Unknown backbone {name!r}; available: {available_backbones()}.")
    cls = _CLASSES[name]
    fields = dict(ARCH_DEFAULTS[name])
    allowed = {f for f in cls.__dataclass_fields__ if f not in ("parent", "name", "arch")}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"build_backbone({name!r}): unknown argument(s) {unknown}; "
                         f"accepted: {sorted(allowed - {'in_channels', 'dtype', 'bn_groups'})}.")
    fields.update(kwargs)
    # Sequences must be tuples: modules are hashed and compared as jit static arguments.
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    if in_channels < 1:
        raise ValueError(f"build_backbone({name!r}): in_channels must be >= 1, got {in_channels}.")
    return cls(arch=name, in_channels=int(in_channels), dtype=dtype, bn_groups=int(bn_groups),
               **fields)


def random_keep_indices(rng: jax.Array, batch: int, num_patches: int,
                        mask_ratio: float) -> jax.Array:
    """Per-sample random subsets of patch tokens to keep (Siamese masking).

    Returns (batch, n_keep) int32, each row sorted and without repeats, drawn independently
    per sample; n_keep = max(1, round(num_patches * (1 - mask_ratio))).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
    n_keep = max(1, int(round(num_patches * (1.0 - mask_ratio))))
    noise = jax.random.uniform(rng, (batch, num_patches))
    keep = jnp.argsort(noise, axis=1)[:, :n_keep]
    return jnp.sort(keep, axis=1).astype(jnp.int32)


__all__ = [
    "ARCH_DEFAULTS", "BatchNorm", "MoCoV3MLP", "ResNet", "SeCoHead", "VisionTransformer",
    "available_backbones", "build_backbone", "heads", "random_keep_indices",
]
