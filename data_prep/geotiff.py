"""Reading the released GeoTIFF trees: one single-band file per band.

Shared by ``ssl4eo_s12`` and ``seco``. Bands at 20 m and 60 m are resampled
onto the 10 m grid with bilinear interpolation using pixel-centre alignment
(``cv2.INTER_LINEAR`` / torch ``align_corners=False`` convention, what the
reference loaders use); 10 m bands are copied unchanged.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import os
import re
import warnings

import numpy as np

# Opening is most of a location's cost (52 small files for S2). These GDAL settings make it
# cheaper without changing a pixel: GDAL lists the folder on every open to find sidecar
# files (.aux.xml, .ovr, .msk), which band 1's raw pixels never depend on; it resolves the
# file's CRS against the EPSG database, which the converters never use (GEOKEYS reads the
# GeoTIFF keys as stored). They are GDAL configuration options (gdal.org, "Configuration
# options"; GTiff driver); a value the user set in the environment wins.
os.environ.setdefault("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")
os.environ.setdefault("GTIFF_SRS_SOURCE", "GEOKEYS")
os.environ.setdefault("GDAL_PAM_ENABLED", "NO")  # no .aux.xml lookups either
import rasterio  # noqa: E402  (after the GDAL setting above)
import rasterio.errors  # noqa: E402

from softcon_jax.data import storage  # noqa: E402
from softcon_jax.data.augment import resize_bilinear
from softcon_jax.data.shards import BadInputError  # noqa: E402

READ_THREADS = 8  # concurrent band reads per process from a bucket (object requests)

# The GTiff open option GEOREF_SOURCES=NONE skips reading the geotransform and CRS, most of
# what remains of an open's cost (about 4x cheaper per band file here). The converters store
# pixels only, so nothing they write changes; the option applies to the files they open, not
# to the process's other rasterio calls. rasterio then warns that the dataset is not
# georeferenced, a warning that is about this option only: `_no_georef_warning` hides it.
OPEN_OPTIONS = {"GEOREF_SOURCES": "NONE"}

# Ground resolution (m) of every band name used by the datasets.
RESOLUTION = {
    "B1": 60, "B2": 10, "B3": 10, "B4": 10, "B5": 20, "B6": 20, "B7": 20, "B8": 10,
    "B8A": 20, "B9": 60, "B10": 60, "B11": 20, "B12": 20, "VV": 10, "VH": 10,
}


def native_size(band: str, size: int) -> int:
    """Expected pixel size of ``band`` for a ``size`` px 10 m grid (264 -> 132 -> 44)."""
    return int(round(size * 10 / RESOLUTION[band]))


def list_dirs(path: str) -> list[str]:
    """Sorted names of the sub-directories of ``path`` (local or URL; files are ignored)."""
    return sorted(name for name, is_dir in storage.scandir(path).items() if is_dir)


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


def scan_locations(root: str) -> dict[str, list[str]]:
    """{location folder: its season folders in date order} of ``root`` (local or URL).

    On a bucket every location is one listing request: they run concurrently.
    """
    locations = list_dirs(root)
    if not storage.is_url(root):
        return {loc: list_dirs_by_date(os.path.join(root, loc)) for loc in locations}
    with cf.ThreadPoolExecutor(max_workers=32) as pool:
        seasons = pool.map(lambda loc: list_dirs_by_date(storage.join(root, loc)), locations)
        return dict(zip(locations, seasons))


@contextlib.contextmanager
def _no_georef_warning():
    """Hides rasterio's NotGeoreferencedWarning, which `OPEN_OPTIONS` causes on purpose.

    Entered by the thread that reads a season (the bucket path's pool threads run inside
    it): warning filters are process-wide, so the band threads see it too.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        yield


def _open_band(path: str, data: bytes | None, expected: int, dtype: np.dtype,
               what: str) -> np.ndarray:
    """Band 1 of the GeoTIFF at ``path`` (or its bytes ``data``), checked."""
    try:
        if data is None:
            src = rasterio.open(path, **OPEN_OPTIONS)
        else:
            memfile = rasterio.MemoryFile(data)
            src = memfile.open(**OPEN_OPTIONS)
        with src:
            found = np.dtype(src.dtypes[0])
            if found != dtype:
                raise BadInputError(path, f"band dtype {found}, expected {dtype} for {what}; "
                                          f"bands are stored without conversion (a cast "
                                          f"could wrap or truncate values)")
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


