"""Config defaults shared by the configs and the library, as plain `ml_collections`.

This module imports nothing but ml_collections, so `configs/*.py` can use it without
loading JAX or the training stack (`python -c "import configs.softcon"` stays light).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def data() -> ml_collections.ConfigDict:
    """`config.data`: defaults of `softcon_jax.data.build_dataset`. `augment` fields left
    None take the reference values of the chosen `views` (the method's own defaults).

    None-valued fields are typed placeholders, so every one of them can be set from the
    command line (``--config.data.augment.crop_scale='(0.3, 1.0)'``).
    """
    ph = config_dict.placeholder
    return ml_collections.ConfigDict({
        "path": "",                  # directory with metadata.json + shards
        "views": ph(str),            # view builder (registry); None = the method's own
        "image_size": 224,           # output views are image_size x image_size
        "allow_upsample": False,     # True: allow image_size above the stored size
        "in_channels": 13,           # must equal the number of (selected) bands
        # Where the augmentations run: 'device' (the host only reads, decodes and draws the
        # random parameters; the train step crops, jitters, blurs and normalises) or
        # 'host' (NumPy in the input pipeline). Same views either way; see BENCHMARKS.md.
        "augment_on": "host",
        "dtype": ph(str),            # views' dtype; None = float32, or in the trainer the
                                     # model's compute dtype (config.model.dtype)
        "bands": ph(tuple),          # None = all bands of the metadata, or band names
        "normalization": "softcon",  # 'softcon' | 'zscore' | 'seco_quantile'
        "stats": "s2c",              # 's2c' | 's2a' | 's1' | 'seco' | 'dataset' (measured)
        "stats_sample": 64,          # records read to measure stats='dataset'
        # True: the references' uint8 step (floor((x - lo) / (hi - lo) * 255) / 255) before
        # the augmentations, as SSL4EO-S12 / SoftCon's normalize() and SeCo's reader; for
        # evaluating released weights as their authors fed them. False (default): floats,
        # at most 1/255 apart, no quantisation noise in training.
        "quantize_uint8": False,
        # 'distinct' | 'independent' (with replacement); None = the method's default:
        # softcon 'distinct' (labels are per season), seco 'independent' (the reference).
        "season_sampling": ph(str),
        "num_workers": 0,            # worker processes (grain mp_prefetch); 0 = none
        "worker_buffer_size": 2,     # batches buffered per worker
        "read_threads": 2,           # threads per process computing batches
        "prefetch_buffer_size": 2,   # batches prefetched by those threads
        # The built-in synthetic dataset, written to `path` first when enabled (quickstart,
        # runlocal configs); only into an empty directory or one holding the same dataset.
        "synthetic": synthetic(enabled=False),
        "augment": {
            "crop_scale": ph(tuple),      # softcon (0.08, 1.0), seco (0.2, 1.0)
            "crop_ratio": ph(tuple),      # (3/4, 4/3)
            "hflip_prob": ph(float),      # 0.5
            "jitter_prob": ph(float),     # 0.8
            "brightness": ph(float),      # 0.4
            "contrast": ph(float),        # 0.4
            "saturation": ph(float),      # softcon 0, seco 0.4
            "hue": ph(float),             # softcon 0, seco 0.1 (RGB input only)
            "per_band_jitter": ph(bool),  # False: one factor for all bands (both
                                          # references); True: independent per band
            "jitter_order": ph(str),      # softcon 'fixed' (brightness then contrast, as
                                          # SSL4EO-S12); seco 'random' (ColorJitter)
            "grayscale_prob": ph(float),  # 0.2
            "blur_prob": ph(tuple),       # softcon (1.0, 0.1) per view; seco (0.5,)
            "blur_sigma": ph(tuple),      # (0.1, 2.0)
            "rgb": ph(bool),              # None = auto: bands are exactly B4, B3, B2
            "luma_weights": ph(tuple),    # RGB grey / contrast / saturation weights,
                                          # (0.299, 0.587, 0.114)
            "augment_before_crop": ph(bool),  # softcon False (crop first); seco True
        },
    })


def online_eval() -> ml_collections.ConfigDict:
    """Defaults of `config.eval` (the online monitor)."""
    return ml_collections.ConfigDict({
        "every_steps": 500,        # 0 = off
        "data_path": "",           # held-out ArrayRecord dataset (metadata.json); '' = off
        "num_train": 1024,         # bank (labelled locations)
        "num_val": 256,            # queries (the next labelled locations)
        "knn_k": 20,
        "knn_temperature": 0.07,
        "batch_size": 256,         # forward batch inside the jitted call (global)
        "which": "teacher",        # backbone to monitor
        # Optional: write a data_prep.synthetic dataset to data_path first (quickstart).
        "synthetic": synthetic(enabled=False),
    })


def synthetic(*, enabled: bool = True, modality: str = "s2c", num_locations: int = 64,
              num_shards: int = 2, image_size: int = 20, timesteps: int = 4,
              seed: int = 0) -> ml_collections.ConfigDict:
    """`config.data.synthetic`: `enabled` plus `softcon_jax.data.synthetic.write_dataset` arguments.

    modality: 's2c' (13 bands, uint16), 's2a' (12, uint16), 's1' (2, float32 dB) or 'seco'
    (12 bands, uint8 reflectance x 255, as SeCo's GeoTIFFs).
    """
    return ml_collections.ConfigDict(dict(
        enabled=enabled, modality=modality, num_locations=num_locations,
        num_shards=num_shards, image_size=image_size, timesteps=timesteps, seed=seed))
