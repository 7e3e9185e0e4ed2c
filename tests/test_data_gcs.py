"""Converters and verify on gs:// against a real GCS API server (fake-gcs-server) on
127.0.0.1, reached as Google's client libraries expect (STORAGE_EMULATOR_HOST)."""

import os
import subprocess
import sys

import pytest
from helpers import bucket_snapshot, fake_gcs_bucket
from test_data_prep import make_ssl4eo_tree

from data_prep import ssl4eo_s12, verify
from softcon_jax import cli
from softcon_jax.data import shards, synthetic
from softcon_jax.data.shards import BadInputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "test-bucket"


@pytest.fixture(scope="module")
def gcs():
    with fake_gcs_bucket(BUCKET) as (fs, env):
        yield fs, env


@pytest.fixture(scope="module")
def trees(gcs, tmp_path_factory):
    """A local S2 tree with labels, its copy on the bucket, and its local conversion."""
    fs, _ = gcs
    root = tmp_path_factory.mktemp("tree")
    make_ssl4eo_tree(str(root / "src"), "s2c", n_loc=4)
    fs.put(str(root / "src"), f"{BUCKET}/src", recursive=True)
    lab = str(root / "src" / "ssl4eo_multilabel.json")
    ssl4eo_s12.convert_tree(str(root / "src"), "s2c", str(root / "local"), num_shards=2,
                            labels=lab)
    return root


def _run(args, env, cwd):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          cwd=cwd, env=dict(os.environ, PYTHONPATH=REPO, **env))


def _same_shards(fs, gs_dir, local_dir):
    meta = shards.read_metadata(str(local_dir))
    for s in meta["shards"]:
        assert fs.cat_file(f"{gs_dir}/{s}") == (local_dir / s).read_bytes(), s
    return meta