@dataclasses.dataclass(frozen=True)
class Season:
    """How to read one season folder: band order, grid, dtype, non-finite policy."""

    bands: tuple[str, ...]
    size: int
    dtype: str
    what: str = "this dataset"          # named in dtype errors ("s2c (uint16)")
    fill_value: float | None = None     # None: non-finite pixels are an error


_POOL: cf.ThreadPoolExecutor | None = None


def _pool() -> cf.ThreadPoolExecutor:
    """Threads opening a season's fetched bands concurrently (GDAL releases the GIL)."""
    global _POOL
    if _POOL is None:
        _POOL = cf.ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="band")
    return _POOL


def read_season(folder: str, spec: Season, out: np.ndarray | None = None
                ) -> tuple[np.ndarray, int]:
    """((C, size, size) array of ``folder/<band>.tif`` for every band in order, number of
    non-finite pixels replaced by ``spec.fill_value``). ``out``: an array to fill instead
    of a new one (a season of the location's (T, C, H, W) image: no copy to stack them).

    One listing of the folder replaces an existence check per band; on a bucket the bands
    are fetched concurrently (one batch of requests) and opened in threads.
    """
    try:
        names = storage.scandir(folder)
    except (FileNotFoundError, NotADirectoryError):
        raise BadInputError(folder, "season folder does not exist") from None
    if not any(name.lower().endswith((".tif", ".tiff")) for name in names):
        raise BadInputError(folder, "season folder has no band files (*.tif)")
    paths = [storage.join(folder, f"{band}.tif") for band in spec.bands]
    for band, path in zip(spec.bands, paths):
        if f"{band}.tif" not in names:
            raise BadInputError(path, "missing band file")
    dtype = np.dtype(spec.dtype)
    sizes = [native_size(band, spec.size) for band in spec.bands]
    if storage.is_url(folder):  # bound by requests: fetch concurrently, open in threads
        try:
            blobs = storage.read_many(paths)
        except Exception as e:  # the storage library's own errors: one line naming it
            raise storage.StorageError(f"{folder}: reading the band files failed "
                                       f"({type(e).__name__}: {e})") from e
        with _no_georef_warning():
            arrays = list(_pool().map(_open_band, paths, blobs, sizes,
                                      [dtype] * len(paths), [spec.what] * len(paths)))
    else:  # bound by CPU: threads would add overhead, the worker processes use the cores
        # One GDAL environment for the season, not one per file.
        with rasterio.Env(), _no_georef_warning():
            arrays = [_open_band(p, None, n, dtype, spec.what) for p, n in zip(paths, sizes)]
    filled = 0
    if dtype.kind == "f":
        for path, arr in zip(paths, arrays):
            bad = ~np.isfinite(arr)
            n = int(bad.sum())
            if n and spec.fill_value is None:
                raise BadInputError(path, f"{n} non-finite pixels (NaN or inf); convert with "
                                          f"--nonfinite fill --fill-value V to replace them "
                                          f"(recorded in metadata.json), or --skip-bad to "
                                          f"skip the location")
            if n:
                arr[bad] = spec.fill_value
                filled += n
    if out is None:
        out = np.empty((len(spec.bands), spec.size, spec.size), dtype)
    for i, arr in enumerate(arrays):
        out[i] = to_grid(arr, spec.size, dtype)
    return out, filled


def infer_size(folder: str, bands: list[str]) -> int:
    """The 10 m grid size, from the first 10 m band found in ``folder``."""
    for band in bands:
        if RESOLUTION[band] == 10:
            path = storage.join(folder, f"{band}.tif")
            if storage.exists(path):
                if storage.is_url(path):
                    with rasterio.MemoryFile(storage.read_bytes(path)) as mem, \
                            mem.open() as src:
                        return int(src.height)
                with rasterio.open(path) as src:
                    return int(src.height)
    raise BadInputError(folder, f"no 10 m band of {bands} to infer the image size from; "
                                f"pass --image-size")
