"""Grain input pipeline: ArrayRecord shards -> host-local batches of views.

Order of operations (all index-based, so deterministic and checkpointable)::

    open_dataset(path).source                one item per location; its season
                                             records are read when a view uses them
    .shuffle(seed)                           global, reshuffled every epoch
    [process_index::process_count]           host sharding: disjoint, covering
    .repeat()                                infinite
    .random_map(views, seed)                 per-sample Generator(seed, index)
    .batch(global_batch // process_count)    host-local numpy batch
    .to_iter_dataset(ReadOptions)            threads
    .mp_prefetch(num_workers)                optional worker processes

With ``data_config.augment_on='device'`` the random_map yields the raw season images and
the packed random draws instead of the views, and ``build_device_views`` gives the jittable
function (run inside the train step) that turns such a batch into the views.

The view builders are a registry (`softcon_jax.data.views.VIEWS`); each method defines its
own (`softcon_jax.methods.softcon.SoftConViews`, `...seco.SeCoViews`).
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

import grain
import numpy as np

from softcon_jax import defaults
from softcon_jax.data import normalize, records
from softcon_jax.data.views import VIEWS, Views, available_views, resolve_augment, view_dtype
from softcon_jax.data.source import open_dataset
from softcon_jax.cli import UserValueError

default_config = defaults.data  # the data_config defaults (pure ml_collections)

def _select_bands(cfg: Any, meta: dict, meta_path: str) -> tuple[list[str], np.ndarray | None]:
    bands = list(meta["bands"])
    wanted = cfg.get("bands")
    if wanted:
        wanted = [wanted] if isinstance(wanted, str) else list(wanted)
        missing = [b for b in wanted if b not in bands]
        if missing:
            raise UserValueError(
                f"data_config.bands: {missing} not in the bands {bands} of {meta_path}")
        index = np.array([bands.index(b) for b in wanted], np.intp)
        bands = wanted
    else:
        index = None
    if len(bands) != cfg.in_channels:
        raise UserValueError(
            f"data_config.in_channels={cfg.in_channels} but the dataset has {len(bands)} "
            f"bands {bands} (from {meta_path}{' and data_config.bands' if wanted else ''})")
    return bands, index


def _seed32(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _measured_stats(data_config: Any, meta: dict, bands: list[str],
                    index: np.ndarray | None) -> dict:
    """stats='dataset': per-band statistics of up to ``stats_sample`` records."""
    source = open_dataset(data_config.path).source
    n = min(len(source), int(data_config.get("stats_sample", 64)))
    picks = np.linspace(0, len(source) - 1, n).round().astype(int)  # spread, deterministic
    images = []
    for i in picks:
        img = records.decode(source[int(i)])["image"]
        images.append(img if index is None else img[:, index])
    return normalize.dataset_stats(images, bands)


def make_normalizer(data_config: Any, meta: dict, meta_path: str) -> normalize.Normalizer:
    """The pretraining normaliser of `data_config` (band selection, statistics, uint8 step).

    One function for training, the online monitor and evaluation, so they cannot differ.
    """
    bands, index = _select_bands(data_config, meta, meta_path)
    stats = data_config.stats
    normalize.check_preset_dtype(stats, meta.get("dtype"), meta_path)
    if stats == "dataset":
        stats = _measured_stats(data_config, meta, bands, index)
    return normalize.make_normalizer(data_config.normalization, stats, bands,
                                     quantize=bool(data_config.get("quantize_uint8", False)))


def build_views_transform(data_config: Any, meta: dict, meta_path: str,
                          dtype: str | None = None, views: str | type | None = None,
                          augment_on: str | None = None) -> Views:
    """The per-sample RandomMap (decode + views) described by ``data_config``.

    ``views`` (default ``data_config.views``) is a registered view builder's name or a
    `Views` subclass; the trainer passes its method's (`method.views`). Views are produced
    in ``dtype`` (default ``data_config.dtype``, else float32): the augmentations run in
    float32, the cast is their last pass.
    """
    name = views or data_config.get("views")
    if not name:
        raise UserValueError("data_config.views is not set: name the view builder (one of "
                             f"{available_views()}); the trainer uses config.method.")
    cls = VIEWS.get(name) if isinstance(name, str) else name
    stored = meta.get("image_size")
    if stored and int(data_config.image_size) > int(stored) and not data_config.get(
            "allow_upsample", False):
        raise UserValueError(
            f"config.data.image_size={data_config.image_size} is larger than the stored "
            f"images ({stored} px, {meta_path}): every view would be upsampled. Lower "
            "config.data.image_size, or set config.data.allow_upsample=True.")
    bands, index = _select_bands(data_config, meta, meta_path)
    norm = make_normalizer(data_config, meta, meta_path)
    params = resolve_augment(cls, data_config.get("augment"), bands)
    return cls(size=int(data_config.image_size), band_index=index,
                         normalizer=norm, params=params,
                         dtype=view_dtype(dtype or data_config.get("dtype")),
                         season_sampling=data_config.get("season_sampling"),
                         augment_on=augment_on or data_config.get("augment_on") or "host")


def build_device_views(data_config: Any, dtype: str | None = None,
                       views: str | type | None = None):
    """The jittable device half of ``augment_on='device'``: ``batch -> batch`` (the views'
    `Views.device_views`), or None when ``data_config.augment_on`` is 'host'.

    Same arguments as `build_dataset` (``dtype``, ``views``), so the two halves match.
    """
    if (data_config.get("augment_on") or "host") == "host":
        return None
    dataset = open_dataset(data_config.path)
    return build_views_transform(data_config, dataset.meta, dataset.meta_path, dtype,
                                 views).device_views


def device_views(data_config: Any, batch: dict, *, dtype: str | None = None,
                 views: str | type | None = None) -> dict:
    """Jittable: a batch of the ``augment_on='device'`` pipeline -> the batch the 'host'
    pipeline yields (same keys, shapes and dtypes; equal to float32 rounding)."""
    dataset = open_dataset(data_config.path)
    return build_views_transform(data_config, dataset.meta, dataset.meta_path, dtype, views,
                                 augment_on="device").device_views(batch)



# glibc hands every freed block above its mmap threshold back to the OS, so each record-sized
# buffer (7.2 MB for 4 seasons x 13 bands x 264 px: read, decoded views, batched) would be a
# fresh mapping whose pages fault in again on first touch; on the 2-core benchmark machine
# that made reading a record 3x slower. Keeping such blocks in the heap for reuse (what
# tcmalloc and jemalloc do anyway) costs at most the trim threshold of idle memory.
_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit hosts
_TRIM_THRESHOLD = 512 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def reuse_large_buffers() -> None:
    """Keeps freed record-sized buffers in this process's heap (glibc; a no-op elsewhere),
    and in Grain worker processes started later (through glibc's environment variables)."""
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(_MMAP_THRESHOLD))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(_TRIM_THRESHOLD))
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)


