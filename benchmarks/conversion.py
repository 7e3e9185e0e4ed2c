"""Conversion speed: locations/s per core for S2, S1 and SeCo, before and after, one run.

Builds realistic GeoTIFF trees here (S2 L1C: 13 single-band files per season, 10 m bands
264 px, 20 m 132 px, 60 m 44 px, 4 seasons = 52 files per location; S1: 2 float32 bands;
SeCo: 12 uint8 bands, 5 timestamps) and converts them:

- ``before`` / ``after``: ``data_prep`` and ``softcon_jax`` of git revision ``--baseline``
  (extracted into a temporary folder) against the working tree, each in a fresh subprocess,
  in this process (no worker pool), alternating, ``--repeats`` times. Per core = locations
  per CPU-second of the converting process (user + system time, threads included), so
  concurrent band reads do not count as speed they borrow from other cores. Two measures:
  the whole command after a warm-up conversion (includes per-run costs: scanning, markers,
  metadata, fsync), and the per-location CPU cost in one process (``per_location_cpu_ms``:
  reading a location, and reading + encoding + writing it; min of 3 after a warm-up), which
  is what a conversion of 250k locations is made of.
- ``stages``: where a location's time goes in the baseline (cProfile of one conversion,
  grouped: opening GeoTIFFs, reading pixels, listing/existence checks, resampling,
  encoding + writing).
- ``workers``: wall-clock locations/s of the working tree with 1 and 2 worker processes.
- ``beam``: the DirectRunner (``--engine beam``, one worker) against the local engine
  (``--num-workers 0``) on the same tree: its overhead.

Prints a Markdown table and writes JSON next to ``--out``. Outputs of before and after are
compared byte for byte (they must be equal).

    python benchmarks/conversion.py --locations 12 --out benchmarks/results/conversion.json
    python benchmarks/conversion.py --smoke --out /tmp/conversion.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = {"B1": 60, "B2": 10, "B3": 10, "B4": 10, "B5": 20, "B6": 20, "B7": 20, "B8": 10,
       "B8A": 20, "B9": 60, "B10": 60, "B11": 20, "B12": 20, "VV": 10, "VH": 10}
S2C = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
SECO = [b for b in S2C if b != "B10"]


def _write_tif(path, arr):
    import rasterio
    from rasterio.transform import Affine

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", height=arr.shape[0], width=arr.shape[1],
                       count=1, dtype=arr.dtype, crs="EPSG:32632",
                       transform=Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5500000.0)) as dst:
        dst.write(arr, 1)


def make_tree(root, kind, n, size=264):
    rng = np.random.default_rng(0)
    bands, dtype, steps = {"s2c": (S2C, np.uint16, 4), "s1": (["VV", "VH"], np.float32, 4),
                           "seco": (SECO, np.uint8, 5)}[kind]
    base = os.path.join(root, kind) if kind != "seco" else os.path.join(root, "seco")
    for i in range(n):
        for t in range(steps):
            season = f"2020{2 * t + 1:02d}15T101021_2020{2 * t + 1:02d}15T101047_T32UQD"
            for b in bands:
                px = size * 10 // RES[b]
                if dtype == np.float32:
                    arr = rng.normal(-15, 5, (px, px)).astype(np.float32)
                else:
                    arr = rng.integers(0, 255 if dtype == np.uint8 else 12000,
                                       (px, px)).astype(dtype)
                _write_tif(os.path.join(base, f"{i:07d}", season, f"{b}.tif"), arr)


CONVERT = r"""
import json, resource, sys, time
kind, root, out, workers, engine = sys.argv[1:6]
from data_prep import ssl4eo_s12, seco
kw = dict(num_shards=4, num_workers=int(workers))
if engine != "local":
    kw.update(engine="beam", beam_args=("--runner=DirectRunner", "--direct_num_workers=1"))
def run(dest):
    if kind == "seco":
        seco.convert(root + "/seco", dest, **kw)
    else:
        ssl4eo_s12.convert_tree(root, kind, dest, **kw)
run(out + "_warmup")  # lazy imports, GDAL and the page cache warmed: not per-location costs
r0 = resource.getrusage(resource.RUSAGE_SELF); c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
t0 = time.perf_counter()
run(out)
wall = time.perf_counter() - t0
r1 = resource.getrusage(resource.RUSAGE_SELF); c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = sum(getattr(b, f) - getattr(a, f) for a, b in ((r0, r1), (c0, c1))
          for f in ("ru_utime", "ru_stime"))
