"""Grain input pipeline: ArrayRecord shards -> host-local batches of views.

Order of operations (all index-based, so deterministic and checkpointable)::

    ArrayRecordDataSource(shards)            one record per location
    .shuffle(seed)                           global, reshuffled every epoch
    [process_index::process_count]           host sharding: disjoint, covering
    .repeat()                                infinite
    .random_map(views, seed)                 per-sample Generator(seed, index)
    .batch(global_batch // process_count)    host-local numpy batch
    .to_iter_dataset(ReadOptions)            threads
    .mp_prefetch(num_workers)                optional worker processes

The view builders are a registry (``register_views``): ``softcon`` and ``seco``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from softcon_jax import defaults
from softcon_jax.data import augment, normalize, records
from softcon_jax.data.source import open_dataset

_VIEWS: dict[str, type] = {}
default_config = defaults.data  # the data_config defaults (pure ml_collections)

# Reference augmentation defaults per method (REFERENCE §1, §2).
_DEFAULT_AUGMENT = {
    # MoCo-v3 template used by SoftCon: blur p=1.0 for view 1, 0.1 for view 2.
    "softcon": augment.AugmentParams(crop_scale=(0.08, 1.0), blur_prob=(1.0, 0.1)),
    # SeCo: RandomResizedCrop(scale 0.2-1) on every view; artificial augment
    # (jitter 0.8, grayscale 0.2, blur 0.5, flip) on k0 and k2 only.
    "seco": augment.AugmentParams(crop_scale=(0.2, 1.0), blur_prob=(0.5,)),
}


def register_views(name: str) -> Callable[[type], type]:
    """Class decorator adding a view builder to the registry."""
    def deco(cls: type) -> type:
        _VIEWS[name] = cls
        return cls
    return deco


def available_views() -> list[str]:
    """Sorted names of the registered view builders."""
    return sorted(_VIEWS)


def resolve_augment(views: str, overrides: Any) -> augment.AugmentParams:
    """The method's reference defaults with the non-None ``overrides`` applied."""
    base = _DEFAULT_AUGMENT.get(views, augment.AugmentParams())
    values = {}
    for key, value in dict(overrides or {}).items():
        if value is None:
            continue
        if not hasattr(base, key):
            raise ValueError(f"data_config.augment.{key} is not an augmentation option "
                             f"(known: {sorted(augment.AugmentParams.__dataclass_fields__)})")
        if key in ("crop_scale", "crop_ratio", "blur_sigma", "blur_prob"):
            value = tuple(float(v) for v in np.atleast_1d(value))
        values[key] = value
    return augment.AugmentParams(**{**base.__dict__, **values})


class _ViewsBase(grain.transforms.RandomMap):
    """Decodes a record and builds views; subclasses define ``views``."""

    def __init__(self, *, size: int, band_index: np.ndarray | None,
                 normalizer: normalize.Normalizer, params: augment.AugmentParams,
                 dtype: np.dtype = np.dtype(np.float32)):
        self.size = size
        self.dtype = dtype
        self.band_index = band_index
        self.normalizer = normalizer
        self.params = params

    def _image(self, example: dict, t: int) -> np.ndarray:
        img = example["image"][t]
        return img if self.band_index is None else img[self.band_index]

    def _view(self, img: np.ndarray, rng: np.random.Generator, *, crop_only: bool = False,
              blur_prob: float = 0.0, bounds: np.ndarray | None = None) -> np.ndarray:
        return augment.make_view(img, rng, size=self.size, normalizer=self.normalizer,
                                 params=self.params, crop_only=crop_only,
                                 blur_prob=blur_prob, quantile_bounds=bounds,
                                 dtype=self.dtype)

    def _blur(self, i: int) -> float:
        return self.params.blur_prob[i % len(self.params.blur_prob)]

    def random_map(self, element: bytes, rng: np.random.Generator) -> dict:
        return self.views(records.decode(element), rng)

    def views(self, example: dict, rng: np.random.Generator) -> dict:
        raise NotImplementedError


