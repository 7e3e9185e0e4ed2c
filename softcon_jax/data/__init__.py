"""Input data: record schema, Grain pipeline, view builders, augmentations, normalisation.

``build_dataset(data_config, *, global_batch_size, seed, process_index=0,
process_count=1, views=None)`` returns an infinite ``grain.IterDataset`` of host-local
batches; ``default_config()`` gives the ``data_config`` defaults. ``make_normalizer`` is
the pretraining normaliser (training, online monitor and evaluation use it alike).
With ``data_config.augment_on='device'`` the pipeline yields raw images and the random
draws, and the jittable ``device_views(data_config, batch)`` (``build_device_views``, which
the trainer applies inside its train step) makes the views on the accelerator.
``DevicePrefetcher`` places batches on the devices from a background thread.
"""

from softcon_jax.data import augment, normalize, records, views
from softcon_jax.data.pipeline import (
    build_dataset,
    build_device_views,
    device_views,
    build_views_transform,
    default_config,
    make_normalizer,
)
from softcon_jax.data.prefetch import DevicePrefetcher
from softcon_jax.data.source import Dataset, load_metadata, open_dataset
from softcon_jax.data.views import (
    VIEWS,
    Views,
    available_views,
    input_dtype,
    register_views,
    view_dtype,
)

__all__ = [
    "augment", "normalize", "records", "views", "available_views", "build_dataset",
    "build_views_transform", "build_device_views", "device_views",
    "default_config", "input_dtype", "load_metadata",
    "make_normalizer", "register_views", "view_dtype", "VIEWS", "Views",
    "DevicePrefetcher", "Dataset", "open_dataset",
]
