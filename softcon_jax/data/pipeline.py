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

# Reference augmentation defaults per method.
_DEFAULT_AUGMENT = {
    # MoCo-v3 template used by SoftCon (zhu-xlab/SSL4EO-S12 pretrain_moco_v3_s2c.py): the
    # crop first; RandomBrightness(0.4) then RandomContrast(0.4) (one factor for all bands,
    # contrast around each band's mean) p=0.8; ToGray (band mean) p=0.2; blur p=1.0 for
    # view 1, 0.1 for view 2; flip.
    "softcon": augment.AugmentParams(crop_scale=(0.08, 1.0), blur_prob=(1.0, 0.1),
                                     per_band_jitter=False, jitter_order="fixed"),
    # SeCo (ServiceNow/seasonal-contrast datasets/seco_dataset.py SeasonalContrastMultiAug):
    # `augment` = ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, RandomGrayscale p=0.2, blur p=0.5,
    # flip, on the whole image in [0, 1], on k0 and k2 only; then RandomResizedCrop(224,
    # scale 0.2-1) on every view, ToTensor and ImageNet normalisation last.
    # (rgb: these are the values for B4, B3, B2 input; other band sets get hue 0.)
    "seco": augment.AugmentParams(crop_scale=(0.2, 1.0), blur_prob=(0.5,), saturation=0.4,
                                  hue=0.1, per_band_jitter=False, augment_before_crop=True,
                                  rgb=True),
}
# How the seasons (timestamps) of one sample are drawn, per method.
SEASON_SAMPLINGS = ("distinct", "independent")
_DEFAULT_SEASONS = {
    # Distinct on purpose: the labels are per season, and two different seasons make the
    # views' soft targets differ; SSL4EO-S12 MoCo-v3 season='augment' is 'independent'.
    "softcon": "distinct",
    # The official SeCo draws t0, t1, t2 = np.random.choice(paths, 3): with replacement.
    "seco": "independent",
}
RGB_BANDS = ("B4", "B3", "B2")


def register_views(name: str) -> Callable[[type], type]:
    """Class decorator adding a view builder to the registry."""
    def deco(cls: type) -> type:
        _VIEWS[name] = cls
        return cls
    return deco


def available_views() -> list[str]:
    """Sorted names of the registered view builders."""
    return sorted(_VIEWS)


def resolve_augment(views: str, overrides: Any,
                    bands: list[str] | None = None) -> augment.AugmentParams:
    """The method's reference defaults with the non-None ``overrides`` applied.

    The colour model: RGB (torchvision's colour ops) when ``augment.rgb`` is True, or
    when it is None and ``bands`` are exactly B4, B3, B2 (without ``bands``: the method's
    default); band-set ops otherwise, where the method's hue does not apply (0 unless
    ``augment.hue`` is set, which then fails naming the key).
    """
    base = _DEFAULT_AUGMENT.get(views, augment.AugmentParams())
    values = {}
    for key, value in dict(overrides or {}).items():
        if value is None:
            continue
        if not hasattr(base, key):
            raise ValueError(f"data_config.augment.{key} is not an augmentation option "
                             f"(known: {sorted(augment.AugmentParams.__dataclass_fields__)})")
        if key in ("crop_scale", "crop_ratio", "blur_sigma", "blur_prob", "luma_weights"):
            value = tuple(float(v) for v in np.atleast_1d(value))
        values[key] = value
    rgb = values.pop("rgb", None)
    if rgb is None:
        rgb = base.rgb if bands is None else tuple(bands) == RGB_BANDS
    elif rgb and bands is not None and len(bands) != 3:
        raise ValueError(f"data_config.augment.rgb=True needs 3 bands (R, G, B), got "
                         f"{len(bands)}: {list(bands)}")
    if not rgb and "hue" not in values:
        values["hue"] = 0.0
    return augment.AugmentParams(**{**base.__dict__, **values, "rgb": bool(rgb)})


