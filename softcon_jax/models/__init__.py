"""Backbones and heads (flax.linen), chosen by name from `BACKBONES`.

`build_backbone(name, in_channels=C, dtype=..., bn_groups=..., **overrides)` returns a
module called as `module.apply(variables, x, train=bool, keep_indices=None,
mutable=['batch_stats'] when train and the model has BN)`, x (B, H, W, C) -> (B, D).
Names are the timm names, so an exported file loads with `timm.create_model(name, ...)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from softcon_jax.models import heads
from softcon_jax.models.heads import MoCoV3MLP, SeCoHead
from softcon_jax.models.layers import BatchNorm
from softcon_jax.models.registry import (BACKBONES, BackboneSpec, TorchLayout,
                                         available_backbones, build_backbone, spec_of)
from softcon_jax.models.resnet import ResNet
from softcon_jax.models.vit import VisionTransformer

# Importing the backbone modules registers their names (each module owns its defaults and
# its PyTorch layout; see models/registry.py and docs/extending.md, "Adding a backbone").
ARCH_DEFAULTS = {name: spec.defaults for name, spec in BACKBONES.items()}


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
    "ARCH_DEFAULTS", "BACKBONES", "BackboneSpec", "TorchLayout", "spec_of", "BatchNorm", "MoCoV3MLP", "ResNet", "SeCoHead", "VisionTransformer",
    "available_backbones", "build_backbone", "heads", "random_keep_indices",
]
