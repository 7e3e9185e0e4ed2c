"""A converted dataset directory: `metadata.json` plus ArrayRecord shards.

Every reader of the project (the Grain pipeline, the online kNN monitor, statistics,
benchmarks) opens a dataset through `open_dataset`, so the checks and error messages are the
same everywhere: a missing `metadata.json` or shard names the file and the command that writes
it.
"""

from __future__ import annotations

import dataclasses
import json
import os

import grain
import jax
from etils import epath


@dataclasses.dataclass
class Dataset:
    """An opened dataset directory: its metadata and a random-access record source."""

    path: str                 # the directory (local or gs://)
    meta: dict                # metadata.json
    meta_path: str            # its path, for messages
    source: grain.sources.RandomAccessDataSource

    def __len__(self) -> int:
        return len(self.source)


def load_metadata(path: str) -> tuple[dict, str]:
    """(metadata dict, metadata file path) of a converted dataset directory."""
    meta_path = epath.Path(path) / "metadata.json"  # local paths or gs://
    if not meta_path.exists():
        raise FileNotFoundError(
            f"data path {path!r}: {meta_path} not found; convert a dataset with "
            f"python -m data_prep.ssl4eo_s12 / data_prep.seco / data_prep.synthetic")
    return json.loads(meta_path.read_text()), str(meta_path)


def open_dataset(path: str) -> Dataset:
    """Opens `path` (metadata.json + the shards it lists); every shard must exist."""
    meta, meta_path = load_metadata(path)
    paths = [os.path.join(path, s) for s in meta["shards"]]
    for p in paths:
        if not epath.Path(p).exists():
            raise FileNotFoundError(f"shard {p} listed in {meta_path} does not exist")
    return Dataset(path, meta, meta_path, grain.sources.ArrayRecordDataSource(paths))


def ensure_synthetic_data(data_config):
    """Writes the built-in synthetic dataset first when the config asks for one.

    `config.data.synthetic` (`enabled` plus `data_prep.synthetic.write_dataset` arguments)
    makes the quickstart and the `runlocal` configs self-contained; turn it off with
    `--config.data.synthetic.enabled=False`. Process 0 writes; the others wait at a barrier.
    """
    spec = data_config.get("synthetic")
    if not spec or not spec.get("enabled", True):
        return
    if jax.process_index() == 0:
        from data_prep import synthetic  # the converters are not needed otherwise
        kwargs = {k: v for k, v in spec.to_dict().items() if k != "enabled"}
        synthetic.write_dataset(data_config.path, **kwargs)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("synthetic data written")