def test_bucket_to_bucket_cli_matches_local_and_verify_reads_it(gcs, trees, tmp_path):
    fs, env = gcs
    res = _run(["data_prep.ssl4eo_s12", "--root", f"gs://{BUCKET}/src", "--modality", "s2c",
                "--labels", f"gs://{BUCKET}/src/ssl4eo_multilabel.json",
                "--out", f"gs://{BUCKET}/cli", "--num-shards", "2", "--num-workers", "2"],
               env, tmp_path)
    assert res.returncode == 0, res.stderr
    assert os.listdir(tmp_path) == []  # nothing local, no folder named "gs:"
    meta = _same_shards(fs, f"{BUCKET}/cli", trees / "local")
    names = sorted(p.rsplit("/", 1)[1] for p in fs.find(f"{BUCKET}/cli"))
    assert names == sorted(meta["shards"] + [m + ".json" for m in meta["shards"]]
                           + ["metadata.json"])  # no temporary objects left
    gs_meta = shards.read_metadata(f"gs://{BUCKET}/cli")
    assert gs_meta["fingerprint"] != meta["fingerprint"]  # the source differs...
    assert gs_meta["shard_num_records"] == meta["shard_num_records"]  # ...not the data
    res = _run(["data_prep.verify", f"gs://{BUCKET}/cli", "--no-progress"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "4 records in 2 shards" in res.stdout and "0 bad" in res.stdout


def test_verify_on_a_bucket_names_a_damaged_shard(gcs, trees):
    fs, _ = gcs
    fs.put(str(trees / "local"), f"{BUCKET}/damaged", recursive=True)
    meta = shards.read_metadata(str(trees / "local"))
    shard = f"{BUCKET}/damaged/{meta['shards'][1]}"
    fs.pipe_file(shard, fs.cat_file(shard)[:100])
    r = verify.verify(f"gs://{BUCKET}/damaged", progress=False)
    assert [(s, i) for s, i, _ in r["bad"]] == [(meta["shards"][1], -1)]
    assert "cannot be opened" in r["bad"][0][2]


def test_interrupted_bucket_conversion_resumes(gcs, trees, tmp_path):
    fs, _ = gcs
    src = f"{BUCKET}/broken_src"
    fs.put(str(trees / "src"), src, recursive=True)
    loc = f"{src}/s2c/0000003"
    season = sorted(fs.ls(loc))[0]
    good = fs.cat_file(f"{season}/B5.tif")
    fs.rm_file(f"{season}/B5.tif")  # the last location (second shard) breaks the run
    out = f"gs://{BUCKET}/resumed"
    lab = f"gs://{src}/ssl4eo_multilabel.json"
    with pytest.raises(BadInputError, match="B5.tif: missing band file"):
        ssl4eo_s12.convert_tree(f"gs://{src}", "s2c", out, num_shards=2, labels=lab)
    meta = shards.read_metadata(str(trees / "local"))
    first = f"{BUCKET}/resumed/{meta['shards'][0]}"
    assert fs.exists(first) and not fs.exists(f"{BUCKET}/resumed/metadata.json")
    generation = fs.info(first)["generation"]
    fs.pipe_file(f"{season}/B5.tif", good)
    before = bucket_snapshot(fs, f"{BUCKET}/resumed")
    with pytest.raises(cli.UserValueError, match="--resume"):  # never replaced silently
        ssl4eo_s12.convert_tree(f"gs://{src}", "s2c", out, num_shards=2, labels=lab)
    assert bucket_snapshot(fs, f"{BUCKET}/resumed") == before
    ssl4eo_s12.convert_tree(f"gs://{src}", "s2c", out, num_shards=2, labels=lab, resume=True)
    fs.invalidate_cache()
    assert fs.info(first)["generation"] == generation  # the finished shard was kept
    _same_shards(fs, f"{BUCKET}/resumed", trees / "local")


def test_a_different_dataset_on_the_bucket_is_never_replaced(gcs, trees):
    fs, _ = gcs
    fs.put(str(trees / "local"), f"{BUCKET}/theirs", recursive=True)
    before = bucket_snapshot(fs, f"{BUCKET}/theirs")
    for resume in (False, True):
        with pytest.raises(cli.UserValueError, match="already holds"):
            ssl4eo_s12.convert_tree(str(trees / "src"), "s2c", f"gs://{BUCKET}/theirs",
                                    num_shards=1, resume=resume)
    with pytest.raises(cli.UserValueError, match="already holds"):
        synthetic.write_dataset(f"gs://{BUCKET}/theirs", num_locations=4, num_shards=1,
                                image_size=8)
    assert bucket_snapshot(fs, f"{BUCKET}/theirs") == before


def test_synthetic_to_a_bucket_matches_local(gcs, tmp_path):
    fs, _ = gcs
    kw = dict(num_locations=4, num_shards=2, image_size=8)
    meta = synthetic.write_dataset(f"gs://{BUCKET}/syn", **kw)
    synthetic.write_dataset(str(tmp_path / "syn"), **kw)
    _same_shards(fs, f"{BUCKET}/syn", tmp_path / "syn")
    again = synthetic.write_dataset(f"gs://{BUCKET}/syn", **kw)  # reused as is
    assert again == meta


@pytest.mark.parametrize("flag", ["--out", "--root"])
def test_a_scheme_without_a_filesystem_is_one_error_and_writes_nothing(tmp_path, flag):
    src = tmp_path / "src"
    make_ssl4eo_tree(str(src), "s2c", n_loc=1, write_labels=False)
    paths = {"--root": str(src), "--out": str(tmp_path / "out")}
    paths[flag] = "nosuchfs://bucket/data"
    res = _run(["data_prep.ssl4eo_s12", "--modality", "s2c", "--num-shards", "1",
                "--root", paths["--root"], "--out", paths["--out"]], {}, tmp_path)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith(f"error: {flag} nosuchfs://bucket/data: no filesystem for "
                               f"the scheme 'nosuchfs://'"), res.stderr
    assert "Traceback" not in res.stderr
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no folder named "nosuchfs:"
    res = _run(["data_prep.verify", "nosuchfs://b/x"], {}, tmp_path)
    assert res.returncode == 1 and "'nosuchfs://'" in res.stderr
    res = _run(["data_prep.synthetic", "--out", "nosuchfs://b/x"], {}, tmp_path)
    assert res.returncode == 1 and "'nosuchfs://'" in res.stderr
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_a_missing_bucket_folder_is_named(gcs, tmp_path):
    with pytest.raises(BadInputError, match=f"gs://{BUCKET}/nothing/s2c: modality folder"):
        ssl4eo_s12.convert_tree(f"gs://{BUCKET}/nothing", "s2c", str(tmp_path / "o"),
                                num_shards=1)
    with pytest.raises(cli.UserFileNotFoundError, match="metadata.json not found"):
        verify.verify(f"gs://{BUCKET}/nothing", progress=False)
