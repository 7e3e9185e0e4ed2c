"""``--engine beam`` on the DirectRunner: the same shards as the local engine, on a bucket
(a real GCS API server on 127.0.0.1) and locally; bad inputs counted alike; resumable."""

import os
import subprocess
import sys

import pytest
from helpers import fake_gcs_bucket
from test_data_prep import _break, make_ssl4eo_tree

from data_prep import ssl4eo_s12
from softcon_jax.data import shards

pytest.importorskip("apache_beam")  # the test extra installs it; CI runs this file
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "beam-bucket"
DIRECT = ("--runner=DirectRunner", "--direct_num_workers=1")


def _same(a, b):
    assert a["shards"] == b["shards"]
    for key in ("num_records", "shard_num_records", "num_skipped", "skipped", "fingerprint"):
        assert a[key] == b[key], key


def test_beam_bucket_to_bucket_is_byte_identical_to_local(tmp_path):
    root = str(tmp_path / "src")
    make_ssl4eo_tree(root, "s2c", n_loc=3)
    local = ssl4eo_s12.convert_tree(root, "s2c", str(tmp_path / "local"), num_shards=2,
                                    labels=os.path.join(root, "ssl4eo_multilabel.json"))
    with fake_gcs_bucket(BUCKET) as (fs, env):
        fs.put(root, f"{BUCKET}/src", recursive=True)
        res = subprocess.run(
            [sys.executable, "-m", "data_prep.ssl4eo_s12", "--root", f"gs://{BUCKET}/src",
             "--modality", "s2c", "--labels", f"gs://{BUCKET}/src/ssl4eo_multilabel.json",
             "--out", f"gs://{BUCKET}/beam", "--num-shards", "2", "--engine", "beam",
             "--", *DIRECT], capture_output=True, text=True, cwd=str(tmp_path),
            env=dict(os.environ, PYTHONPATH=REPO, **env))
        assert res.returncode == 0, res.stderr[-3000:]
        for s in local["shards"]:
            assert fs.cat_file(f"{BUCKET}/beam/{s}") == (tmp_path / "local" / s).read_bytes()
        meta = shards.read_metadata(f"gs://{BUCKET}/beam")
        assert meta["shard_num_records"] == local["shard_num_records"]
        assert not [p for p in fs.find(f"{BUCKET}/beam") if ".tmp-" in p]


def test_beam_counts_bad_inputs_as_local_and_resumes(tmp_path):
    root = str(tmp_path / "src")
    make_ssl4eo_tree(root, "s2c", n_loc=4, write_labels=False)
    where, _ = _break(root, "missing_band")  # location 1, in the first of 2 shards
    kw = dict(num_shards=2, skip_bad=True)
    local = ssl4eo_s12.convert_tree(root, "s2c", str(tmp_path / "local"), **kw)
    beam = ssl4eo_s12.convert_tree(root, "s2c", str(tmp_path / "beam"), engine="beam",
                                   beam_args=DIRECT, **kw)
    _same(beam, local)
    assert beam["num_skipped"] == 1 and beam["skipped"][0]["path"] == where
    for s in local["shards"]:
        assert (tmp_path / "beam" / s).read_bytes() == (tmp_path / "local" / s).read_bytes()
    # Resume: an unfinished Beam conversion (shard 1 and the metadata missing) rewrites
    # only what is missing; finished shards are kept as they are.
    out = tmp_path / "beam"
    os.remove(out / "metadata.json")
    os.remove(out / local["shards"][1])
    kept = os.stat(out / local["shards"][0]).st_mtime_ns
    again = ssl4eo_s12.convert_tree(root, "s2c", str(out), engine="beam", beam_args=DIRECT,
                                    resume=True, **kw)
    _same(again, local)
    assert os.stat(out / local["shards"][0]).st_mtime_ns == kept
    assert (out / local["shards"][1]).read_bytes() == \
        (tmp_path / "local" / local["shards"][1]).read_bytes()