def build_dataset(data_config: Any, *, global_batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  dtype: str | None = None,
                  views: str | type | None = None) -> grain.IterDataset:
    """Infinite ``grain.IterDataset`` of host-local batches (dicts of numpy).

    Image views are ``dtype`` (float32, bfloat16, float16; default ``data_config.dtype``,
    else float32); labels are float32.

    Each host gets ``global_batch_size // process_count`` samples per batch from
    its slice ``[process_index::process_count]`` of the globally shuffled data.
    ``iter(ds)`` supports ``get_state()`` / ``set_state()`` and
    ``grain.checkpoint.CheckpointSave``. With ``num_workers > 0`` the caller
    must run under ``if __name__ == '__main__':`` (worker processes re-import
    the main module); absl flags are marked parsed here if nobody parsed them.
    """
    if global_batch_size % process_count:
        raise UserValueError(f"global_batch_size={global_batch_size} is not divisible by "
                             f"process_count={process_count}")
    if not 0 <= process_index < process_count:
        raise UserValueError(f"process_index={process_index} not in [0, {process_count})")
    reuse_large_buffers()
    dataset = open_dataset(data_config.path)
    meta, meta_path, source = dataset.meta, dataset.meta_path, dataset.source
    transform = build_views_transform(data_config, meta, meta_path, dtype, views)
    per_host = global_batch_size // process_count
    if len(source) // process_count < per_host:  # every batch would repeat locations
        raise UserValueError(
            f"config.global_batch_size={global_batch_size} ({per_host} per process, "
            f"{process_count} process(es)) is larger than the {len(source)} locations of "
            f"{meta_path} ({len(source) // process_count} per process): every batch would "
            f"repeat locations (false negatives in the contrastive loss). Lower "
            f"config.global_batch_size, or use a larger dataset.")

    ds = grain.MapDataset.source(source)
    ds = ds.shuffle(seed=_seed32(seed, 0))  # same on every host: slices stay disjoint
    ds = ds[process_index::process_count]
    ds = ds.repeat()  # reseeds the shuffle and the augmentations every epoch
    ds = ds.random_map(transform, seed=_seed32(seed, 1, process_index))
    ds = ds.batch(per_host, drop_remainder=True)
    it = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=int(data_config.get("read_threads", 2)),
        prefetch_buffer_size=int(data_config.get("prefetch_buffer_size", 2))))
    num_workers = int(data_config.get("num_workers", 0))
    if num_workers > 0:
        _ensure_absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers,
            per_worker_buffer_size=int(data_config.get("worker_buffer_size", 2))),
            worker_init_fn=functools.partial(exit_with_parent, parent=os.getpid()))
    return it


def exit_with_parent(worker_index: int = 0, worker_count: int = 1, *, parent: int,
                     poll_s: float = 1.0) -> None:
    """Grain worker start-up: the worker exits within `poll_s` once `parent` (the trainer)
    is gone, also after `kill -9`, which runs no clean-up. A daemon thread watches the
    parent pid: an orphan is re-parented, so its parent pid changes (a worker whose parent
    died while it was still starting exits at once)."""
    import threading

    def watch():
        while os.getppid() == parent:
            threading.Event().wait(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _ensure_absl_flags_parsed() -> None:
    # grain's worker processes read absl flags; outside absl.app.run they are unparsed.
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()

