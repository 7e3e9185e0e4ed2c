"""PyTorch interop: import timm / torchvision / DINOv2 weights, export for timm / torchvision.

- `import_torch(path, arch, in_channels, ...) -> (model, variables)`: builds the Flax backbone
  and fills it from a `.safetensors` or `.pth` file (timm, torchvision or DINOv2-native
  names). A first layer with another input-channel count is re-initialised (default) or
  built from the file's kernel (`first_layer='from_rgb'`); the ViT position embedding is
  resampled to the model's grid exactly as timm does (`pos_embed_interpolation='timm'`) or
  exactly as DINOv2's own `interpolate_pos_encoding` does (`'dinov2'`).
- `export_torch(model, variables, out_path, format)` writes the backbone with PyTorch names
  and layouts plus a JSON sidecar `<out_path>.json` (e.g. `backbone.safetensors.json`).
- `backbone_features(model, variables, x)`: eval-mode features, as timm with num_classes=0.

Nothing here imports torch at module import time; reading or writing `.pth` does, lazily.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softcon_jax import cli, models
from softcon_jax.interop import keymaps
from softcon_jax.interop.io import read_state_dict, staged, write_state_dict
from softcon_jax.models.pos_embed import dinov2_interpolate_pos_embed, resample_pos_embed

log = logging.getLogger(__name__)

FORMATS = ("timm", "torchvision", "dinov2")
FIRST_LAYER_MODES = ("reinit", "from_rgb", "error")
POS_EMBED_INTERPOLATIONS = ("timm", "dinov2")


class StateDictMismatchError(cli.UserValueError):
    """A checkpoint or variables tree does not match the architecture."""


def _dummy_input(model: Any) -> jax.ShapeDtypeStruct:
    size = getattr(model, "img_size", 32)
    return jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)


def abstract_variables(model: Any) -> dict:
    """Shapes of the model's variables (`jax.eval_shape`, nothing is initialised)."""
    return jax.eval_shape(functools.partial(model.init, train=False),
                          jax.random.key(0), _dummy_input(model))


def _fmt(keys: list[str], limit: int = 40) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


