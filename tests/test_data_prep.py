"""Converters, shard writer, synthetic data and verify, on small GeoTIFF trees made here."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import rasterio
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine
from scipy import ndimage

from data_prep import seco, ssl4eo_s12, verify
from softcon_jax import data
from softcon_jax.data import records, shards, synthetic
from softcon_jax.data.shards import BadInputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = {"B1": 60, "B2": 10, "B3": 10, "B4": 10, "B5": 20, "B6": 20, "B7": 20, "B8": 10,
       "B8A": 20, "B9": 60, "B10": 60, "B11": 20, "B12": 20, "VV": 10, "VH": 10}
SIZE = 12  # 10 m grid; 20 m bands are 6 px and 60 m bands 2 px, as 264 / 132 / 44


def _write_tif(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", height=arr.shape[0], width=arr.shape[1],
                       count=1, dtype=arr.dtype, crs="EPSG:4326",
                       transform=Affine(1e-4, 0.0, 10.0, 0.0, -1e-4, 50.0)) as dst:
        dst.write(arr, 1)


def _band(rng, band, dtype):
    n = SIZE * 10 // RES[band]
    if np.dtype(dtype) == np.float32:
        return rng.normal(-15, 5, (n, n)).astype(np.float32)
    high = 255 if np.dtype(dtype) == np.uint8 else 12000
    return rng.integers(0, high, (n, n)).astype(dtype)


def make_ssl4eo_tree(root, modality="s2c", n_loc=3, seed=0, prefix="", write_labels=True):
    """root/<modality>/<loc>/<season>/<band>.tif; returns the label dict used."""
    rng = np.random.default_rng(seed)
    bands, dtype = ssl4eo_s12.BANDS[modality], ssl4eo_s12.DTYPE[modality]
    labels = {}
    for i in range(n_loc):
        loc = f"{i:07d}"
        labels[loc] = {}
        for t in range(4):
            # prefix mimics S1 product ids, whose sensor tag (S1A/S1B) breaks name order.
            tag = f"S1{'AB'[t % 2]}_IW_GRDH_1SDV_" if prefix else ""
            season = f"{tag}2020{3 * t + 1:02d}15T101021_2020{3 * t + 1:02d}15T101047_T32UQD"
            for b in bands:
                _write_tif(os.path.join(root, modality, loc, season, f"{b}.tif"),
                           _band(rng, b, dtype))
            labels[loc][season] = [] if (i, t) == (1, 2) else [str(k) for k in
                                                                  sorted({t, (i + t) % 9})]
    if write_labels:
        with open(os.path.join(root, "ssl4eo_multilabel.json"), "w") as f:
            json.dump(labels, f)
    return labels


def make_seco_tree(root, n_loc=2, seed=1):
    rng = np.random.default_rng(seed)
    for i in range(n_loc):
        for t in range(5):
            stamp = f"20190{t + 1}03T154559_20190{t + 1}03T154611_T18QVG"
            for b in seco.BANDS:
                _write_tif(os.path.join(root, f"{i:06d}", stamp, f"{b}.tif"),
                           _band(rng, b, np.uint8))
            # SeCo-100k keeps an RGB preview file next to each timestamp folder.
            _write_tif(os.path.join(root, f"{i:06d}", stamp + ".tif"),
                       rng.integers(0, 255, (SIZE, SIZE)).astype(np.uint8))


def reference_band(path, size, dtype):
    """Direct rasterio read + independent float64 bilinear (pixel centres, edge clamp)."""
    with rasterio.open(path) as src:
        arr = src.read(1).astype(np.float64)
    if arr.shape[0] == size:
        return arr
    coords = (np.arange(size) + 0.5) * arr.shape[0] / size - 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    out = ndimage.map_coordinates(arr, [yy, xx], order=1, mode="nearest")
    return np.rint(out) if np.dtype(dtype).kind in "ui" else out


def read_all(out_dir):
    """(metadata, every location decoded) of a converted dataset, read as training reads."""
    meta = shards.read_metadata(out_dir)
    # Record schema 3: a location record then one record per season.
    assert meta["records_per_location"] == 1 + meta["timesteps"]
    for s, n in zip(meta["shards"], meta["shard_num_records"], strict=True):
        r = ArrayRecordReader(os.path.join(out_dir, s))
        assert r.num_records() == n * meta["records_per_location"]
        r.close()
    source = data.open_dataset(out_dir).source
    exs = [records.decode(source[i]) for i in range(len(source))]
    return meta, [{**ex, "image": np.asarray(ex["image"])} for ex in exs]


@pytest.mark.parametrize("modality", ["s2c", "s1"])
def test_ssl4eo_tree_matches_rasterio_and_labels(tmp_path, modality):
    labels = make_ssl4eo_tree(str(tmp_path / "src"), modality)
    lab_path = str(tmp_path / "src" / "ssl4eo_multilabel.json")
    meta = ssl4eo_s12.convert_tree(str(tmp_path / "src"), modality, str(tmp_path / "out"),
                                   num_shards=2, labels=lab_path)
    assert meta["num_records"] == 3 and meta["bands"] == ssl4eo_s12.BANDS[modality]
    meta, exs = read_all(str(tmp_path / "out"))
    assert [e["location"] for e in exs] == ["0000000", "0000001", "0000002"]
    dtype = np.dtype(ssl4eo_s12.DTYPE[modality])
    for ex in exs:
        assert ex["image"].shape == (4, len(meta["bands"]), SIZE, SIZE)
        assert ex["image"].dtype == dtype
        for t, season in enumerate(ex["seasons"]):
            for c, band in enumerate(meta["bands"]):
                path = tmp_path / "src" / modality / ex["location"] / season / f"{band}.tif"
                ref = reference_band(str(path), SIZE, dtype)
                got = ex["image"][t, c].astype(np.float64)
                if RES[band] == 10:
                    np.testing.assert_array_equal(got, ref)  # native grid: copied exactly
                else:
                    np.testing.assert_allclose(got, ref, atol=1 if dtype.kind == "u" else 1e-3)
            entry = labels[ex["location"]][season]
            assert ex["has_label"][t] == bool(entry)
            assert sorted(np.flatnonzero(ex["labels"][t]).tolist()) == sorted(map(int, entry))
    assert not exs[1]["has_label"][2] and not exs[1]["labels"][2].any()  # empty list


def test_band_files_are_opened_without_georeferencing_and_without_its_warning(tmp_path):
    """The converters open band files with GDAL's GEOREF_SOURCES=NONE (pixels only): no
    "not georeferenced" warning reaches the user, and the process's own rasterio calls
    still see georeferencing and still warn where a file really has none."""
    make_ssl4eo_tree(str(tmp_path / "src"), "s2c", n_loc=1, write_labels=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ssl4eo_s12.convert_tree(str(tmp_path / "src"), "s2c", str(tmp_path / "out"),
                                num_shards=1)
    assert not [w for w in seen if issubclass(w.category, NotGeoreferencedWarning)]
    band = next((tmp_path / "src" / "s2c").rglob("B2.tif"))
    with rasterio.open(band) as src:
        assert src.transform == Affine(1e-4, 0.0, 10.0, 0.0, -1e-4, 50.0)
    bare = tmp_path / "bare.tif"
    with warnings.catch_warnings():  # writing it warns too
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(bare, "w", driver="GTiff", height=2, width=2, count=1,
                           dtype="uint8") as dst:
            dst.write(np.zeros((2, 2), np.uint8), 1)
    with pytest.warns(NotGeoreferencedWarning):
        rasterio.open(bare).close()


def test_s1_labels_join_by_acquisition_order(tmp_path):
    root = str(tmp_path / "src")
    labels = make_ssl4eo_tree(root, "s2c", n_loc=2)  # labels keyed by S2 product ids
    make_ssl4eo_tree(root, "s1", n_loc=2, prefix="s1", write_labels=False)
    lab = os.path.join(root, "ssl4eo_multilabel.json")
    with pytest.raises(BadInputError, match="unknown season"):
        ssl4eo_s12.convert_tree(root, "s1", str(tmp_path / "out"), num_shards=1, labels=lab)
    ssl4eo_s12.convert_tree(root, "s1", str(tmp_path / "out"), num_shards=1, labels=lab,
                            match_labels="order")
    _, exs = read_all(str(tmp_path / "out"))
    for ex in exs:
        dates = [s.split("1SDV_")[1] for s in ex["seasons"]]
        assert dates == sorted(dates) and ex["seasons"] != sorted(ex["seasons"])  # date order
        s2_seasons = sorted(labels[ex["location"]])  # S2 names sort by date
        by_date = sorted(range(4), key=lambda t: ex["seasons"][t].split("1SDV_")[1])
        for k, t in enumerate(by_date):
            entry = labels[ex["location"]][s2_seasons[k]]
            assert sorted(np.flatnonzero(ex["labels"][t]).tolist()) == sorted(map(int, entry))


def test_seasons_are_stored_in_acquisition_date_order(tmp_path):
    """Folder names that do not sort by date (S1A/S1B, or any prefix) are stored by date."""
    root = str(tmp_path / "src")
    make_ssl4eo_tree(root, "s1", n_loc=1, prefix="s1", write_labels=False)
    ssl4eo_s12.convert_tree(root, "s1", str(tmp_path / "s1"), num_shards=1)
    (ex,) = read_all(str(tmp_path / "s1"))[1]
    assert ex["seasons"] == sorted(ex["seasons"], key=lambda s: s.split("1SDV_")[1])
    assert ex["seasons"][0].startswith("S1A") and ex["seasons"][1].startswith("S1B")
    # The image rows follow the season names.
    with rasterio.open(os.path.join(root, "s1", ex["location"], ex["seasons"][1], "VV.tif")) as f:
        np.testing.assert_array_equal(ex["image"][1, 0], f.read(1))
    # SeCo: timestamp folders named so that name order is the reverse of date order.
    seco_root = tmp_path / "seco"
    rng = np.random.default_rng(0)
    stamps = [f"{chr(ord('e') - t)}_20190{t + 1}03T154559_T18QVG" for t in range(5)]
    for stamp in stamps:
        for b in seco.BANDS:
            _write_tif(str(seco_root / "000000" / stamp / f"{b}.tif"), _band(rng, b, np.uint8))
    seco.convert(str(seco_root), str(tmp_path / "seco_out"), num_shards=1)
    (ex,) = read_all(str(tmp_path / "seco_out"))[1]
    assert ex["seasons"] == stamps  # by date (Jan..May), although "a_..." < "e_..." by name


@pytest.mark.parametrize("converter", ["ssl4eo_s12", "seco"])
def test_compression_option_reaches_the_shards(tmp_path, converter):
    src = str(tmp_path / "src")
    if converter == "seco":
        make_seco_tree(src, n_loc=2)
        argv = ["--root", src]
    else:
        make_ssl4eo_tree(src, "s2c", n_loc=2, write_labels=False)
        argv = ["--root", src, "--modality", "s2c"]
    outs = {}
    for comp in ("uncompressed", "zstd:3"):
        out = str(tmp_path / comp.replace(":", "_"))
        module = seco if converter == "seco" else ssl4eo_s12
        module.main(argv + ["--out", out, "--num-shards", "1", "--compression", comp])
        meta, outs[comp] = read_all(out)
        assert meta["array_record_options"] == f"group_size:1,{comp}"
        # What the shard file itself says it was written with.
        reader = ArrayRecordReader(os.path.join(out, meta["shards"][0]))
        written = reader.writer_options_string().split(",")
        reader.close()
        assert ("zstd:3" in written) == (comp == "zstd:3")
    for a, b in zip(outs["uncompressed"], outs["zstd:3"], strict=True):
        assert a["location"] == b["location"]
        np.testing.assert_array_equal(a["image"], b["image"])


def test_seco_tree_reads_timestamp_folders_only(tmp_path):
    make_seco_tree(str(tmp_path / "src"))
    meta = seco.convert(str(tmp_path / "src"), str(tmp_path / "out"), num_shards=1)
    assert meta["timesteps"] == 5 and meta["dtype"] == "uint8" and len(meta["bands"]) == 12
    _, exs = read_all(str(tmp_path / "out"))
    for ex in exs:
        assert ex["image"].shape == (5, 12, SIZE, SIZE) and ex["image"].dtype == np.uint8
        assert all(not s.endswith(".tif") for s in ex["seasons"])
        assert not ex["has_label"].any()
        for t, stamp in enumerate(ex["seasons"]):
            for c, band in enumerate(seco.BANDS):
                ref = reference_band(str(tmp_path / "src" / ex["location"] / stamp / f"{band}.tif"),
                                     SIZE, np.uint8)
                np.testing.assert_allclose(ex["image"][t, c], ref, atol=1)


def _break(root, case):
    """Applies one kind of damage; returns (expected path fragment, location-level?)."""
    loc = os.path.join(root, "s2c", "0000001")
    seasons = sorted(os.listdir(loc))
    lab = os.path.join(root, "ssl4eo_multilabel.json")
    if case == "missing_band":
        os.remove(os.path.join(loc, seasons[0], "B5.tif"))
        return os.path.join(loc, seasons[0], "B5.tif"), True
    if case == "wrong_size":
        _write_tif(os.path.join(loc, seasons[2], "B11.tif"), np.zeros((5, 5), np.uint16))
        return os.path.join(loc, seasons[2], "B11.tif"), True
    if case == "empty_season":
        for f in os.listdir(os.path.join(loc, seasons[1])):
            os.remove(os.path.join(loc, seasons[1], f))
        return os.path.join(loc, seasons[1]), True
    with open(lab) as f:
        labels = json.load(f)
    if case == "unknown_location":
        labels["9999999"] = {seasons[0]: ["1"]}
    else:
        labels["0000001"]["20991231T000000_bogus"] = ["2"]
    with open(lab, "w") as f:
        json.dump(labels, f)
    return lab, False


CASES = ["missing_band", "wrong_size", "empty_season", "unknown_location", "unknown_season"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_names_path_or_is_skipped_and_counted(tmp_path, case):
    root = str(tmp_path / "src")
    make_ssl4eo_tree(root)
    where, location_level = _break(root, case)
    lab = os.path.join(root, "ssl4eo_multilabel.json")
    with pytest.raises(BadInputError) as err:
        ssl4eo_s12.convert_tree(root, "s2c", str(tmp_path / "out"), num_shards=1, labels=lab)
    assert err.value.path == where
    assert not os.path.exists(tmp_path / "out" / "metadata.json")
    meta = ssl4eo_s12.convert_tree(root, "s2c", str(tmp_path / "out"), num_shards=1,
                                   labels=lab, skip_bad=True)
    assert meta["num_skipped"] == 1 and meta["skipped"][0]["path"] == where
    assert meta["num_records"] == (2 if location_level else 3)
    _, exs = read_all(str(tmp_path / "out"))
    assert len(exs) == meta["num_records"]


def test_cli_error_exit_and_skip_summary(tmp_path):
    root = str(tmp_path / "src")
    make_ssl4eo_tree(root)
    where, _ = _break(root, "missing_band")
    cmd = [sys.executable, "-m", "data_prep.ssl4eo_s12", "--root", root, "--modality", "s2c",
           "--out", str(tmp_path / "out"), "--num-shards", "2", "--num-workers", "0"]
    env = dict(os.environ, PYTHONPATH=REPO)
    bad = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    assert bad.returncode != 0 and where in bad.stderr
    ok = subprocess.run(cmd + ["--skip-bad"], capture_output=True, text=True, env=env, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert "2 records in 2 shards" in ok.stdout and "1 inputs skipped" in ok.stdout
    assert where in ok.stdout and where in ok.stderr  # summary + logged warning


def test_help_warns_about_lmdb_pickles():
    out = subprocess.run([sys.executable, "-m", "data_prep.ssl4eo_s12", "--help"],
                         capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=REPO)).stdout
    assert "TRUSTED FILES ONLY" in out and "pickles" in out


def test_lmdb_form_and_refusal_of_foreign_pickles(tmp_path):
    lmdb = pytest.importorskip("lmdb")
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 10000, (4, 13, 8, 8)).astype(np.uint16) for _ in range(3)]
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i, a in enumerate(arrays):
            txn.put(str(i).encode(), pickle.dumps((a.tobytes(), a.shape)))
        txn.put(b"3", pickle.dumps(Evil()))
    env.close()
    with pytest.raises(BadInputError, match="refusing"):
        ssl4eo_s12.convert_lmdb(str(tmp_path / "db"), "s2c", str(tmp_path / "out"), num_shards=2)
    # The refused run left an unfinished shard: only --resume may rewrite it.
    meta = ssl4eo_s12.convert_lmdb(str(tmp_path / "db"), "s2c", str(tmp_path / "out"),
                                   num_shards=2, skip_bad=True, resume=True)
    assert not marker.exists()
    assert meta["num_records"] == 3 and meta["num_skipped"] == 1
    _, exs = read_all(str(tmp_path / "out"))
    for a, ex in zip(arrays, exs):
        np.testing.assert_array_equal(ex["image"], a)


def test_parallel_output_is_deterministic(tmp_path):
    root = str(tmp_path / "src")
    make_ssl4eo_tree(root, n_loc=4)
    lab = os.path.join(root, "ssl4eo_multilabel.json")
    a = ssl4eo_s12.convert_tree(root, "s2c", str(tmp_path / "a"), num_shards=2, labels=lab,
                                num_workers=2)
    b = ssl4eo_s12.convert_tree(root, "s2c", str(tmp_path / "b"), num_shards=2, labels=lab,
                                num_workers=0)
    assert a["shards"] == b["shards"]
    for s in a["shards"]:
        assert (tmp_path / "a" / s).read_bytes() == (tmp_path / "b" / s).read_bytes()


_CALLS = []


def _flaky(item, fail_at=None, out_dir=None):
    _CALLS.append(item)
    if out_dir is not None and item == 1:
        # Mid-shard: the shard exists only under a temporary name.
        final = os.path.join(out_dir, shards.shard_filename("t", 0, 3))
        assert not os.path.exists(final)
        assert any(".tmp-" in f for f in os.listdir(out_dir))
    if item == fail_at:
        raise RuntimeError("simulated crash")
    return {"image": np.full((2, 1, 4, 4), item, np.uint8), "seasons": ["a", "b"],
            "location": str(item)}


def test_atomic_writes_and_resume(tmp_path):
    out = str(tmp_path / "out")
    kw = dict(name="t", num_shards=3, metadata={"dataset": "t"})
    with pytest.raises(RuntimeError, match="simulated"):
        shards.write_shards(out, range(6), lambda i: _flaky(i, fail_at=4, out_dir=out), **kw)
    names = sorted(os.listdir(out))
    assert names == [".shards", shards.shard_filename("t", 0, 3), shards.shard_filename("t", 1, 3)]
    done0 = os.stat(os.path.join(out, names[1])).st_mtime_ns
    _CALLS.clear()
    meta = shards.write_shards(out, range(6), _flaky, resume=True, **kw)
    assert _CALLS == [4, 5]  # finished shards were skipped
    assert os.stat(os.path.join(out, names[1])).st_mtime_ns == done0
    assert meta["num_records"] == 6
    fresh = shards.write_shards(str(tmp_path / "fresh"), range(6), _flaky, **kw)
    for s in fresh["shards"]:
        assert (tmp_path / "fresh" / s).read_bytes() == (tmp_path / "out" / s).read_bytes()
    _CALLS.clear()  # changed inputs invalidate the finished shards of an unfinished run
    os.remove(os.path.join(out, "metadata.json"))
    shards.write_shards(out, range(1, 7), _flaky, resume=True, **kw)
    assert _CALLS == [1, 2, 3, 4, 5, 6]


def test_synthetic_is_idempotent_realistic_and_labels_follow_content(tmp_path):
    out = str(tmp_path / "syn")
    meta = synthetic.write_dataset(out, num_locations=48, num_shards=2, image_size=16)
    first = os.stat(os.path.join(out, meta["shards"][0])).st_mtime_ns
    again = synthetic.write_dataset(out, num_locations=48, num_shards=2, image_size=16)
    assert again == meta and os.stat(os.path.join(out, meta["shards"][0])).st_mtime_ns == first
    _, exs = read_all(out)
    img = np.stack([e["image"] for e in exs]).astype(np.float64)  # (N, T, C, H, W)
    assert img.dtype == np.float64 and exs[0]["image"].dtype == np.uint16
    s2c_mean = np.array([1605.58, 1390.78, 1314.87, 1363.52, 1549.44, 2091.75, 2371.72,
                         2299.90, 2560.30, 830.07, 22.10, 2177.07, 1524.07])
    ratio = img.mean(axis=(0, 1, 3, 4)) / s2c_mean
    assert np.all((ratio > 0.5) & (ratio < 1.6)), ratio
    labels = np.stack([e["labels"] for e in exs]).reshape(-1, 9)
    has = np.stack([e["has_label"] for e in exs]).reshape(-1)
    assert 0 < (~has).sum() < has.sum()  # some seasons unlabelled
    # Water pixels are dark in NIR (B8): seasons labelled water have many of them.
    dark = (img[:, :, 7] < 1200).mean(axis=(2, 3)).reshape(-1)
    water = labels[:, 0].astype(bool) & has
    no_water = ~labels[:, 0].astype(bool) & has
    assert dark[water].mean() > 3 * dark[no_water].mean()


def test_verify_names_every_bad_record(tmp_path, capsys):
    out = str(tmp_path / "syn")
    meta = synthetic.write_dataset(out, num_locations=6, num_shards=2, image_size=8)
    assert verify.main([out, "--no-progress"]) == 0
    shard1 = os.path.join(out, meta["shards"][1])
    good = ArrayRecordReader(shard1).read_all()  # 3 locations x (1 + 4 seasons) records
    k = meta["records_per_location"]
    loc2 = records.decode(records.Location(good[2 * k], lambda t: good[2 * k + 1 + t]))
    bad = dict(loc2, image=np.asarray(loc2["image"]).astype(np.float32))  # wrong dtype
    w = ArrayRecordWriter(shard1, "group_size:1")
    for rec in [*good[:k], b"garbage", *good[k + 1:2 * k], *records.encode_location(bad)]:
        w.write(rec)
    w.close()
    assert verify.main([out, "--no-progress"]) == 1
    text = capsys.readouterr().out
    assert f"BAD {meta['shards'][1]} index 1: cannot read/decode" in text
    assert f"BAD {meta['shards'][1]} index 2: image dtype float32" in text
    assert "index 0" not in text
    assert "2 bad" in text
    # Bytes flipped inside a stored record are caught by the reader's checksums.
    shard0 = os.path.join(out, meta["shards"][0])
    raw = bytearray(open(shard0, "rb").read())
    raw[200:260] = bytes(b ^ 0xFF for b in raw[200:260])
    open(shard0, "wb").write(bytes(raw))
    assert verify.main([out, "--no-progress"]) == 1
    assert f"BAD {meta['shards'][0]} index 0" in capsys.readouterr().out


def test_missing_timestamp_folder_is_reported_despite_preview_files(tmp_path):
    root = str(tmp_path / "src")
    make_seco_tree(root, n_loc=1)
    loc = os.path.join(root, "000000")
    stamp = [d for d in sorted(os.listdir(loc)) if os.path.isdir(os.path.join(loc, d))][0]
    shutil.rmtree(os.path.join(loc, stamp))  # its preview <stamp>.tif stays behind
    with pytest.raises(BadInputError, match="expected 5 timestamp folders, found 4"):
        seco.convert(root, str(tmp_path / "out"), num_shards=1)

