"""The backbone registry: one `BackboneSpec` per name, registered by its own module.

A backbone module (`vit.py`, `resnet.py`, or a user's file listed in `config.imports`)
defines a flax module, a `TorchLayout` (how its PyTorch state dict is named and adapted)
and registers each name:

    BACKBONES.register("resnet18", BackboneSpec(ResNet, dict(block="basic", ...), LAYOUT))

Names are timm names, so an exported file loads with `timm.create_model(name, ...)`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from softcon_jax.registry import Registry
from softcon_jax.cli import UserValueError


class TorchLayout:
    """How one backbone family's PyTorch state dict looks; `interop` reads only this.

    Subclasses set the class attributes and override the hooks they need.
    """

    first_layer: str = ""                 # key of the input conv / patch projection weight
    anchors: tuple[str, str] = ("", "")   # keys every file of the family has (prefix search)
    ignored: str = r"^$"                  # regex of keys that are not part of the backbone
    formats: tuple[str, ...] = ("timm",)  # export formats the family supports

    def first_layer_init(self) -> Callable[..., Any]:
        """Initializer (key, (kh, kw, c_in, c_out), dtype) of a re-initialised first layer."""
        raise NotImplementedError

    def normalize_keys(self, state_dict: dict) -> dict:
        """Undoes file-format quirks (e.g. DINOv2 block chunks) before names are compared."""
        return state_dict

    def adaptable(self, key: str, got: tuple, want: tuple) -> bool:
        """Whether a shape mismatch at `key` is adapted by `adapt` (not an error)."""
        return False

    def adapt(self, state_dict: dict, model: Any, spec: dict, **options: Any) -> dict:
        """Adapts the adaptable keys (e.g. resamples a position embedding)."""
        return state_dict

    def check_export(self, model: Any, format: str) -> None:
        if format not in self.formats:
            raise UserValueError(f"export format {format!r} is not available for {model.arch}; "
                                 f"available: {', '.join(self.formats)}.")

    def export_extras(self, model: Any, format: str, state_dict: dict, sidecar: dict) -> None:
        """Adds format-specific keys to the exported state dict and sidecar."""

    def describe(self, model: Any) -> str:
        """Short architecture description for error messages."""
        return f"{model.arch} (in_channels={model.in_channels})"

    def describe_file(self, state_dict: dict) -> str | None:
        """A guess of the architecture a state dict holds, or None if not this family."""
        return None

    def is_ignored(self, key: str) -> bool:
        return bool(re.search(self.ignored, key)) or key.endswith(".num_batches_tracked")


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    module: type              # the flax module class
    defaults: dict            # its architecture fields for this name
    layout: TorchLayout       # PyTorch names and adaptations

    @property
    def fields(self) -> set[str]:
        """Architecture fields a config may set (`config.model.backbone_kwargs`)."""
        return {f for f in self.module.__dataclass_fields__
                if f not in ("parent", "name", "arch", "in_channels", "dtype", "bn_groups",
                             "remat")}


BACKBONES: Registry[BackboneSpec] = Registry("backbone", "config.model.backbone")


def available_backbones() -> list[str]:
    """Sorted backbone names accepted by `build_backbone`."""
    return BACKBONES.names()


def spec_of(model: Any) -> BackboneSpec:
    """The spec a built backbone came from (by its `arch` name)."""
    arch = getattr(model, "arch", None)
    if arch not in BACKBONES:
        raise TypeError(f"Expected a backbone from softcon_jax.models.build_backbone, got "
                        f"{type(model).__name__}.")
    return BACKBONES.get(arch)


def build_backbone(name: str, *, in_channels: int, dtype: Any = jnp.float32,
                   bn_groups: int = 1, remat: bool = False, **kwargs: Any):
    """Builds backbone `name` for `in_channels` input bands.

    Args:
      name: one of `available_backbones()`.
      in_channels: input bands (13 S2 L1C, 12 S2 L2A, 2 S1, ...).
      dtype: compute dtype (jnp.bfloat16 for mixed precision); parameters stay float32.
      bn_groups: BatchNorm statistics groups (ResNet only; see `layers.BatchNorm`).
      remat: recompute each block's activations in the backward pass (`nn.remat`,
        `config.model.remat`): less memory, about one more forward; same parameters.
      **kwargs: architecture overrides (`BackboneSpec.fields`). ViT: img_size, patch_size,
        embed_dim, depth, num_heads, mlp_ratio, init_values, drop_path_rate, attention.
        ResNet: block, stage_sizes, widths (timm `layers`, `channels`).
    """
    spec = BACKBONES.get(name)
    unknown = sorted(set(kwargs) - spec.fields)
    if unknown:
        raise UserValueError(f"build_backbone({name!r}): unknown argument(s) {unknown} "
                             f"(config.model.backbone_kwargs); accepted: "
                             f"{sorted(spec.fields)}.")
    fields = {**spec.defaults, **kwargs}
    # Sequences must be tuples: modules are hashed and compared as jit static arguments.
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    if in_channels < 1:
        raise UserValueError(f"build_backbone({name!r}): in_channels must be >= 1, got "
                             f"{in_channels}.")
    if "remat" in spec.module.__dataclass_fields__:
        fields["remat"] = bool(remat)
    elif remat:  # a user backbone without the field
        raise UserValueError(f"config.model.remat=True: backbone {name!r} "
                             f"({spec.module.__name__}) has no 'remat' field.")
    return spec.module(arch=name, in_channels=int(in_channels), dtype=dtype,
                       bn_groups=int(bn_groups), **fields)
