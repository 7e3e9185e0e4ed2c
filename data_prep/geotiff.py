"""Reading the released GeoTIFF trees: one single-band file per band.

Shared by ``ssl4eo_s12`` and ``seco``. Bands at 20 m and 60 m are resampled
onto the 10 m grid with bilinear interpolation using pixel-centre alignment
(``cv2.INTER_LINEAR`` / torch ``align_corners=False`` convention, what the
reference loaders use); 10 m bands are copied unchanged.
"""

from __future__ import annotations

import os
import re

import numpy as np
import rasterio

from data_prep.shards import BadInputError
from softcon_jax.data.augment import resize_bilinear

# Ground resolution (m) of every band name used by the datasets.
RESOLUTION = {
    "B1": 60, "B2": 10, "B3": 10, "B4": 10, "B5": 20, "B6": 20, "B7": 20, "B8": 10,
    "B8A": 20, "B9": 60, "B10": 60, "B11": 20, "B12": 20, "VV": 10, "VH": 10,
}


def native_size(band: str, size: int) -> int:
    """Expected pixel size of ``band`` for a ``size`` px 10 m grid (264 -> 132 -> 44)."""
    return int(round(size * 10 / RESOLUTION[band]))


def list_dirs(path: str) -> list[str]:
    """Sorted names of the sub-directories of ``path`` (files are ignored)."""
    with os.scandir(path) as it:
        return sorted(e.name for e in it if e.is_dir())


_DATE = re.compile(r"\d{8}T\d{6}")


def acquisition_key(name: str) -> tuple[str, str]:
    """Sort key of a season / timestamp folder: its acquisition date, then its name.

    The date is the first ``YYYYMMDDTHHMMSS`` in the product id. Folder-name order is not
    date order for Sentinel-1 (``S1A_..._20200315T...`` sorts before ``S1B_..._20200101T...``);
    Sentinel-2 and SeCo ids start with the date, so for them both orders agree. A name
    without a date sorts first, by name.
    """
    m = _DATE.search(name)
    return (m.group(0) if m else "", name)


def list_dirs_by_date(path: str) -> list[str]:
    """Sub-directory names of ``path`` in acquisition-date order (``acquisition_key``)."""
    return sorted(list_dirs(path), key=acquisition_key)


def read_band(path: str, expected: int) -> np.ndarray:
    """Band 1 of a GeoTIFF; BadInputError if missing, unreadable or not expected^2."""
    if not os.path.exists(path):
        raise BadInputError(path, "missing band file")
    try:
        with rasterio.open(path) as src:
            arr = src.read(1)
    except rasterio.errors.RasterioError as e:
        raise BadInputError(path, f"unreadable GeoTIFF ({e})") from None
    if arr.shape != (expected, expected):
        raise BadInputError(path, f"band is {arr.shape[0]}x{arr.shape[1]} px, "
                                  f"expected {expected}x{expected}")
    return arr


def to_grid(arr: np.ndarray, size: int, dtype: np.dtype) -> np.ndarray:
    """Bilinear resample to (size, size); integer outputs are rounded and clipped."""
    dtype = np.dtype(dtype)
    if arr.shape == (size, size):
        return arr.astype(dtype, copy=False)
    out = resize_bilinear(arr[:, :, None].astype(np.float32), (size, size))[:, :, 0]
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(dtype)


def read_season(folder: str, bands: list[str], size: int, dtype: np.dtype) -> np.ndarray:
    """(C, size, size) array of ``folder/<band>.tif`` for every band, in order."""
    if not os.path.isdir(folder):
        raise BadInputError(folder, "season folder does not exist")
    if not any(name.lower().endswith((".tif", ".tiff")) for name in os.listdir(folder)):
        raise BadInputError(folder, "season folder has no band files (*.tif)")
    out = np.empty((len(bands), size, size), dtype)
    for i, band in enumerate(bands):
        arr = read_band(os.path.join(folder, f"{band}.tif"), native_size(band, size))
        out[i] = to_grid(arr, size, dtype)
    return out


def infer_size(folder: str, bands: list[str]) -> int:
    """The 10 m grid size, from the first 10 m band found in ``folder``."""
    for band in bands:
        if RESOLUTION[band] == 10:
            path = os.path.join(folder, f"{band}.tif")
            if os.path.exists(path):
                with rasterio.open(path) as src:
                    return int(src.height)
    raise BadInputError(folder, f"no 10 m band of {bands} to infer the image size from; "
                                f"pass --image-size")