print(json.dumps({"wall": wall, "cpu": cpu}))
"""


PER_LOCATION = r"""
import functools, inspect, json, sys, time
kind, root, out = sys.argv[1:4]
from array_record.python.array_record_module import ArrayRecordWriter
from data_prep import seco, ssl4eo_s12
from softcon_jax.data import records
if kind == "seco":
    tree = {loc: seco.geotiff.list_dirs_by_date(f"{root}/seco/{loc}")
            for loc in seco.geotiff.list_dirs(f"{root}/seco")}
    items = [(loc, tree[loc]) for loc in sorted(tree)]
    fn = functools.partial(seco.make_example, root=f"{root}/seco", size=SIZE, timesteps=5)
else:
    tree = ssl4eo_s12.scan_tree(f"{root}/{kind}")
    items = [(loc, tree[loc], None) for loc in sorted(tree)]
    kw = dict(loc_root=f"{root}/{kind}", timesteps=4, labels_path="")
    if "spec" in inspect.signature(ssl4eo_s12.make_example).parameters:
        from data_prep import geotiff
        dtype = ssl4eo_s12.DTYPE[kind]
        kw["spec"] = geotiff.Season(tuple(ssl4eo_s12.BANDS[kind]), SIZE, dtype, kind)
    else:
        kw.update(bands=ssl4eo_s12.BANDS[kind], size=SIZE, dtype=ssl4eo_s12.DTYPE[kind])
    fn = functools.partial(ssl4eo_s12.make_example, **kw)
def run():
    writer = ArrayRecordWriter(out, "group_size:1,uncompressed")
    read = 0.0
    t0 = time.process_time()
    for item in items:
        t = time.process_time()
        ex = fn(item)
        read += time.process_time() - t
        ex.pop("num_nonfinite_filled", None)
        for part in records.encode_location(ex):
            writer.write(part)
    writer.close()
    return read, time.process_time() - t0
run()  # warm-up
runs = [run() for _ in range(3)]
print(json.dumps({"read": min(r[0] for r in runs) / len(items),
                  "total": min(r[1] for r in runs) / len(items)}))
