"""Strict input types, non-finite pixels, shard names, a full disk and killed converters.

Each test checks the message (naming the file, entry or path), the exit status, and that
data already there is byte-identical afterwards (`helpers.snapshot`).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from helpers import small_tmpfs, snapshot
from test_data_prep import _write_tif, make_ssl4eo_tree, read_all

from data_prep import ssl4eo_s12, verify
from data_prep import synthetic as synthetic_cli
from softcon_jax import cli, data
from softcon_jax.data import shards, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO)


def _cli(module, *args, **kw):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, cwd=REPO, env=ENV, **kw)


def _season(root, modality, loc="0000001", t=1):
    d = os.path.join(root, modality, loc)
    return os.path.join(d, sorted(os.listdir(d))[t])


# ---------------------------------------------------------------------------- band dtypes

@pytest.mark.parametrize("modality,band,bad", [
    ("s2c", "B4", np.array([[-5, 1e9], [np.nan, 3]], np.float32)),  # would wrap / zero
    ("s2c", "B11", np.full((2, 2), 200, np.uint8)),                 # 0-255 in 0-10000 data
    ("s1", "VV", np.zeros((2, 2), np.float64)),
])
def test_a_band_of_another_dtype_is_refused_naming_file_and_dtypes(tmp_path, modality, band,
                                                                    bad):
    root = str(tmp_path / "src")
    make_ssl4eo_tree(root, modality, n_loc=3, write_labels=False)
    path = os.path.join(_season(root, modality), f"{band}.tif")
    n = 12 * 10 // geotiff_res(band)
    _write_tif(path, np.resize(bad, (n, n)).astype(bad.dtype))
    expected = ssl4eo_s12.DTYPE[modality]
    res = _cli("data_prep.ssl4eo_s12", "--root", root, "--modality", modality, "--out",
               str(tmp_path / "out"), "--num-shards", "1", "--num-workers", "0")
    assert res.returncode == 1
    err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert err == [f"error: {path}: band dtype {bad.dtype}, expected {expected} for "
                   f"{modality} ({expected}); bands are stored without conversion (a cast "
                   f"could wrap or truncate values)"], res.stderr
    assert not os.path.exists(tmp_path / "out" / "metadata.json")
    meta = ssl4eo_s12.convert_tree(root, modality, str(tmp_path / "out"), num_shards=1,
                                   skip_bad=True, resume=True)
    assert meta["num_records"] == 2 and meta["num_skipped"] == 1
    assert meta["skipped"][0]["path"] == path and str(bad.dtype) in meta["skipped"][0]["reason"]


def geotiff_res(band):
    from data_prep import geotiff
    return geotiff.RESOLUTION[band]


# ---------------------------------------------------------------------------- non-finite

def _s1_with_nonfinite(tmp_path):
    root = str(tmp_path / "src")
    make_ssl4eo_tree(root, "s1", n_loc=3, write_labels=False)
    path = os.path.join(_season(root, "s1"), "VH.tif")
    import rasterio
    with rasterio.open(path) as f:
        arr = f.read(1)
    arr[0, :3] = [np.nan, -np.inf, np.inf]
    _write_tif(path, arr)
    return root, path, arr


def test_nonfinite_pixels_are_refused_by_default(tmp_path):
    root, path, _ = _s1_with_nonfinite(tmp_path)
    res = _cli("data_prep.ssl4eo_s12", "--root", root, "--modality", "s1", "--out",
               str(tmp_path / "out"), "--num-shards", "1", "--num-workers", "0")
    assert res.returncode == 1
    assert f"error: {path}: 3 non-finite pixels (NaN or inf)" in res.stderr
    assert "--nonfinite fill" in res.stderr and "Traceback" not in res.stderr
    meta = ssl4eo_s12.convert_tree(root, "s1", str(tmp_path / "skip"), num_shards=1,
                                   skip_bad=True)
    assert meta["num_skipped"] == 1 and meta["skipped"][0]["path"] == path


def test_nonfinite_fill_policy_is_recorded_and_verify_reports_it(tmp_path):
    root, path, arr = _s1_with_nonfinite(tmp_path)
    out = str(tmp_path / "out")
    res = _cli("data_prep.ssl4eo_s12", "--root", root, "--modality", "s1", "--out", out,
               "--num-shards", "1", "--num-workers", "0", "--nonfinite", "fill",
               "--fill-value", "-50")
    assert res.returncode == 0, res.stderr
    meta, exs = read_all(out)
    assert meta["nonfinite"] == {"policy": "fill", "fill_value": -50.0, "num_pixels": 3,
                                 "num_locations": 1}
    ex = {e["location"]: e for e in exs}["0000001"]
    img = ex["image"][1, ex["seasons"] and 1]  # season 1, band VH
    assert np.isfinite(np.stack([e["image"] for e in exs])).all()
    np.testing.assert_array_equal(img[0, :3], [-50, -50, -50])
    np.testing.assert_array_equal(img[0, 3:], arr[0, 3:])
    res = _cli("data_prep.verify", out, "--no-progress")
    assert res.returncode == 0
    assert "0 non-finite pixels" in res.stdout
    assert "replaced 3 non-finite pixels in 1 locations by -50.0" in res.stdout
    bad = _cli("data_prep.ssl4eo_s12", "--root", root, "--modality", "s1", "--out", out,
               "--num-shards", "1", "--nonfinite", "fill")
    assert bad.returncode == 2 and "--fill-value" in bad.stderr


def test_verify_counts_nonfinite_pixels_per_location(tmp_path, capsys):
    def example(i):
        img = np.zeros((2, 1, 4, 4), np.float32)
        img[1, 0, 0, : i] = np.nan
        return {"image": img, "seasons": ["a", "b"], "location": str(i)}

    out = str(tmp_path / "out")
    shards.write_shards(out, range(3), example, name="t", num_shards=1,
                        metadata={"dataset": "t", "bands": ["VV"], "dtype": "float32",
                                  "timesteps": 2, "image_size": 4})
    assert verify.main([out, "--no-progress"]) == 1
    text = capsys.readouterr().out
    assert "3 non-finite pixels" in text  # 0 + 1 + 2
    assert "BAD t-00000-of-00001.array_record index 1: 1 non-finite pixels" in text
    assert "BAD t-00000-of-00001.array_record index 2: 2 non-finite pixels" in text


# ---------------------------------------------------------------------------- shard names

@pytest.mark.parametrize("entry", ["../outside.array_record", "/abs/outside.array_record",
                                   "sub/x.array_record", "gs://b/x.array_record", ".."])
def test_shard_entries_must_be_plain_names_in_the_dataset_folder(tmp_path, entry):
    out = str(tmp_path / "ds")
    synthetic.write_dataset(out, num_locations=2, num_shards=1, image_size=8)
    shutil.copy(os.path.join(out, "synthetic-00000-of-00001.array_record"),
                tmp_path / "outside.array_record")  # a readable shard outside the folder
    meta_path = os.path.join(out, "metadata.json")
    meta = json.load(open(meta_path))
    meta["shards"] = [entry]
    json.dump(meta, open(meta_path, "w"))
    before = snapshot(str(tmp_path))
    res = _cli("data_prep.verify", out, "--no-progress")
    assert res.returncode == 1
    assert res.stderr.startswith(f"error: {meta_path}: shard entry {entry!r} is ")
    with pytest.raises(cli.UserValueError, match=f"shard entry {entry!r}"):
        data.open_dataset(out)
    assert snapshot(str(tmp_path)) == before


# ---------------------------------------------------------------------------- disk full

def test_a_full_disk_is_one_error_line_and_keeps_finished_shards(tmp_path):
    # A location is 4 x 13 x 64 x 64 uint16 = 425 kB: two shards of 2 fit in 2 MB, not 4.
    with small_tmpfs(tmp_path / "disk", 2048) as disk:
        other = os.path.join(disk, "other.txt")
        open(other, "w").write("a user's file")
        out = os.path.join(disk, "syn")
        args = ["--out", out, "--num-locations", "8", "--num-shards", "4",
                "--image-size", "64"]
        res = _cli("data_prep.synthetic", *args)
        assert res.returncode == 1
        err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and "Traceback" not in res.stderr, res.stderr
        assert "No space left on device" in err[0] and out in err[0]
        assert "shard" in err[0] or "marker" in err[0]
        names = os.listdir(out)
        assert not [n for n in names if ".tmp-" in n], names  # temporary files removed
        assert not [n for n in os.listdir(os.path.join(out, ".shards")) if ".tmp-" in n]
        assert "metadata.json" not in names
        finished = [n for n in names if n.endswith(".array_record")]
        assert finished and open(other).read() == "a user's file"
        kept = {n: open(os.path.join(out, n), "rb").read() for n in finished}
        # The same with worker processes: still one line, nothing temporary left.
        shutil.rmtree(out)
        res = _cli("data_prep.synthetic", *args, "--num-workers", "2")
        assert res.returncode == 1 and "No space left on device" in res.stderr
        assert len([x for x in res.stderr.splitlines() if x.startswith("error:")]) == 1
        assert not [n for n in os.listdir(out) if ".tmp-" in n]
    # With room, --resume finishes; the shards finished before are byte-identical.
    local = str(tmp_path / "syn")
    synthetic_cli.main(["--out", local, "--num-locations", "8", "--num-shards", "4",
                    "--image-size", "64"])
    for n, data_ in kept.items():
        assert open(os.path.join(local, n), "rb").read() == data_


# ---------------------------------------------------------------------------- killed converter

def _start_slow_converter(out):
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_prep.synthetic", "--out", out, "--num-locations", "400",
         "--num-shards", "4", "--image-size", "96", "--num-workers", "2"],
        cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    deadline = time.time() + 120
    while time.time() < deadline:  # until both workers write (temporary shards appear)
        if os.path.isdir(out) and len([n for n in os.listdir(out) if ".tmp-" in n]) >= 2:
            return proc, parent.children(recursive=True)
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the converter's workers never started writing")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_converter_leaves_no_live_worker_and_publishes_nothing(tmp_path, sig):
    out = str(tmp_path / "syn")
    proc, children = _start_slow_converter(out)
    workers = [c for c in children if "python" in c.name().lower()]
    assert len(workers) >= 2
    proc.send_signal(sig)
    proc.wait(timeout=30)
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"workers still alive after the converter died: {alive}"
    time.sleep(1.0)
    names = os.listdir(out)
    assert not [n for n in names if n.endswith(".array_record")], names  # none published
    assert "metadata.json" not in names
    if sig == signal.SIGTERM:  # a clean stop also removes the temporary shards
        assert not [n for n in names if ".tmp-" in n], names