def _mismatch_message(what: str, missing: list[str], unexpected: list[str],
                      shapes: list[str]) -> str:
    lines = [what]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_fmt(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
    if shapes:
        lines.append(f"  shape mismatches ({len(shapes)}): {_fmt(shapes)}")
    return "\n".join(lines)


def _first_layer_from_file(w: np.ndarray, in_channels: int) -> np.ndarray:
    """'from_rgb': the mean kernel over the file's channels, for every band, x C_file / C.

    An input whose C bands all equal one image I then gives the same first-layer output as
    the source model on an input whose channels all equal I (e.g. a grey RGB image).
    """
    c_file = w.shape[1]
    mean = w.astype(np.float64).mean(axis=1, keepdims=True)
    return np.repeat(mean * (c_file / in_channels), in_channels, axis=1).astype(np.float32)


def import_torch(path: str | os.PathLike, arch: str, in_channels: int, *,
                 first_layer: str = "reinit", img_size: int = 224, seed: int = 0,
                 key_prefix: str | None = None, pos_embed_antialias: bool = True,
                 pos_embed_interpolation: str = "timm",
                 **arch_kwargs: Any) -> tuple[Any, dict]:
    """Builds backbone `arch` for `in_channels` bands and loads a PyTorch checkpoint into it.

    Args:
      path: `.safetensors`, or `.pth`/`.pt` (loaded with torch, `weights_only=True`).
        Names may be timm, torchvision or DINOv2-native; wrapper prefixes such as
        `module.` / `backbone.` are stripped (the EMA `teacher` is preferred when a file
        holds several backbones); classifier heads (`fc.*`, `head.*`) and DINOv2's
        `mask_token` are ignored.
      arch: a timm name from `softcon_jax.models.available_backbones()`.
      in_channels: input bands of the new model.
      first_layer: what to do when the file's first layer has another channel count:
        'reinit' (default, as SoftCon): a fresh init of conv1 / patch_embed.proj weight
        (the patch-embed bias is kept); 'from_rgb': every band gets the mean of the file's
        kernels over its channels, scaled by C_file / in_channels; 'error': raise
        `StateDictMismatchError` naming both channel counts (evaluation uses it: a file is
        evaluated as it is, never with a re-initialised layer).
      img_size: ViT input size; the position embedding is resampled to its grid when the
        file's grid differs (e.g. DINOv2's 37x37 at 518 px -> 16x16 at 224 px). Ignored for
        ResNets.
      seed: PRNG seed of the re-initialised first layer.
      key_prefix: explicit prefix to strip (overrides the automatic choice).
      pos_embed_interpolation: how the position embedding is resampled to another grid:
        'timm' (default): timm's `resample_abs_pos_embed` to the exact new size, bicubic,
        antialias `pos_embed_antialias`; with True it is what timm's
        `checkpoint_filter_fn` does (`create_model(..., pretrained=True, img_size=...)`,
        and torchgeo's timm-based models).
        'dinov2': exactly what DINOv2's own `interpolate_pos_encoding`
        (facebookresearch/dinov2 `vision_transformer.py`) computes when its model sees
        that input size: bicubic, no antialias, `interpolate_offset=0.1`, i.e. scale
        factors (w0 + 0.1) / M for an M x M source grid (`pos_embed_antialias` is
        ignored). This reproduces the features of the original DINOv2 model at img_size.
        The two differ by up to ~1.5 in the embedding for 518 -> 224 px.
      pos_embed_antialias: antialias flag of the 'timm' resampling (True = timm's
        default). False is *not* DINOv2's interpolation, which also uses the 0.1 offset.
      **arch_kwargs: `build_backbone` overrides (dtype, bn_groups, tiny sizes, ...).

    Returns:
      (model, variables) with float32 'params' (and 'batch_stats' for ResNets).

    Raises:
      StateDictMismatchError: missing / unexpected keys or shapes that differ (listed).
    """
    if first_layer not in FIRST_LAYER_MODES:
        raise ValueError(f"first_layer={first_layer!r}; expected one of {FIRST_LAYER_MODES}.")
    if pos_embed_interpolation not in POS_EMBED_INTERPOLATIONS:
        raise ValueError(f"pos_embed_interpolation={pos_embed_interpolation!r}; expected one "
                         f"of {POS_EMBED_INTERPOLATIONS}.")
    backbone = models.BACKBONES.get(arch, key="arch")
    kwargs = dict(arch_kwargs)
    if "img_size" in backbone.fields:
        kwargs["img_size"] = img_size
    model = models.build_backbone(arch, in_channels=in_channels, **kwargs)
    layout = backbone.layout
    spec = keymaps.torch_spec(abstract_variables(model))

    raw = read_state_dict(path)
    try:
        sd, ignored = keymaps.normalize(raw, layout, key_prefix)
    except ValueError as e:
        raise StateDictMismatchError(f"{path}: {e}") from None
    if ignored:
        log.info("%s: ignoring %d non-backbone keys: %s", path, len(ignored), _fmt(ignored, 10))

    first_key = layout.first_layer
    missing = sorted(set(spec) - set(sd))
    unexpected = sorted(set(sd) - set(spec))
    shapes = []
    for key in sorted(set(spec) & set(sd)):
        want, got = spec[key][3], tuple(sd[key].shape)
        if want == got:
            continue
        if key == first_key and len(got) == 4 and (got[0],) + got[2:] == (want[0],) + want[2:]:
            continue  # other input channels: adapted below
        if layout.adaptable(key, got, want):
            continue  # e.g. a position embedding of another grid: adapted below
        shapes.append(f"{key}: file {got} vs model {want}")
    if missing or unexpected or shapes:
        raise StateDictMismatchError(_mismatch_message(
            f"{path}: checkpoint does not match {layout.describe(model)}; the file looks like: "
            f"{keymaps.describe(sd)}.", missing, unexpected, shapes))

    sd = dict(sd)
    w = sd[first_key]
    if w.shape[1] != in_channels:
        if first_layer == "error":
            raise StateDictMismatchError(
                f"{path}: its first layer {first_key} has {w.shape[1]} input channels, the "
                f"model {in_channels}.")
        if first_layer == "reinit":
            init = layout.first_layer_init()
            o, _, kh, kw = spec[first_key][3]
            fresh = init(jax.random.key(seed), (kh, kw, in_channels, o), jnp.float32)
            sd[first_key] = keymaps.to_torch_layout("conv", np.asarray(fresh))
        else:
            sd[first_key] = _first_layer_from_file(w, in_channels)
        log.warning("%s: %s has %d input channels, model %d: first layer %s.", path, first_key,
                 w.shape[1], in_channels, "re-initialised" if first_layer == "reinit"
                 else "built from the file's mean kernel")
    sd = layout.adapt(sd, model, spec, pos_embed_antialias=pos_embed_antialias,
                      pos_embed_interpolation=pos_embed_interpolation,
                      log=lambda msg: log.info("%s: %s.", path, msg))
    variables = jax.tree.map(jnp.asarray, keymaps.torch_to_flax(sd, spec))
    return model, variables


def _check_variables(model: Any, variables: Any) -> dict:
    """Torch spec of `model`; raises if `variables` do not have exactly its names and shapes."""
    want = keymaps.torch_spec(abstract_variables(model))
    try:
        have = keymaps.torch_spec(variables)
    except ValueError as e:
        raise StateDictMismatchError(f"variables do not belong to {model.arch}: {e}") from None
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    shapes = [f"{k}: variables {have[k][3]} vs model {want[k][3]}"
              for k in sorted(set(want) & set(have)) if have[k][3] != want[k][3]]
    if missing or unexpected or shapes:
        raise StateDictMismatchError(_mismatch_message(
            f"variables do not match {model.arch} (in_channels={model.in_channels}); pass the "
            f"backbone's variables ({{'params': ..., 'batch_stats': ...}}), not the whole "
            f"train state.", missing, unexpected, shapes))
    return want


def export_torch(model: Any, variables: Any, out_path: str | os.PathLike,
                 format: str = "timm", *, band_order: list[str] | None = None,
                 normalization: Any = None, img_size: int | None = None) -> dict:
    """Writes the backbone as a PyTorch state dict plus a JSON sidecar.

    Args:
      model, variables: a backbone from `build_backbone` / `import_torch` and its
        `{'params', 'batch_stats'}` variables.
      out_path: `.safetensors` (or `.pth`, which needs torch).
      format: 'timm' (timm names; ResNet names equal torchvision's), 'torchvision'
        (ResNet only, standard widths; load into `torchvision.models.resnet*`) or 'dinov2'
        (ViT only, DINOv2-native names, i.e. timm's plus a zero `mask_token`).
      band_order: input band names, recorded in the sidecar (length must be in_channels).
      normalization: JSON-serialisable description of the input normalisation (sidecar).
      img_size: training image size for the sidecar; defaults to the ViT's img_size
        (None for a ResNet unless given).

    Returns the sidecar dict, also written to `<out_path>.json` (`x.safetensors.json`):
    `format, timm_name, timm_kwargs, in_chans, img_size, band_order, normalization,
    num_features` (+ `torchvision_name` / `dinov2_hub`), such that
    `timm.create_model(timm_name, num_classes=0, **timm_kwargs)` loads the 'timm' file with
    strict=True.
    """
    if format not in FORMATS:
        raise ValueError(f"export format {format!r}; expected one of {FORMATS}.")
    layout = models.spec_of(model).layout
    layout.check_export(model, format)
    if band_order is not None and len(band_order) != model.in_channels:
        raise ValueError(f"band_order has {len(band_order)} names but the model has "
                         f"{model.in_channels} input channels.")
    _check_variables(model, variables)

    state_dict = keymaps.flax_to_torch(variables)
    if img_size is None and getattr(model, "img_size", None):
        img_size = int(model.img_size)
    sidecar: dict[str, Any] = {
        "format": format,
        "timm_name": model.arch,
        "timm_kwargs": model.timm_kwargs(),
        "in_chans": int(model.in_channels),
        "img_size": img_size,
        "band_order": list(band_order) if band_order is not None else None,
        "normalization": normalization,
        "num_features": int(model.num_features),
    }
    layout.export_extras(model, format, state_dict, sidecar)
    # Both files or neither: the sidecar is renamed into place only after the weights were.
    with staged(f"{out_path}.json", "the sidecar") as tmp:
        with open(tmp, "w") as f:
            f.write(json.dumps(sidecar, indent=2) + "\n")
        write_state_dict(state_dict, out_path)
    return sidecar


@functools.partial(jax.jit, static_argnums=0)
def _eval_apply(model: Any, variables: dict, x: jax.Array) -> jax.Array:
    return model.apply(variables, x, train=False).astype(jnp.float32)


def backbone_features(model: Any, variables: Any, x: Any) -> jax.Array:
    """Eval-mode features of NHWC float32 `x`: (B, num_features) float32.

    ResNet: global-average-pooled; ViT: CLS token after the final norm -- what timm's model
    returns with num_classes=0 on the NCHW transpose of `x`.
    """
    x = jnp.asarray(x, jnp.float32)
    used = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
    return _eval_apply(model, used, x)


__all__ = ["FORMATS", "POS_EMBED_INTERPOLATIONS", "StateDictMismatchError",
           "abstract_variables", "backbone_features", "dinov2_interpolate_pos_embed",
           "export_torch", "import_torch", "read_state_dict", "resample_pos_embed",
           "write_state_dict"]