"""


def per_location(pythonpath, kind, root, out, size):
    """CPU seconds per location in one process: reading (list, open, read, check, resample)
    and in total (plus encoding and writing), min of 3 after a warm-up; no fixed costs."""
    env = dict(os.environ, PYTHONPATH=pythonpath)
    res = subprocess.run([sys.executable, "-c", PER_LOCATION.replace("SIZE", str(size)),
                          kind, root, out], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(out))
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def convert(pythonpath, kind, root, out, workers=0, engine="local"):
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out + "_warmup", ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=pythonpath, TQDM_DISABLE="1")
    # Not in the repository: with `python -c`, sys.path[0] is the working directory, which
    # would shadow the baseline on PYTHONPATH.
    res = subprocess.run([sys.executable, "-c", CONVERT, kind, root, out, str(workers),
                          engine], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(out))
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


STAGES = {  # matched in order against "<file>:<function>" of each profiled function
    "open GeoTIFF (rasterio.open)": ("rasterio/__init__.py:open", "rasterio/env.py",
                                     "rasterio/_path.py", "rasterio/crs", "rasterio/io.py",
                                     "logging/__init__.py:debug", "affine"),
    # Cython methods are not profiled separately: src.read(1) is counted in its caller.
    "read pixels": ("geotiff.py:_open_band", "geotiff.py:read_band"),
    "list folders / existence checks": ("posix.stat", "posix.listdir", "posix.scandir",
                                        "genericpath.py", "storage.py:scandir"),
    "resample (bilinear)": ("augment.py", ":to_grid", "_methods.py:_clip", "'astype'",
                            "'clip'", "'rint'"),
    "encode + write shard": ("records.py", "array_record", "'tobytes'", "posix.fsync"),
}


def stage_split(pythonpath, kind, root, out):
    """{stage: fraction of the time} of one in-process conversion under cProfile."""
    prof = os.path.join(out + "_prof")
    shutil.rmtree(out, ignore_errors=True)
    stmt = (f"ssl4eo_s12.convert_tree({root!r}, {kind!r}, {out!r}, num_shards=4, "
            f"num_workers=0)")
    code = f"import cProfile; from data_prep import ssl4eo_s12; cProfile.run({stmt!r}, {prof!r})"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=pythonpath, TQDM_DISABLE="1"),
                   cwd=os.path.dirname(out))
    import pstats

    stats = pstats.Stats(prof).stats  # {(file, line, func): (cc, nc, tt, ct, callers)}
    total = sum(v[2] for v in stats.values())
    split = dict.fromkeys(STAGES, 0.0)
    split["other"] = 0.0
    for (file, _, func), v in stats.items():
        name = f"{file}:{func}"
        for stage, keys in STAGES.items():
            if any(k in name for k in keys):
                split[stage] += v[2]
                break
        else:
            split["other"] += v[2]
    return {k: v / total for k, v in split.items()}, total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--locations", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline", default="720226a", help="git revision of the 'before'")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks/results/conversion.json"))
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--size", type=int, default=264, help="10 m grid size in px")
    p.add_argument("--smoke", action="store_true",
                   help="seconds: 4 tiny locations, one repeat (checks the script runs)")
    a = p.parse_args(argv)
    if a.smoke:
        a.locations, a.repeats, a.size = 4, 1, 24
    work = a.work or tempfile.mkdtemp(prefix="conv-bench-")
    root = os.path.join(work, "tree")
    old = os.path.join(work, "baseline")
    before_path, after_path = old, REPO
    if not os.path.isdir(os.path.join(old, "data_prep")):
        os.makedirs(old, exist_ok=True)
        # The library too: the converters' record encoding and shard writer live there.
        tar = subprocess.run(["git", "archive", a.baseline, "data_prep", "softcon_jax"],
                             cwd=REPO, capture_output=True)
        if tar.returncode:  # e.g. a shallow clone without the baseline revision
            print(f"baseline {a.baseline} not in this checkout; 'before' = the working tree")
            before_path = REPO
        else:
            subprocess.run(["tar", "-x", "-C", old], input=tar.stdout, check=True)
    for kind in ("s2c", "s1", "seco"):
        if not os.path.isdir(os.path.join(root, kind)):
            make_tree(root, kind, a.locations, a.size)
    result = {"machine": f"{platform.processor() or platform.machine()}, "
                         f"{os.cpu_count()} cores (shared with other jobs)",
              "locations": a.locations, "baseline": a.baseline, "rates": {}}
    for kind in ("s2c", "s1", "seco"):
        runs = {"before": [], "after": []}
        for _ in range(a.repeats):
            for which, path in (("before", before_path), ("after", after_path)):
                r = convert(path, kind, root, os.path.join(work, f"out_{which}"))
                runs[which].append(r)
        for s in sorted(os.listdir(os.path.join(work, "out_after"))):
            if s.endswith(".array_record"):
                with open(os.path.join(work, "out_before", s), "rb") as f1, \
                        open(os.path.join(work, "out_after", s), "rb") as f2:
                    assert f1.read() == f2.read(), f"{kind} {s} differs"
        rate = {w: statistics.median(a.locations / r["cpu"] for r in runs[w])
                for w in runs}
        wall = {w: statistics.median(a.locations / r["wall"] for r in runs[w]) for w in runs}
        marginal = {"before": [], "after": []}
        for _ in range(2):
            for which, path in (("before", before_path), ("after", after_path)):
                marginal[which].append(per_location(
                    path, kind, root, os.path.join(work, f"loc_{which}.ar"), a.size))
        loc = {w: {k: min(m[k] for m in marginal[w]) for k in ("read", "total")}
               for w in marginal}
        result.setdefault("per_location_cpu_ms", {})[kind] = {
            w: {k: 1000 * v for k, v in loc[w].items()} for w in loc}
        result["rates"][kind] = {"per_core_before": rate["before"],
                                 "per_core_after": rate["after"],
                                 "ratio": rate["after"] / rate["before"],
                                 "wall_before": wall["before"], "wall_after": wall["after"]}
        print(kind, result["rates"][kind], flush=True)
    result["stages_before"], total = stage_split(before_path, "s2c", root,
                                                 os.path.join(work, "out_prof"))
    result["stages_after"], _ = stage_split(after_path, "s2c", root,
                                            os.path.join(work, "out_prof"))
    result["workers"] = {}
    for w in (1, 2):
        runs = [convert(after_path, "s2c", root, os.path.join(work, "out_w"), workers=w)
                for _ in range(a.repeats)]
        result["workers"][w] = statistics.median(a.locations / r["wall"] for r in runs)
    runs = {"local": [], "beam": []}
    for _ in range(a.repeats):
        for eng in runs:
            runs[eng].append(convert(after_path, "s2c", root, os.path.join(work, f"out_{eng}"),
                                     engine=eng))
    result["beam"] = {eng: statistics.median(r["wall"] for r in runs[eng]) for eng in runs}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
