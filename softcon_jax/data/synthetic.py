"""Realistic small SSL4EO-S12-like datasets for tests and the quickstart.

Each location gets a land-cover mixture over the 9 Dynamic World classes
(Dirichlet draw). A class map is made of smooth random fields (blobby regions,
soft boundaries); pixels are mixtures of per-class spectral signatures
(plausible Sentinel-2 L1C/L2A reflectance x 10000 as uint16, or Sentinel-1
dB as float32) with texture and noise. Seasons change vegetation vigour, crops
(bare in winter), snow cover (winter, cold locations) and the atmosphere.
Labels per season are the classes covering more than ``label_threshold`` of
that season's class map; some seasons are unlabelled, as in SSL4EO-S12-ML.

Everything is a pure function of ``(seed, location index)``, so the output does
not depend on the number of workers. ``python -m data_prep.synthetic --out DIR`` writes one
from the command line.

A synthetic dataset is written only into a directory that is missing, empty, holds
the leftovers of an interrupted synthetic write, or already holds the same synthetic
dataset (same parameters, recorded as ``synthetic_params`` in ``metadata.json``; it
is then reused as is). Anything else is refused with an error naming the directory:
the generator never overwrites a user's data. ``ensure_synthetic_dataset`` is what
the trainer calls for ``config.data.synthetic`` (switch it off with
``--config.data.synthetic.enabled=False``).
"""

from __future__ import annotations

import functools
import inspect
import re

import numpy as np

from softcon_jax import cli
from softcon_jax.data import shards, storage

NUM_CLASSES = 9
S2C_BANDS = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
S2A_BANDS = [b for b in S2C_BANDS if b != "B10"]
S1_BANDS = ["VV", "VH"]

# Top-of-atmosphere-like reflectance x 10000 per class, bands in S2C order.
# Rows: water, trees, grass, flooded veg., crops, shrub, built, bare, snow.
_S2_SIGNATURES = np.array([
    [1500, 1250, 1050, 850, 750, 650, 620, 550, 500, 250, 12, 250, 180],
    [1350, 1050, 950, 750, 1150, 2300, 2750, 2800, 3000, 950, 18, 1650, 850],
    [1450, 1250, 1250, 1150, 1600, 2450, 2750, 2800, 2950, 950, 20, 2350, 1450],
    [1400, 1150, 1100, 950, 1150, 1750, 1950, 1900, 2050, 700, 15, 1250, 750],
    [1500, 1300, 1350, 1300, 1700, 2550, 2950, 3000, 3150, 1000, 22, 2500, 1600],
    [1700, 1500, 1600, 1800, 2100, 2400, 2600, 2650, 2800, 900, 25, 3000, 2200],
    [1800, 1700, 1700, 1800, 1900, 2100, 2200, 2250, 2300, 800, 28, 2500, 2100],
    [2000, 1950, 2150, 2550, 2800, 3000, 3100, 3150, 3300, 1050, 32, 3800, 3000],
    [6000, 6200, 6100, 6000, 5900, 5700, 5500, 5400, 5200, 1500, 60, 900, 700],
], np.float32)
# Sentinel-1 backscatter (dB), VV / VH.
_S1_SIGNATURES = np.array([
    [-20.0, -27.0], [-7.5, -13.0], [-11.0, -18.0], [-9.0, -17.0], [-10.5, -17.5],
    [-10.0, -17.0], [-4.0, -11.0], [-13.0, -22.0], [-14.0, -21.0],
], np.float32)
# Relative abundance of the classes in the world (snow and flooded veg. rare).
_CLASS_PRIOR = np.array([0.8, 1.2, 0.9, 0.25, 1.0, 0.8, 0.7, 0.6, 0.2], np.float32)
_VEG = np.array([0, 1, 1, 1, 1, 1, 0, 0, 0], np.float32)  # classes whose red edge/NIR varies
_NIR_BANDS = [4, 5, 6, 7, 8]  # B5 B6 B7 B8 B8A in S2C order
_SEASON_VIGOUR = np.array([0.9, 1.15, 0.95, 0.75], np.float32)  # spring, summer, autumn, winter

_MODALITY_BANDS = {"s2c": S2C_BANDS, "s2a": S2A_BANDS, "s1": S1_BANDS,
                   # SeCo's 12 L2A bands stored as uint8 (reflectance x 255), as its GeoTIFFs
                   "seco": S2A_BANDS}
_MODALITY_DTYPE = {"s2c": "uint16", "s2a": "uint16", "s1": "float32", "seco": "uint8"}


