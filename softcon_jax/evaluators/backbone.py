"""A frozen backbone as the evaluators see it: weights, a feature function, its input spec.

The evaluators never load anything: `softcon_jax.pretrained` builds a `Backbone` from a
training workdir or an exported file; tests build one directly.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from softcon_jax.cli import UserValueError
from softcon_jax.data import normalize

SECO_INPUT_SCALE = 255.0 / 10000.0

# Bands whose absence in a dataset is filled with zeros (after normalisation): B10 (cirrus)
# is not in L2A products such as BigEarthNet; SoftCon feeds such data to its 13-band models
# with a zero B10 band.
ZERO_FILL_BANDS = ("B10",)


def canonical_band(name: str) -> str:
    """'B01' -> 'B1', 'B08A'/'b8a' -> 'B8A'; other names (VV, VH) unchanged."""
    m = re.fullmatch(r"[Bb]0*(\d+)([Aa]?)", name)
    return f"B{m.group(1)}{m.group(2).upper()}" if m else name


@dataclasses.dataclass
class Backbone:
    """A frozen backbone and what its input must look like."""

    model: Any
    variables: dict
    band_order: list[str]          # canonical band names, model channel order
    normalizer: normalize.Normalizer
    normalization: dict            # JSON description (name, stats) for the results file
    img_size: int
    step: int
    source: str
    # Multiplies the datasets' raw values (reflectance x 10000) before normalisation:
    # 1 for SSL4EO-S12-style pretraining data (uint16, x 10000), 255 / 10000 for SeCo's
    # uint8 data (reflectance x 255).
    input_scale: float = 1.0
    # (variables, x (B, S, S, C) float32) -> (B, D) float32 eval-mode features; the loaders
    # set `interop.backbone_features` bound to `model`.
    features_fn: Callable[[dict, Any], Any] | None = None


def model_input(bands: dict[str, np.ndarray], backbone: Backbone,
                dataset: str) -> np.ndarray:
    """Dataset bands (canonical name -> (B, H, W) raw values) -> (B, H, W, C) model input.

    Bands are stacked in the model's order, multiplied by `backbone.input_scale`, normalised
    with the pretraining normaliser, and bands in `ZERO_FILL_BANDS` that the dataset lacks
    are then set to 0.
    """
    missing = [b for b in backbone.band_order if b not in bands]
    bad = [b for b in missing if b not in ZERO_FILL_BANDS]
    if bad:
        raise UserValueError(f"{dataset} has no band(s) {bad} that the model needs (model bands "
                         f"{backbone.band_order}, dataset bands {sorted(bands)}).")
    shape = next(iter(bands.values())).shape
    x = np.stack([bands[b] if b in bands else np.zeros(shape, np.float32)
                  for b in backbone.band_order], axis=-1)
    if backbone.input_scale != 1.0:
        x *= np.float32(backbone.input_scale)
    x = backbone.normalizer(x)
    for b in missing:
        x[..., backbone.band_order.index(b)] = 0.0
    return x
