"""Per-band normalisation presets, looked up by band name.

Every preset is ``y = clip?(x * a + b) * c + d`` per band, float32, in two stages:
``unit`` (``clip?(x * a + b)``, the image in [0, 1] for the clipping presets, where the
augmentations run, as torchvision's run after ``ToTensor``) and ``finish`` (``* c + d``,
e.g. ImageNet standardisation, last):

- ``softcon``: SoftCon / SSL4EO-S12, ``clip((x - (mean - 2 std)) / (4 std), 0, 1)``.
  With ``stats='s1'`` each image band is first clipped to its own 1-99 %
  quantiles (SoftCon's S1 preprocessing).
- ``zscore``: ``(x - mean) / std`` (no clip).
- ``seco_quantile``: SeCo, ``clip((x - lo) / (hi - lo), 0, 1)`` with the fixed
  SeCo quantiles, then ImageNet mean/std of the matching RGB channel
  (ServiceNow/seasonal-contrast ``datasets/seco_dataset.py``). Only B2, B3, B4 have
  reference quantiles.

``quantize=True`` (``data_config.quantize_uint8``) reproduces the reference readers'
uint8 step for the clipping presets: ``floor(clip((x - lo) / (hi - lo) * 255, 0, 255)) /
255`` in float64, as SSL4EO-S12's / SoftCon's ``normalize()`` (``lo, hi = mean -+ 2 std``,
``.astype(np.uint8)`` then ``ToTensor``) and SeCo's ``normalize()`` (``lo, hi`` = its
quantiles) do; without it the value stays float (at most one uint8 step, 1/255, away).

``stats='dataset'`` (in ``data_config``) measures the statistics on a sample of
the dataset instead (``dataset_stats``): our extension for band sets without
reference values, e.g. all 12 SeCo bands (quantiles 1 %/99 %, output [0, 1]).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from softcon_jax.cli import UserValueError

S2C_BANDS = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
S2A_BANDS = [b for b in S2C_BANDS if b != "B10"]

_S2C_MEAN = [1605.58, 1390.78, 1314.87, 1363.52, 1549.44, 2091.75, 2371.72, 2299.90, 2560.30,
             830.07, 22.10, 2177.07, 1524.07]
_S2C_STD = [786.79, 850.35, 875.06, 1138.85, 1122.18, 1161.59, 1274.39, 1248.43, 1345.53,
            577.32, 51.15, 1336.10, 1136.54]
_S2A_MEAN = [752.40, 884.30, 1144.16, 1297.47, 1624.91, 2194.64, 2422.21, 2517.76, 2581.65,
             2645.52, 2368.51, 1805.07]
_S2A_STD = [1108.03, 1155.15, 1183.63, 1368.11, 1370.27, 1355.55, 1416.51, 1474.79, 1439.31,
            1582.28, 1455.52, 1343.48]

# name -> {band: {"mean", "std"} or {"lo", "hi", "mean", "std"}}
STATS: dict[str, dict[str, dict[str, float]]] = {
    "s2c": {b: {"mean": m, "std": s} for b, m, s in zip(S2C_BANDS, _S2C_MEAN, _S2C_STD)},
    "s2a": {b: {"mean": m, "std": s} for b, m, s in zip(S2A_BANDS, _S2A_MEAN, _S2A_STD)},
    "s1": {"VV": {"mean": -12.548, "std": 5.257}, "VH": {"mean": -20.192, "std": 5.912}},
    # SeCo: uint8 quantiles per band, then ImageNet statistics of R=B4, G=B3, B=B2.
    "seco": {
        "B4": {"lo": 0.0, "hi": 129.0, "mean": 0.485, "std": 0.229},
        "B3": {"lo": 2.0, "hi": 103.0, "mean": 0.456, "std": 0.224},
        "B2": {"lo": 3.0, "hi": 88.0, "mean": 0.406, "std": 0.225},
    },
}
METHODS = ("softcon", "zscore", "seco_quantile")

# The stored value range each statistics preset was measured on: Sentinel-2 reflectance
# x 10000 (uint16, SSL4EO-S12), Sentinel-1 backscatter in dB (float32), SeCo's uint8
# GeoTIFFs (reflectance x 255, the quantiles of ServiceNow/seasonal-contrast
# datasets/seco_dataset.py). A preset on data of another range saturates every pixel.
PRESET_DTYPES = {"s2c": ("uint16", "float32"), "s2a": ("uint16", "float32"),
                 "s1": ("float32",), "seco": ("uint8",)}


def check_preset_dtype(stats, dtype: str | None, where: str,
                       key: str = "config.data.stats") -> None:
    """Raises when statistics preset `stats` was measured on another stored dtype."""
    if not isinstance(stats, str) or stats not in PRESET_DTYPES or not dtype:
        return
    if dtype not in PRESET_DTYPES[stats]:
        fits = sorted(k for k, v in PRESET_DTYPES.items() if dtype in v)
        raise UserValueError(
            f"{key}={stats!r} is for {' or '.join(PRESET_DTYPES[stats])} data, but {where} "
            f"stores {dtype}: every pixel would saturate. Use {key}='dataset' (measured)"
            + (f" or one of {fits}" if fits else "") + ".")


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """Callable ``(..., C) channels-last array -> float32`` for a fixed band list."""

    a: np.ndarray
    b: np.ndarray
    clip: bool
    c: np.ndarray
    d: np.ndarray
    image_quantiles: tuple[float, float] | None = None  # per-image clip first (S1)
    quantize: bool = False           # uint8 truncation of the unit stage (clip presets)
    low: np.ndarray | None = None    # float64 (lo, hi) of the unit stage, for quantize
    high: np.ndarray | None = None

    @property
    def output_range(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-band (low, high) of the output, or None when unbounded."""
        if not self.clip:
            return None
        return self.d, self.c + self.d

    @property
    def unit_range(self) -> tuple[float, float] | None:
        """(0, 1) for the clipping presets: the range of ``unit``; None when unbounded."""
        return (0.0, 1.0) if self.clip else None

    def quantile_bounds(self, image: np.ndarray) -> np.ndarray | None:
        """(C, 2) per-band clip bounds of a whole (C, H, W) image (None if not used)."""
        if self.image_quantiles is None:
            return None
        flat = image.reshape(image.shape[0], -1).astype(np.float32)
        return np.percentile(flat, self.image_quantiles, axis=1).T

    def unit(self, x: np.ndarray, bounds: np.ndarray | None = None) -> np.ndarray:
        """First stage, ``clip?(x * a + b)`` (quantised with ``quantize``), into a new
        C-contiguous float32 array; in [0, 1] for the clipping presets.

        ``bounds`` (C, 2) come from ``quantile_bounds`` of the whole image.
        """
        if self.quantize:
            y64 = np.asarray(x, np.float64)
            if bounds is not None:
                y64 = np.clip(y64, bounds[:, 0], bounds[:, 1])
            y64 = np.clip((y64 - self.low) / (self.high - self.low) * 255.0, 0.0, 255.0)
            y = np.empty(y64.shape, np.float32)
            y[...] = np.floor(y64)  # .astype(np.uint8) of values in [0, 255]
            y /= np.float32(255.0)  # ToTensor
            return y
        y = np.empty(x.shape, np.float32)
        y[...] = x  # one pass: dtype conversion (and layout, for transposed views)
        if bounds is not None:
            np.clip(y, bounds[:, 0], bounds[:, 1], out=y)
        y *= self.a
        y += self.b
        if self.clip:
            np.clip(y, 0.0, 1.0, out=y)
        return y

    def finish(self, y: np.ndarray) -> np.ndarray:
        """Second stage, ``y * c + d`` (in place when ``y`` is float32), for clip presets."""
        if self.clip and (np.any(self.c != 1) or np.any(self.d != 0)):
            y = np.asarray(y, np.float32)
            y *= self.c
            y += self.d
        return y

    def __call__(self, x: np.ndarray, bounds: np.ndarray | None = None) -> np.ndarray:
        """Normalises ``x`` (..., C) into a new C-contiguous float32 array:
        ``finish(unit(x, bounds))``."""
        return self.finish(self.unit(x, bounds))


