"""View builders: one sample's training input, chosen by `config.data.views`.

A method owns its batch contract: its `Views` subclass (in `softcon_jax/methods/`) says
which seasons it reads, which views it makes, its reference augmentation defaults and its
element spec. The trainer uses the method's `views` class unless `config.data.views` names
another registered one. The registry imports `softcon_jax.methods` on its first lookup, so
data-only tools find the built-in views ('softcon', 'seco') by name.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from softcon_jax.data import augment, device_augment, normalize, records
from softcon_jax.registry import Registry
from softcon_jax.cli import UserValueError

VIEWS: Registry[type] = Registry("view builder", "config.data.views",
                                 providers=("softcon_jax.methods",))
# How the seasons (timestamps) of one sample are drawn.
SEASON_SAMPLINGS = ("distinct", "independent")
RGB_BANDS = ("B4", "B3", "B2")
NUM_CLASSES = records.NUM_CLASSES


def register_views(name: str):
    """Class decorator adding a `Views` subclass to the registry under `name`."""
    return VIEWS.register(name)


def available_views() -> list[str]:
    """Sorted names of the registered view builders."""
    return VIEWS.names()


VIEW_DTYPES = ("float32", "bfloat16", "float16")
# Where the augmentations run: 'host' (NumPy, the pipeline yields the views) or 'device'
# (the pipeline yields raw images and the draws, `Views.device_views` makes the views).
AUGMENT_ON = ("host", "device")


def view_dtype(name: str | None, key: str = "data_config.dtype") -> np.dtype:
    """numpy dtype of the views (bfloat16 from ml_dtypes); None means float32."""
    name = name or "float32"
    if name not in VIEW_DTYPES:
        raise UserValueError(f"{key}={name!r}: expected one of {VIEW_DTYPES}")
    if name == "bfloat16":
        import ml_dtypes  # a jax dependency
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def input_dtype(config: Any, key: str = "config.data.dtype") -> np.dtype:
    """The one place that decides the views' dtype: `config.data.dtype`, else the model's
    compute dtype (`config.model.dtype`; the first layer casts to it anyway, and bf16
    halves the bytes to copy), else float32."""
    model = config.get("model") or {}
    return view_dtype(config.data.get("dtype") or model.get("dtype"), key=key)


def resolve_augment(views: str | type, overrides: Any,
                    bands: list[str] | None = None) -> augment.AugmentParams:
    """The method's reference defaults with the non-None ``overrides`` applied.

    The colour model: RGB (torchvision's colour ops) when ``augment.rgb`` is True, or
    when it is None and ``bands`` are exactly B4, B3, B2 (without ``bands``: the method's
    default); band-set ops otherwise, where the method's hue does not apply (0 unless
    ``augment.hue`` is set, which then fails naming the key).
    """
    cls = VIEWS.get(views) if isinstance(views, str) else views
    base = cls.augment_defaults
    values = {}
    for key, value in dict(overrides or {}).items():
        if value is None:
            continue
        if not hasattr(base, key):
            raise UserValueError(f"data_config.augment.{key} is not an augmentation option "
                                 f"(known: {sorted(augment.AugmentParams.__dataclass_fields__)})")
        if key in ("crop_scale", "crop_ratio", "blur_sigma", "blur_prob", "luma_weights"):
            value = tuple(float(v) for v in np.atleast_1d(value))
        values[key] = value
    rgb = values.pop("rgb", None)
    if rgb is None:
        rgb = base.rgb if bands is None else tuple(bands) == RGB_BANDS
    elif rgb and bands is not None and len(bands) != 3:
        raise UserValueError(f"data_config.augment.rgb=True needs 3 bands (R, G, B), got "
                             f"{len(bands)}: {list(bands)}")
    if not rgb and "hue" not in values:
        values["hue"] = 0.0
    return augment.AugmentParams(**{**base.__dict__, **values, "rgb": bool(rgb)})


class Views(grain.transforms.RandomMap):
    """Decodes a record and builds one sample's views; a method's subclass defines them.

    Subclasses set `augment_defaults` (the method's reference augmentation) and
    `default_season_sampling`, and define `layout` (which image each view comes from and
    how it is augmented), `plan(example, rng)` (the seasons: the images and the per-sample
    extras such as labels) and `element_spec`: the keys, shapes and dtypes of one sample,
    which the method also uses to build its initialisation batch, so they cannot disagree.

    Both modes draw from the sample's Generator in the same order, by construction:
    `plan`, then `augment.draw_view` for each view of `layout` in order. ``augment_on=
    'host'``: `views` applies the draws in NumPy. ``'device'``: `device_inputs` yields the
    raw images (stored dtype) and the packed draws, and the jittable `device_views` turns
    a batch of those into the host mode's batch (`softcon_jax.data.device_augment`).
    """

    augment_defaults = augment.AugmentParams()
    default_season_sampling = "distinct"

    @classmethod
    def element_spec(cls, size: int, channels: int, dtype: Any = np.float32) -> dict:
        """{key: (shape, dtype)} of one sample's outputs (no batch dimension)."""
        raise NotImplementedError

    def layout(self) -> dict[str, tuple[str, bool, float]]:
        """{view key: (image name of `plan`, crop_only, blur_prob)}, in draw order."""
        raise NotImplementedError

    def plan(self, example: dict, rng: np.random.Generator) -> tuple[dict, dict]:
        """({image name: raw (C, H, W) image}, {key: per-sample extra, e.g. labels})."""
        raise NotImplementedError

    def __init__(self, *, size: int, band_index: np.ndarray | None,
                 normalizer: normalize.Normalizer, params: augment.AugmentParams,
                 dtype: np.dtype = np.dtype(np.float32), season_sampling: str | None = None,
                 augment_on: str = "host"):
        self.size = size
        self.dtype = dtype
        self.band_index = band_index
        self.normalizer = normalizer
        self.params = params
        self.season_sampling = season_sampling or self.default_season_sampling
        if self.season_sampling not in SEASON_SAMPLINGS:
            raise UserValueError(f"data_config.season_sampling={self.season_sampling!r}: "
                                 f"expected one of {SEASON_SAMPLINGS}")
        if augment_on not in AUGMENT_ON:
            raise UserValueError(f"config.data.augment_on={augment_on!r}: expected one of "
                                 f"{AUGMENT_ON}")
        if augment_on == "device" and not self._plans_its_views():
            raise UserValueError(
                f"config.data.augment_on='device' needs views that define `layout` and "
                f"`plan` (not only `views`); {type(self).__name__} does not. Set "
                "config.data.augment_on='host'.")
        self.augment_on = augment_on

    @classmethod
    def _plans_its_views(cls) -> bool:
        """True when `layout` and `plan` describe the views (`views` not overridden below
        them in the class hierarchy)."""
        def owner(name):
            return next(k for k in cls.__mro__ if name in k.__dict__)
        mro = cls.__mro__
        return all(owner(n) is not Views for n in ("layout", "plan")) and all(
            mro.index(owner("views")) >= mro.index(owner(n)) for n in ("layout", "plan"))

    def _view(self, img: np.ndarray, rng: np.random.Generator, *, crop_only: bool = False,
              blur_prob: float = 0.0, bounds: np.ndarray | None = None,
              trace: dict | None = None) -> np.ndarray:
        """One host-mode view (for subclasses that override `views` directly)."""
        return augment.make_view(img, rng, size=self.size, normalizer=self.normalizer,
                                 params=self.params, crop_only=crop_only,
                                 blur_prob=blur_prob, quantile_bounds=bounds,
                                 dtype=self.dtype, trace=trace)

    def _seasons(self, rng: np.random.Generator, t: int, k: int) -> list[int]:
        """``k`` season indices out of ``t``: distinct (when ``t >= k``) or independent."""
        if self.season_sampling == "independent":
            return [int(i) for i in rng.integers(0, t, size=k)]
        return [int(i) for i in rng.choice(t, size=k, replace=t < k)]

    def _image(self, example: dict, t: int) -> np.ndarray:
        img = example["image"][t]
        return img if self.band_index is None else img[self.band_index]

    def _blur(self, i: int) -> float:
        return self.params.blur_prob[i % len(self.params.blur_prob)]

    def random_map(self, element: bytes, rng: np.random.Generator) -> dict:
        example = records.decode(element)
        if self.augment_on == "device":
            return self.device_inputs(example, rng)
        return self.views(example, rng)

    def views(self, example: dict, rng: np.random.Generator) -> dict:
        """Host mode: one sample's views (and extras) as numpy arrays."""
        images, extras = self.plan(example, rng)
        bounds = {n: self.normalizer.quantile_bounds(im) for n, im in images.items()}
        out = {}
        for key, (name, crop_only, blur_prob) in self.layout().items():
            out[key] = self._view(images[name], rng, crop_only=crop_only,
                                  blur_prob=blur_prob, bounds=bounds[name])
        return {**out, **extras}

    def device_inputs(self, example: dict, rng: np.random.Generator) -> dict:
        """Device mode: ``{"images": {name: raw image}, "draws": {view key: packed draw},
        **extras}``; the same draws as `views`, nothing applied."""
        images, extras = self.plan(example, rng)
        draws = {}
        for key, (name, crop_only, blur_prob) in self.layout().items():
            c, h, w = images[name].shape
            d = augment.draw_view(rng, h, w, c, params=self.params, crop_only=crop_only,
                                  blur_prob=blur_prob)
            draws[key] = device_augment.pack(d, self.params, c, crop_only=crop_only)
        return {"images": images, "draws": draws, **extras}

    def device_element_spec(self, image_shape: tuple[int, int, int], image_dtype) -> dict:
        """{key: (shape, dtype)} (nested like `device_inputs`) of one device-mode sample;
        ``image_shape`` (C, H, W) and ``image_dtype`` as stored (band-selected)."""
        layout = self.layout()
        c = int(image_shape[0])
        spec = {k: v for k, v in self.element_spec(self.size, c, self.dtype).items()
                if k not in layout}
        return {"images": {n: (tuple(image_shape), np.dtype(image_dtype))
                           for n in dict.fromkeys(v[0] for v in layout.values())},
                "draws": {k: device_augment.packed_spec(self.params, c, crop_only=v[1])
                          for k, v in layout.items()}, **spec}

    def device_views(self, batch: dict) -> dict:
        """Jittable: a batch of `device_inputs` -> the batch `views` gives (same keys,
        shapes, dtype; equal to float32 rounding)."""
        thresholds = (device_augment.quantize_thresholds(self.normalizer)
                      if self.normalizer.quantize else None)
        out = {}
        for key, (name, crop_only, blur_prob) in self.layout().items():
            out[key] = device_augment.batch_view(
                batch["images"][name], batch["draws"][key], size=self.size,
                normalizer=self.normalizer, params=self.params, crop_only=crop_only,
                blur_prob=blur_prob, dtype=self.dtype, thresholds=thresholds)
        return {**out, **{k: v for k, v in batch.items() if k not in ("images", "draws")}}