class _ViewsBase(grain.transforms.RandomMap):
    """Decodes a record and builds views; subclasses define ``views``."""

    default_season_sampling = "distinct"

    def __init__(self, *, size: int, band_index: np.ndarray | None,
                 normalizer: normalize.Normalizer, params: augment.AugmentParams,
                 dtype: np.dtype = np.dtype(np.float32), season_sampling: str | None = None):
        self.size = size
        self.dtype = dtype
        self.band_index = band_index
        self.normalizer = normalizer
        self.params = params
        self.season_sampling = season_sampling or self.default_season_sampling
        if self.season_sampling not in SEASON_SAMPLINGS:
            raise ValueError(f"data_config.season_sampling={self.season_sampling!r}: "
                             f"expected one of {SEASON_SAMPLINGS}")

    def _seasons(self, rng: np.random.Generator, t: int, k: int) -> list[int]:
        """``k`` season indices out of ``t``: distinct (when ``t >= k``) or independent."""
        if self.season_sampling == "independent":
            return [int(i) for i in rng.integers(0, t, size=k)]
        return [int(i) for i in rng.choice(t, size=k, replace=t < k)]

    def _image(self, example: dict, t: int) -> np.ndarray:
        img = example["image"][t]
        return img if self.band_index is None else img[self.band_index]

    def _view(self, img: np.ndarray, rng: np.random.Generator, *, crop_only: bool = False,
              blur_prob: float = 0.0, bounds: np.ndarray | None = None,
              trace: dict | None = None) -> np.ndarray:
        return augment.make_view(img, rng, size=self.size, normalizer=self.normalizer,
                                 params=self.params, crop_only=crop_only,
                                 blur_prob=blur_prob, quantile_bounds=bounds,
                                 dtype=self.dtype, trace=trace)

    def _blur(self, i: int) -> float:
        return self.params.blur_prob[i % len(self.params.blur_prob)]

    def random_map(self, element: bytes, rng: np.random.Generator) -> dict:
        return self.views(records.decode(element), rng)

    def views(self, example: dict, rng: np.random.Generator) -> dict:
        raise NotImplementedError


@register_views("softcon")
class SoftConViews(_ViewsBase):
    """Two views from two random seasons, each with its season's labels.

    The seasons are distinct by default (``season_sampling='distinct'``), or drawn
    independently (``'independent'``, as SSL4EO-S12 MoCo-v3 ``season='augment'``).
    Keys: ``view1``, ``view2`` (S, S, C) in the pipeline's dtype; ``labels1``, ``labels2`` (9,)
    float32 multi-hot (all zeros for an unlabelled season).
    """

    default_season_sampling = _DEFAULT_SEASONS["softcon"]

    def views(self, example: dict, rng: np.random.Generator) -> dict:
        t = example["image"].shape[0]
        s1, s2 = self._seasons(rng, t, 2)
        out = {}
        for i, s in enumerate((s1, s2)):
            img = self._image(example, s)
            out[f"view{i + 1}"] = self._view(img, rng, blur_prob=self._blur(i),
                                             bounds=self.normalizer.quantile_bounds(img))
            out[f"labels{i + 1}"] = example["labels"][s].astype(np.float32)
        return out


@register_views("seco")
class SeCoViews(_ViewsBase):
    """SeCo: t0, t1, t2 random timestamps; q = crop(t0), k0 = aug(t1), k1 = crop(t2),
    k2 = aug(t0). Keys ``q, k0, k1, k2`` (S, S, C).

    The timestamps are drawn with replacement by default (``season_sampling=
    'independent'``: the official ``np.random.choice(paths, 3)``, so they coincide about
    once in T for T timestamps), or distinct (``'distinct'``)."""

    default_season_sampling = _DEFAULT_SEASONS["seco"]

    def views(self, example: dict, rng: np.random.Generator) -> dict:
        t = example["image"].shape[0]
        t0, t1, t2 = self._seasons(rng, t, 3)
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
    norm = normalize.make_normalizer(data_config.normalization, stats, bands,
                                     quantize=bool(data_config.get("quantize_uint8", False)))
    params = resolve_augment(views, data_config.get("augment"), bands)
    return _VIEWS[views](size=int(data_config.image_size), band_index=index,
                         normalizer=norm, params=params,
                         dtype=view_dtype(dtype or data_config.get("dtype")),
                         season_sampling=data_config.get("season_sampling"))



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

