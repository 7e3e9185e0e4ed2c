"""`python -m data_prep.synthetic --out DIR`: write a small realistic SSL4EO-S12-like dataset.

The scenes and the writer are `softcon_jax.data.synthetic` (the trainer writes the same
dataset for `config.data.synthetic`); this is its command line. `--out` may be a URL
(`gs://bucket/path`) whose filesystem is installed.
"""

from __future__ import annotations

import argparse
import logging

from softcon_jax import cli
from softcon_jax.data.synthetic import write_dataset


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--num-locations", type=int, default=256)
    p.add_argument("--num-shards", type=int, default=4)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--bands", type=int, default=13, help="13 (s2c), 12 (s2a) or 2 (s1)")
    p.add_argument("--timesteps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        force=True)
    meta = write_dataset(a.out, num_locations=a.num_locations, num_shards=a.num_shards,
                         image_size=a.image_size, bands=a.bands, timesteps=a.timesteps,
                         seed=a.seed, num_workers=a.num_workers)
    print(f"{meta['num_records']} records in {meta['num_shards']} shards at {a.out}")


if __name__ == "__main__":
    cli.run(main)