def default_modality(bands: int) -> str:
    """s2c for 13 bands, s2a for 12, s1 for 2."""
    for name, names in _MODALITY_BANDS.items():
        if len(names) == bands:
            return name
    raise ValueError(f"synthetic data supports 13 (s2c), 12 (s2a) or 2 (s1) bands, got {bands}")


def season_names(location: int, timesteps: int, seed: int) -> list[str]:
    """Product-id-like names, one per season, spread over a year."""
    rng = np.random.default_rng([seed, location, 7])
    tile = f"T{rng.integers(10, 60)}{'CDEFGHJKLMNPQRSTUVWX'[rng.integers(20)]}" \
           f"{''.join('ABCDEFGHJKLMNPQRSTUV'[i] for i in rng.integers(0, 20, 2))}"
    start = np.datetime64("2020-03-01") + int(rng.integers(0, 20))
    names = []
    for t in range(timesteps):
        day = start + int(t * 365 // timesteps) + int(rng.integers(0, 10))
        d = str(day).replace("-", "")
        names.append(f"{d}T10{rng.integers(0, 60):02d}21_{d}T10{rng.integers(0, 60):02d}47_{tile}")
    return names


@functools.lru_cache(maxsize=16)
def _upsample_matrix(size: int, cells: int) -> np.ndarray:
    """(size, cells + 2) Gaussian-kernel interpolation matrix, rows sum to 1."""
    centers = (np.arange(cells + 2) - 0.5) * size / cells
    x = np.arange(size) + 0.5
    w = np.exp(-0.5 * ((x[:, None] - centers[None]) / (0.6 * size / cells)) ** 2)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _smooth_fields(rng: np.random.Generator, n: int, size: int, cells: int) -> np.ndarray:
    """n smooth random fields (n, size, size), unit-ish scale, blobs ~ size/cells."""
    m = _upsample_matrix(size, cells)
    coarse = rng.standard_normal((n, cells + 2, cells + 2)).astype(np.float32)
    fine = np.matmul(np.matmul(m, coarse), m.T)
    return fine / fine.std(axis=(1, 2), keepdims=True).clip(1e-3)


def make_example(index: int, *, seed: int, image_size: int, timesteps: int, modality: str,
                 label_threshold: float, unlabelled_prob: float,
                 with_targets: bool = False) -> dict:
    """The record of synthetic location ``index`` (deterministic).

    ``with_targets`` adds the generator's hidden variables, which the records do not store
    (for evaluation): ``cover`` (T, 9) float32, the per-class area fractions the labels
    threshold, and ``cold`` (bool), whether the location has a snowy winter.
    """
    rng = np.random.default_rng([seed, index])
    s = image_size
    mixture = rng.dirichlet(_CLASS_PRIOR * 0.6)
    cold = rng.random() < 0.15
    fields = _smooth_fields(rng, NUM_CLASSES, s, cells=max(2, s // 16))  # (9, s, s)
    logits0 = 2.5 * fields + 3.0 * np.log(mixture + 1e-3)[:, None, None]
    texture = 1.0 + 0.06 * _smooth_fields(rng, 1, s, cells=max(2, s // 4))[0]

    signatures = _S1_SIGNATURES if modality == "s1" else _S2_SIGNATURES
    if modality == "s2a":
        signatures = np.delete(signatures, S2C_BANDS.index("B10"), axis=1)
        nir = [S2A_BANDS.index(S2C_BANDS[b]) for b in _NIR_BANDS]
    else:
        nir = _NIR_BANDS
    c = signatures.shape[1]

    images = np.empty((timesteps, c, s, s), np.float32)
    labels = np.zeros((timesteps, NUM_CLASSES), np.uint8)
    has_label = np.zeros(timesteps, bool)
    covers = np.zeros((timesteps, NUM_CLASSES), np.float32)
    for t in range(timesteps):
        season = int(round(t * 4 / timesteps)) % 4
        logits = logits0 + 0.4 * _smooth_fields(rng, NUM_CLASSES, s, cells=max(2, s // 16))
        if season == 3 and cold:  # winter snow over everything but water
            logits[8] += 3.0 + 2.0 * fields[8]
        weights = np.exp(4.0 * (logits - logits.max(axis=0, keepdims=True)))
        weights /= weights.sum(axis=0, keepdims=True)  # soft class membership (9, s, s)

        sig = signatures.copy()
        if modality != "s1":
            vig = _SEASON_VIGOUR[season] * (1 + 0.05 * rng.standard_normal())
            sig[:, nir] *= (1 + _VEG[:, None] * (vig - 1))
            if season == 3:  # harvested fields look like bare soil
                sig[4] = 0.5 * sig[4] + 0.5 * signatures[7]
            # Path radiance: strongest in the blue, absent in the cirrus band B10.
            haze = rng.gamma(2.0, 60.0) * np.linspace(1.5, 0.2, c, dtype=np.float32)
            if modality == "s2c":
                haze[S2C_BANDS.index("B10")] = 0.0
            sig = sig * (1 + 0.04 * rng.standard_normal(c).astype(np.float32)) + haze
        else:
            sig = sig + 0.5 * rng.standard_normal(sig.shape).astype(np.float32)

        img = np.einsum("khw,kc->chw", weights, sig, optimize=True)
        if modality == "s1":
            img += 1.2 * rng.standard_normal(img.shape).astype(np.float32)  # speckle (dB)
        else:
            img *= texture
            img *= 1 + 0.03 * rng.standard_normal(img.shape).astype(np.float32)
        images[t] = img

        hard = np.argmax(logits, axis=0)
        cover = np.bincount(hard.ravel(), minlength=NUM_CLASSES) / hard.size
        covers[t] = cover
        if rng.random() >= unlabelled_prob:
            has_label[t] = True
            labels[t] = cover > label_threshold

    if modality == "s1":
        image = images.astype(np.float32)
    elif modality == "seco":
        image = np.clip(np.rint(images * (255.0 / 10000.0)), 0, 255).astype(np.uint8)
    else:
        image = np.clip(np.rint(images), 0, 65535).astype(np.uint16)
    out = {
        "image": image,
        "labels": labels,
        "has_label": has_label,
        "seasons": season_names(index, timesteps, seed),
        "location": f"{index:07d}",
    }
    if with_targets:
        out["targets"] = {"cover": covers, "cold": bool(cold)}
    return out


def write_dataset(
    out_dir: str,
    *,
    num_locations: int,
    num_shards: int,
    image_size: int = 64,
    bands: int | None = None,
    timesteps: int = 4,
    seed: int = 0,
    modality: str | None = None,
    label_threshold: float = 0.05,
    unlabelled_prob: float = 0.1,
    num_workers: int = 0,
    name: str = "synthetic",
    key: str | None = None,
    check_only: bool = False,
) -> dict | None:
    """Writes a synthetic dataset to ``out_dir`` and returns its metadata.

    Idempotent: when ``out_dir`` already holds a complete dataset made with
    the same parameters, it is reused as is. Anything else in ``out_dir`` is an
    error (see the module docstring); ``key`` (a config key) is named in it.
    ``check_only``: only that check (nothing written); returns the metadata to
    reuse or None.
    """
    modality = modality or default_modality(13 if bands is None else bands)
    if modality not in _MODALITY_BANDS:
        raise ValueError(f"synthetic modality {modality!r}; expected one of "
                         f"{sorted(_MODALITY_BANDS)}")
    band_names = _MODALITY_BANDS[modality]
    bands = len(band_names) if bands is None else bands
    if len(band_names) != bands:
        raise ValueError(f"modality {modality!r} has {len(band_names)} bands, not bands={bands}")
    params = dict(num_locations=num_locations, image_size=image_size, bands=bands,
                  timesteps=timesteps, seed=seed, modality=modality,
                  label_threshold=label_threshold, unlabelled_prob=unlabelled_prob)
    existing, resume = _check_target(out_dir, params, num_shards, name, key)
    if existing is not None or check_only:
        return existing
    fn = functools.partial(make_example, seed=seed, image_size=image_size, timesteps=timesteps,
                           modality=modality, label_threshold=label_threshold,
                           unlabelled_prob=unlabelled_prob)
    metadata = {
        "dataset": "synthetic",
        "modality": modality,
        "bands": band_names,
        "dtype": _MODALITY_DTYPE[modality],
        "timesteps": timesteps,
        "image_size": image_size,
        "num_classes": NUM_CLASSES,
        "has_labels": True,
        "synthetic_params": params,
    }
    return shards.write_shards(out_dir, range(num_locations), fn, name=name,
                               num_shards=num_shards, metadata=metadata,
                               num_workers=num_workers, resume=resume, desc="synthetic")


def _refuse(out_dir: str, what: str, key: str | None) -> cli.UserValueError:
    off = (f"set --config.{key.removeprefix('config.')}.enabled=False to use the data that "
           f"is there, or give the config an empty directory as data path" if key else
           "choose an empty or new --out directory")
    return cli.UserValueError(
        f"{out_dir} {what}; the synthetic dataset is written only into an empty directory "
        f"or one holding the same synthetic dataset, so nothing was written. To fix: {off}.")


def _check_target(out_dir: str, params: dict, num_shards: int, name: str,
                  key: str | None) -> tuple[dict | None, bool]:
    """(existing metadata to reuse or None, resume?) for writing into ``out_dir``.

    Raises when ``out_dir`` holds anything but this synthetic dataset or the leftovers of
    an interrupted synthetic write (shards named ``<name>-*``, their markers, temporaries).
    """
    out_dir = storage.check(out_dir, key or "--out")
    if not storage.isdir(out_dir):
        if storage.exists(out_dir):
            raise _refuse(out_dir, "exists and is not a directory", key)
        return None, False
    meta_path = storage.join(out_dir, shards.METADATA_FILE)
    if storage.exists(meta_path):
        try:
            meta = shards.read_metadata(out_dir)
        except (OSError, ValueError) as e:
            raise _refuse(out_dir, f"holds an unreadable {meta_path} ({e})", key) from None
        if not isinstance(meta, dict) or meta.get("dataset") != "synthetic":
            dataset = meta.get("dataset") if isinstance(meta, dict) else None
            raise _refuse(out_dir, f"already holds a dataset ({meta_path}: dataset "
                                   f"{dataset!r}, not the built-in synthetic one)", key)
        old = meta.get("synthetic_params") or {}
        diff = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
        asked, there = dict(params, num_shards=num_shards), dict(old)
        there["num_shards"] = meta.get("num_shards")
        if there["num_shards"] != num_shards:
            diff.append("num_shards")
        if diff:
            detail = ", ".join(f"{k}={there.get(k)!r} there, {asked.get(k)!r} asked"
                               for k in diff[:4])
            raise _refuse(out_dir, f"already holds a synthetic dataset with other parameters "
                                   f"({detail})", key)
        missing = [f for f in meta.get("shards", [])
                   if not storage.exists(storage.join(out_dir, f))]
        if missing or meta.get("format_version") != shards.FORMAT_VERSION:
            why = (f"shard {missing[0]} listed in {meta_path} is missing" if missing else
                   f"format_version {meta.get('format_version')} in {meta_path} is not "
                   f"{shards.FORMAT_VERSION}")
            raise _refuse(out_dir, f"holds a damaged synthetic dataset ({why})", key)
        return meta, False
    own = re.compile(rf"^{re.escape(name)}-\d{{5}}-of-\d{{5}}\.array_record(\.tmp-\d+)?$"
                     rf"|^{re.escape(shards.METADATA_FILE)}\.tmp-\d+$")
    entries = storage.listdir(out_dir)
    foreign = [f for f in entries if f != shards.MARKER_DIR and not own.match(f)]
    if shards.MARKER_DIR in entries:
        marker_dir = storage.join(out_dir, shards.MARKER_DIR)
        marker = re.compile(rf"^{re.escape(name)}-\d{{5}}-of-\d{{5}}\.array_record"
                            rf"\.json(\.tmp-\d+)?$")
        foreign += [storage.join(shards.MARKER_DIR, f) for f in storage.listdir(marker_dir)
                    if not marker.match(f)] if storage.isdir(marker_dir) else [shards.MARKER_DIR]
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise _refuse(out_dir, f"is not empty and holds no synthetic dataset (found "
                               f"{', '.join(foreign[:3])}{more})", key)
    # Empty, or what an interrupted synthetic write leaves: resume it (finished shards
    # with the same parameters are kept, the others rewritten).
    return None, bool(entries)


def ensure_synthetic_dataset(path: str, spec, *, key: str | None = "config.data.synthetic"):
    """Writes the synthetic dataset ``spec`` describes into ``path`` unless it is there.

    ``spec``: None, or a mapping (dict / ConfigDict) of ``write_dataset`` arguments plus
    ``enabled`` (default True; ``enabled=False`` turns writing off). ``key`` names the
    config entry in error messages. On several processes, process 0 writes and the others
    wait; every process checks the directory first, so all of them fail alike. Returns the
    metadata (None when off).
    """
    if not spec:
        return None
    spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    if not spec.pop("enabled", True):
        return None
    name = spec.pop("name", "synthetic")
    unknown = sorted(set(spec) - set(_WRITE_ARGS))
    if unknown:
        raise cli.UserKeyError(
            f"{key or 'synthetic spec'}: unknown keys {unknown}; expected 'enabled' and "
            f"write_dataset arguments {sorted(_WRITE_ARGS)}")
    import jax  # lazy: the converters do not need it otherwise

    meta = None
    if jax.process_index() == 0:
        meta = write_dataset(path, name=name, key=key, **spec)
    else:  # read-only: a refusal stops every process, not only the writer
        write_dataset(path, name=name, key=key, check_only=True, **spec)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("synthetic data written")
    return meta if meta is not None else shards.read_metadata(path)


_WRITE_ARGS = [p for p in inspect.signature(write_dataset).parameters
               if p not in ("out_dir", "name", "key", "check_only")]
