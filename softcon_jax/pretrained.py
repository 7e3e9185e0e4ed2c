"""Load a frozen backbone for evaluation: from a training workdir or an exported file.

`load_from_workdir` restores the teacher (or student) of a checkpoint through
`softcon_jax.state`; `load_from_weights` imports a `.safetensors` export with its JSON
sidecar. Both return an `evaluators.backbone.Backbone` with its input specification (band
order, normaliser, input scale) exactly as in pretraining, and a feature function.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

from softcon_jax import data as data_lib
from softcon_jax import interop
from softcon_jax.data import normalize
from softcon_jax.evaluators.backbone import SECO_INPUT_SCALE, Backbone, canonical_band
from softcon_jax.state import restore_backbone
from softcon_jax.cli import UserValueError

log = logging.getLogger(__name__)


class SidecarMismatchError(UserValueError):
    """An exported file and its JSON sidecar describe different models."""


def features_fn(model: Any):
    """(variables, x) -> eval-mode features of `model` (jitted, `interop.backbone_features`)."""
    return functools.partial(interop.backbone_features, model)


def _default_bands(in_channels: int, where: str) -> list[str]:
    defaults = {13: normalize.S2C_BANDS, 12: normalize.S2A_BANDS, 2: ["VV", "VH"]}
    if in_channels not in defaults:
        raise UserValueError(f"{where}: no band order recorded and no default for "
                             f"{in_channels} input channels; pass --bands.")
    log.warning("%s: no band order recorded; assuming %s.", where, defaults[in_channels])
    return list(defaults[in_channels])


def _checked_bands(bands: list[str], model: Any, where: str) -> list[str]:
    if len(bands) != model.in_channels:
        raise UserValueError(f"{where}: band order {list(bands)} has {len(bands)} bands but the "
                             f"model has {model.in_channels} input channels.")
    return [canonical_band(b) for b in bands]


def _make_normalizer(name: str | None, stats: Any, bands: list[str], where: str,
                     per_band: dict | None = None, quantize: bool = False
                     ) -> normalize.Normalizer:
    if not name:
        raise UserValueError(f"{where}: no input normalisation recorded; pass --normalization "
                             f"(one of {normalize.METHODS}) and --stats.")
    if isinstance(stats, str) and stats in normalize.STATS:
        return normalize.make_normalizer(name, stats, bands, quantize=quantize)
    if per_band:  # measured statistics recorded in the sidecar
        return normalize.make_normalizer(name, dict(per_band), bands, quantize=quantize)
    raise UserValueError(f"{where}: normalisation stats {stats!r} are not a preset "
                         f"({sorted(normalize.STATS)}) and no per-band table is recorded; "
                         f"pass --stats.")


def _input_scale(stats: Any, data_dtype: str | None) -> float:
    return SECO_INPUT_SCALE if stats == "seco" or data_dtype == "uint8" else 1.0


def load_from_workdir(workdir: str, step: int | None = None, which: str = "teacher", *,
                      normalization: str | None = None, stats: str | None = None,
                      bands: list[str] | None = None, input_scale: float | None = None,
                      quantize_uint8: bool | None = None) -> Backbone:
    """The teacher (or student) backbone of a training checkpoint and its pretraining input.

    `quantize_uint8` (default `config.data.quantize_uint8`): the references' uint8 step
    before /255 (`softcon_jax.data.normalize`).

    Band order: `config.data.bands`, else the training data's metadata.json. Normalisation:
    `config.data.normalization` / `.stats`; `stats='dataset'` re-measures the statistics on
    the training data exactly as the data pipeline did (it must still be readable). Input
    scale: SeCo-style uint8 training data (metadata dtype, or stats='seco') -> 255 / 10000.
    """
    model, variables, config, step = restore_backbone(workdir, step, which)
    d = config.data
    where = f"--workdir {workdir} (config.data)"
    try:
        meta = data_lib.load_metadata(d.path)[0]
    except FileNotFoundError:
        meta = {}
    if bands is None:
        if d.get("bands"):
            bands = [d.bands] if isinstance(d.bands, str) else list(d.bands)
        elif meta.get("bands"):
            bands = list(meta["bands"])
        else:
            bands = _default_bands(int(d.in_channels), where)
    bands = _checked_bands(bands, model, where)
    name = normalization or d.normalization
    stats = stats or d.get("stats")
    if quantize_uint8 is None:
        quantize_uint8 = bool(d.get("quantize_uint8", False))
    if stats == "dataset":
        meta, meta_path = data_lib.load_metadata(d.path)
        d = d.copy_and_resolve_references()
        with d.unlocked():  # checkpoints from before the key existed
            d.quantize_uint8 = bool(quantize_uint8)
        normalizer = data_lib.make_normalizer(d, meta, meta_path)
    else:
        normalizer = _make_normalizer(name, stats, bands, where, quantize=quantize_uint8)
    if input_scale is None:
        input_scale = _input_scale(stats, meta.get("dtype"))
    return Backbone(model, variables, bands, normalizer,
                    {"name": name, "stats": stats}, int(d.image_size), int(step),
                    os.path.abspath(workdir), float(input_scale), features_fn(model))


def _arch_kwargs(timm_kwargs: dict) -> dict:
    """timm keyword arguments (sidecar) -> `build_backbone` overrides."""
    renames = {"layers": "stage_sizes", "channels": "widths"}
    return {renames.get(k, k): v for k, v in timm_kwargs.items()
            if k not in ("in_chans", "img_size")}


def load_from_weights(path: str, *, normalization: str | None = None,
                      stats: str | None = None, bands: list[str] | None = None,
                      img_size: int | None = None, step: int | None = None,
                      input_scale: float | None = None,
                      quantize_uint8: bool | None = None) -> Backbone:
    """A backbone exported by `softcon_jax.export` (or `interop.export_torch`).

    `quantize_uint8` (default: the sidecar's `normalization.quantize_uint8`, else False):
    truncate to uint8 before /255 as the SSL4EO-S12 / SoftCon and SeCo readers do, to
    evaluate released weights on the input their authors fed them.

    Reads `<path>.json` (timm_name, timm_kwargs, in_chans, img_size, band_order,
    normalization) and imports the weights with `interop.import_torch`.
    """
    sidecar_path = f"{path}.json"
    if not os.path.exists(path):
        raise FileNotFoundError(f"--weights {path}: no such file.")
    if not os.path.exists(sidecar_path):
        raise FileNotFoundError(f"--weights {path}: its sidecar {sidecar_path} is missing; "
                                "export with python -m softcon_jax.export, which writes it.")
    meta = json.loads(open(sidecar_path).read())
    for key in ("timm_name", "in_chans"):
        if key not in meta:
            raise UserValueError(f"{sidecar_path}: missing key {key!r}.")
    arch, in_chans = meta["timm_name"], int(meta["in_chans"])
    vit = arch.startswith("vit")
    size = img_size or meta.get("img_size") or 224
    if vit and meta.get("img_size") and img_size and img_size != meta["img_size"]:
        raise UserValueError(f"--img-size {img_size}: {arch} in {path} was built for "
                             f"img_size={meta['img_size']}.")
    where = f"--weights {path} ({sidecar_path})"
    try:  # the file as it is: a first layer of another band count is an error, not re-drawn
        model, variables = interop.import_torch(
            path, arch, in_chans, img_size=int(size), first_layer="error",
            **_arch_kwargs(meta.get("timm_kwargs", {})))
    except interop.StateDictMismatchError as e:
        raise SidecarMismatchError(
            f"--weights {path} does not match its sidecar {sidecar_path} (timm_name={arch}, "
            f"in_chans={in_chans}, timm_kwargs={meta.get('timm_kwargs', {})}): "
            + " ".join(str(e).split())) from None
    bands = _checked_bands(bands or meta.get("band_order") or _default_bands(in_chans, where),
                           model, where)
    norm = meta.get("normalization") or {}
    if isinstance(norm, str):
        norm = {"name": norm}
    name = normalization or norm.get("name")
    stats = stats or norm.get("stats")
    per_band = norm.get("per_band") if not stats or stats == norm.get("stats") else None
    if quantize_uint8 is None:
        quantize_uint8 = bool(norm.get("quantize_uint8", False))
    normalizer = _make_normalizer(name, stats, bands, where, per_band, quantize_uint8)
    if input_scale is None:
        input_scale = meta.get("input_scale") or _input_scale(stats, meta.get("data_dtype"))
    return Backbone(model, variables, bands, normalizer,
                    {"name": name, "stats": stats}, int(size),
                    int(step if step is not None else meta.get("step", 0) or 0),
                    os.path.abspath(path), float(input_scale), features_fn(model))