def dataset_stats(images: list[np.ndarray], bands: list[str]) -> dict[str, dict[str, float]]:
    """Per-band statistics measured on sample images (each (T, C, H, W) or (C, H, W)).

    Gives ``mean``/``std`` and ``lo``/``hi`` = 1 % / 99 % quantiles, with the
    identity as post-scaling (``seco_quantile`` then maps to [0, 1]). Used for
    ``data_config.stats='dataset'``, e.g. 12-band SeCo, which has reference
    quantiles for B2-B4 only.
    """
    c = len(bands)
    flat = np.concatenate([np.moveaxis(np.asarray(im), -3, 0).reshape(c, -1) for im in images],
                          axis=1).astype(np.float64)
    mean, std = flat.mean(axis=1), flat.std(axis=1)
    lo, hi = np.percentile(flat, [1.0, 99.0], axis=1)
    return {b: {"mean": float(mean[i]), "std": float(max(std[i], 1e-6)),
                "q_lo": float(lo[i]), "q_hi": float(max(hi[i], lo[i] + 1e-6))}
            for i, b in enumerate(bands)}


def make_normalizer(method: str, stats: str | dict, bands: list[str],
                    quantize: bool = False) -> Normalizer:
    """Builds the normaliser for ``bands`` (names as in the dataset metadata).

    ``stats`` is a preset name of ``STATS`` or a table from ``dataset_stats``.
    ``quantize``: the reference uint8 truncation of the unit stage (clipping presets).

    Raises ValueError naming ``data_config.normalization`` / ``data_config.stats``
    when the method or a band's statistics are unknown.
    """
    if method not in METHODS:
        raise UserValueError(f"data_config.normalization={method!r}: expected one of {METHODS}")
    if quantize and method == "zscore":
        raise UserValueError("data_config.quantize_uint8=True needs a clipping normalisation "
                             "('softcon' or 'seco_quantile'), not data_config.normalization="
                             "'zscore' (which has no [0, 255] range to quantise)")
    if isinstance(stats, dict):
        table, stats = stats, "dataset"
        if method == "seco_quantile":  # measured quantiles, output in [0, 1]
            table = {b: {"lo": r["q_lo"], "hi": r["q_hi"], "mean": 0.0, "std": 1.0}
                     for b, r in table.items()}
    elif stats not in STATS:
        raise UserValueError(f"data_config.stats={stats!r}: expected one of "
                             f"{sorted(STATS) + ['dataset']}")
    else:
        table = STATS[stats]
    missing = [b for b in bands if b not in table]
    if missing:
        raise UserValueError(
            f"data_config.stats={stats!r} has no statistics for bands {missing} "
            f"(it covers {sorted(table)}); select bands with data_config.bands, or measure "
            f"them with data_config.stats='dataset'"
        )
    rows = [table[b] for b in bands]
    ones = np.ones(len(bands), np.float32)
    zeros = np.zeros(len(bands), np.float32)
    if method == "seco_quantile":
        if any("lo" not in r for r in rows):
            raise UserValueError(f"data_config.stats={stats!r} has no quantiles (lo/hi) for "
                                 f"data_config.normalization='seco_quantile'; use stats='seco'")
        lo = np.array([r["lo"] for r in rows], np.float32)
        hi = np.array([r["hi"] for r in rows], np.float32)
        mean = np.array([r["mean"] for r in rows], np.float32)
        std = np.array([r["std"] for r in rows], np.float32)
        lo64 = np.array([r["lo"] for r in rows], np.float64)
        hi64 = np.array([r["hi"] for r in rows], np.float64)
        return Normalizer(1 / (hi - lo), -lo / (hi - lo), True, 1 / std, -mean / std,
                          quantize=quantize, low=lo64, high=hi64)
    if any("lo" in r for r in rows):
        raise UserValueError(f"data_config.stats={stats!r} is for 'seco_quantile', "
                             f"not data_config.normalization={method!r}")
    mean = np.array([r["mean"] for r in rows], np.float32)
    std = np.array([r["std"] for r in rows], np.float32)
    if method == "zscore":
        return Normalizer(1 / std, -mean / std, False, ones, zeros)
    low = mean - 2 * std
    mean64 = np.array([r["mean"] for r in rows], np.float64)
    std64 = np.array([r["std"] for r in rows], np.float64)
    return Normalizer(1 / (4 * std), -low / (4 * std), True, ones, zeros,
                      image_quantiles=(1.0, 99.0) if stats == "s1" else None,
                      quantize=quantize, low=mean64 - 2 * std64, high=mean64 + 2 * std64)
