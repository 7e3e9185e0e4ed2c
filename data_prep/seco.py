"""Convert SeCo-100k / SeCo-1M (GeoTIFF tree) to ArrayRecord shards.

Tree: ``ROOT/<location>/<product id>/<band>.tif``, 5 timestamps per location,
12 bands (no B10), uint8. Only the timestamp *folders* are read: the RGB
preview files ``<product id>.tif`` that SeCo-100k keeps next to them are
ignored. Timestamps are stored in acquisition-date order. 20 m / 60 m bands are
resampled to the 10 m grid (bilinear).
SeCo has no labels: ``labels`` are zeros and ``has_label`` False.

    python -m data_prep.seco --root seasonal_contrast_1m --out DIR --num-shards 64
"""

from __future__ import annotations

import argparse
import functools
import logging

import numpy as np

from data_prep import geotiff, options
from softcon_jax import cli
from softcon_jax.data import shards, storage
from softcon_jax.data.records import NUM_CLASSES
from softcon_jax.data.shards import BadInputError

BANDS = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12"]
TIMESTEPS = 5


def make_example(item: tuple, *, root: str, size: int, timesteps: int) -> dict:
    """Record of one location ``item = (location, timestamp folders)``."""
    location, stamps = item
    loc_dir = storage.join(root, location)
    if len(stamps) != timesteps:
        raise BadInputError(loc_dir, f"expected {timesteps} timestamp folders, found "
                                     f"{len(stamps)}: {stamps}")
    spec = geotiff.Season(tuple(BANDS), size, "uint8", "SeCo (uint8)")
    image = np.empty((timesteps, len(BANDS), size, size), np.uint8)
    for t, stamp in enumerate(stamps):
        geotiff.read_season(storage.join(loc_dir, stamp), spec, image[t])
    return {"image": image, "labels": np.zeros((timesteps, NUM_CLASSES), np.uint8),
            "has_label": np.zeros(timesteps, bool), "seasons": list(stamps),
            "location": location}


def convert(root: str, out: str, *, num_shards: int, image_size: int | None = None,
            timesteps: int = TIMESTEPS, num_workers: int = 0, resume: bool = False,
            skip_bad: bool = False, compression: str = "uncompressed",
            engine: str = "local", beam_args: tuple = ()) -> dict:
    """Converts the SeCo tree (local or URL); returns the written metadata."""
    root = storage.check(root, "--root")
    storage.check(out, "--out")
    if not storage.isdir(root):
        raise BadInputError(root, "SeCo root folder does not exist")
    # Timestamps in acquisition-date order (parsed from the product id), not name order.
    tree = geotiff.scan_locations(root)
    if not tree:
        raise BadInputError(root, "no location folders")
    if image_size is None:
        first = next(((loc, s) for loc, ss in tree.items() for s in ss), None)
        if first is None:
            raise BadInputError(root, "no timestamp folders under any location")
        image_size = geotiff.infer_size(storage.join(root, *first), BANDS)
    items = [(loc, tree[loc]) for loc in sorted(tree)]
    fn = functools.partial(make_example, root=root, size=image_size, timesteps=timesteps)
    metadata = {
        "dataset": "seco", "modality": "s2a", "bands": BANDS, "dtype": "uint8",
        "timesteps": timesteps, "image_size": image_size, "num_classes": NUM_CLASSES,
        "has_labels": False,
        "source": storage.abspath(root),
    }
    return shards.write_shards(out, items, fn, name="seco", num_shards=num_shards,
                               metadata=metadata, num_workers=num_workers, resume=resume,
                               skip_bad=skip_bad, compression=compression, engine=engine,
                               beam_args=beam_args, desc="seco")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Convert SeCo-100k / SeCo-1M to ArrayRecord shards.")
    p.add_argument("--root", required=True,
                   help="folder holding <location>/<product id>/<band>.tif")
    p.add_argument("--image-size", type=int, default=None,
                   help="10 m grid size in px (default: read from the first 10 m band)")
    p.add_argument("--timesteps", type=int, default=TIMESTEPS)
    options.add_common_args(p)
    a = options.parse_args(p, argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        force=True)
    meta = convert(a.root, a.out, num_shards=a.num_shards, image_size=a.image_size,
                   timesteps=a.timesteps, num_workers=a.num_workers, resume=a.resume,
                   skip_bad=a.skip_bad, compression=a.compression, engine=a.engine,
                   beam_args=tuple(a.beam_args))
    print(options.summary(meta, a.out))


if __name__ == "__main__":
    cli.run(main)