@register_views("softcon")
class SoftConViews(_ViewsBase):
    """Two views from two distinct random seasons, each with its season's labels.

    Keys: ``view1``, ``view2`` (S, S, C) in the pipeline's dtype; ``labels1``, ``labels2`` (9,)
    float32 multi-hot (all zeros for an unlabelled season).
    """

    def views(self, example: dict, rng: np.random.Generator) -> dict:
        t = example["image"].shape[0]
        s1, s2 = rng.choice(t, size=2, replace=t < 2)
        out = {}
        for i, s in enumerate((s1, s2)):
            img = self._image(example, s)
            out[f"view{i + 1}"] = self._view(img, rng, blur_prob=self._blur(i),
                                             bounds=self.normalizer.quantile_bounds(img))
            out[f"labels{i + 1}"] = example["labels"][s].astype(np.float32)
        return out


@register_views("seco")
class SeCoViews(_ViewsBase):
    """SeCo: t0, t1, t2 distinct random timestamps; q = crop(t0),
    k0 = aug(t1), k1 = crop(t2), k2 = aug(t0). Keys ``q, k0, k1, k2`` (S, S, C)."""

    def views(self, example: dict, rng: np.random.Generator) -> dict:
        t = example["image"].shape[0]
        t0, t1, t2 = rng.choice(t, size=3, replace=t < 3)
        imgs = {k: self._image(example, k) for k in {t0, t1, t2}}
        bounds = {k: self.normalizer.quantile_bounds(v) for k, v in imgs.items()}
        return {
            "q": self._view(imgs[t0], rng, crop_only=True, bounds=bounds[t0]),
            "k0": self._view(imgs[t1], rng, blur_prob=self._blur(0), bounds=bounds[t1]),
            "k1": self._view(imgs[t2], rng, crop_only=True, bounds=bounds[t2]),
            "k2": self._view(imgs[t0], rng, blur_prob=self._blur(1), bounds=bounds[t0]),
        }


def _select_bands(cfg: Any, meta: dict, meta_path: str) -> tuple[list[str], np.ndarray | None]:
    bands = list(meta["bands"])
    wanted = cfg.get("bands")
    if wanted:
        wanted = [wanted] if isinstance(wanted, str) else list(wanted)
        missing = [b for b in wanted if b not in bands]
        if missing:
            raise ValueError(
                f"data_config.bands: {missing} not in the bands {bands} of {meta_path}")
        index = np.array([bands.index(b) for b in wanted], np.intp)
        bands = wanted
    else:
        index = None
    if len(bands) != cfg.in_channels:
        raise ValueError(
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


VIEW_DTYPES = ("float32", "bfloat16", "float16")


def view_dtype(name: str | None, key: str = "data_config.dtype") -> np.dtype:
    """numpy dtype of the views (bfloat16 from ml_dtypes); None means float32."""
    name = name or "float32"
    if name not in VIEW_DTYPES:
        raise ValueError(f"{key}={name!r}: expected one of {VIEW_DTYPES}")
    if name == "bfloat16":
        import ml_dtypes  # a jax dependency
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def build_views_transform(data_config: Any, meta: dict, meta_path: str,
                          dtype: str | None = None) -> _ViewsBase:
    """The per-sample RandomMap (decode + views) described by ``data_config``.

    Views are produced in ``dtype`` (default ``data_config.dtype``, else float32): the
    augmentations run in float32, the cast is their last pass.
    """
    views = data_config.views
    if views not in _VIEWS:
        raise ValueError(f"data_config.views={views!r}: expected one of {available_views()}")
    bands, index = _select_bands(data_config, meta, meta_path)
    stats = data_config.stats
    if stats == "dataset":
        stats = _measured_stats(data_config, meta, bands, index)
    norm = normalize.make_normalizer(data_config.normalization, stats, bands)
    params = resolve_augment(views, data_config.get("augment"))
    return _VIEWS[views](size=int(data_config.image_size), band_index=index,
                         normalizer=norm, params=params,
                         dtype=view_dtype(dtype or data_config.get("dtype")))


def build_dataset(data_config: Any, *, global_batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  dtype: str | None = None) -> grain.IterDataset:
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
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                         f"process_count={process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    dataset = open_dataset(data_config.path)
    meta, meta_path, source = dataset.meta, dataset.meta_path, dataset.source
    transform = build_views_transform(data_config, meta, meta_path, dtype)
    if len(source) < process_count:
        raise ValueError(f"{meta_path}: {len(source)} records for {process_count} processes")
    per_host = global_batch_size // process_count

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
            per_worker_buffer_size=int(data_config.get("worker_buffer_size", 2))))
    return it


def _ensure_absl_flags_parsed() -> None:
    # grain's worker processes read absl flags; outside absl.app.run they are unparsed.
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()

