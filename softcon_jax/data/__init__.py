"""Input data: record schema, Grain pipeline, augmentations, normalisation.

``build_dataset(data_config, *, global_batch_size, seed, process_index=0,
process_count=1)`` returns an infinite ``grain.IterDataset`` of host-local
batches; ``default_config()`` gives the ``data_config`` defaults.
``DevicePrefetcher`` places them on the devices from a background thread.
"""

from softcon_jax.data import augment, normalize, records
from softcon_jax.data.pipeline import (
    available_views,
    build_dataset,
    build_views_transform,
    default_config,
    register_views,
    view_dtype,
)
from softcon_jax.data.prefetch import DevicePrefetcher
from softcon_jax.data.source import Dataset, load_metadata, open_dataset

__all__ = [
    "augment", "normalize", "records", "available_views", "build_dataset",
    "build_views_transform", "default_config", "load_metadata", "register_views",
    "view_dtype", "DevicePrefetcher", "Dataset", "open_dataset",
]
