"""Input pipeline throughput: records/s and MB/s per worker.

Input: synthetic SSL4EO-S12-like records, 4 seasons x 13 x 264 x 264 uint16;
each record becomes two 224 x 224 SoftCon views (random resized crop, jitter,
grayscale, blur, flip, SoftCon normalisation). Measured in the same run:

- ``grain``: this project's pipeline (Grain MapDataset over ArrayRecord,
  vectorised NumPy augmentations), with 0 worker processes (everything in the
  main process, one thread) and with ``--workers`` processes; float32 views, and
  bfloat16 views (what the trainer ships for a bf16 model: half the bytes);
- ``augment_on='device'``: the same pipeline shipping the raw season images (uint16) and
  the random draws; the views are made on the accelerator (``data.device_views``), whose
  cost is measured here too (jitted on this CPU, and FLOPs / bytes from its compiled
  ``cost_analysis``);
- ``reference-style``: a per-sample loop as the reference PyTorch loaders do
  it (decode, then per-band normalise / crop / resize / jitter / blur / flip
  in plain NumPy + SciPy, then stack), single process.

MB/s counts a location's stored bytes (all four seasons), although with record schema 3
(one record per season) the pipelines read only the two seasons a sample uses.

    python benchmarks/input_pipeline.py            # a few minutes
    python benchmarks/input_pipeline.py --smoke    # seconds, tiny images
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from softcon_jax import data  # noqa: E402
from softcon_jax.data import (  # noqa: E402
    normalize,
    records,
    synthetic,  # noqa: E402
)


def _cfg(path: str, size: int, channels: int, workers: int, dtype: str, augment_on: str):
    cfg = data.default_config()
    cfg.path, cfg.image_size, cfg.in_channels, cfg.dtype = path, size, channels, dtype
    cfg.views, cfg.augment_on = "softcon", augment_on
    cfg.num_workers, cfg.read_threads = workers, 1
    return cfg


def _grain_rate(path: str, size: int, channels: int, batch: int, batches: int, workers: int,
                warmup: int, dtype: str = "float32", augment_on: str = "host"
                ) -> tuple[float, float]:
    """(records/s, bytes per sample shipped to the devices)."""
    cfg = _cfg(path, size, channels, workers, dtype, augment_on)
    it = iter(data.build_dataset(cfg, global_batch_size=batch, seed=0))
    for _ in range(warmup):
        b = next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t
    it.close()
    nbytes = sum(x.nbytes for x in jax.tree.leaves(b)) / batch
    return batches * batch / dt, nbytes


def _device_cost(path: str, size: int, channels: int, batch: int, dtype: str, repeats: int
                 ) -> tuple[float, float, float]:
    """Device-side views of one batch, jitted on this CPU: (s per sample, FLOPs per sample,
    bytes accessed per sample) from the compiled ``cost_analysis``."""
    cfg = _cfg(path, size, channels, 0, dtype, "device")
    b = next(iter(data.build_dataset(cfg, global_batch_size=batch, seed=0)))
    fn = jax.jit(data.build_device_views(cfg))
    compiled = fn.lower(b).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    b = jax.device_put(b)
    jax.block_until_ready(compiled(b))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(b))
        times.append(time.perf_counter() - t)
    return (statistics.median(times) / batch, float(cost.get("flops", 0.0)) / batch,
            float(cost.get("bytes accessed", 0.0)) / batch)


def _reference_view(img: np.ndarray, rng: np.random.Generator, size: int, mean, std,
                    blur_p: float) -> np.ndarray:
    """One view, band by band, the way the reference per-sample loaders work."""
    c, h, w = img.shape
    bands = []
    for b in range(c):  # per-band normalisation (SSL4EO-S12 style)
        lo, hi = mean[b] - 2 * std[b], mean[b] + 2 * std[b]
        bands.append(np.clip((img[b].astype(np.float64) - lo) / (hi - lo), 0, 1))
    area = h * w * rng.uniform(0.08, 1.0)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch = int(min(h, round(np.sqrt(area / ratio))))
    cw = int(min(w, round(np.sqrt(area * ratio))))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    out = []
    jitter = rng.random() < 0.8
    blur = rng.random() < blur_p
    sigma = rng.uniform(0.1, 2.0)
    flip = rng.random() < 0.5
    for band in bands:
        x = band[top:top + ch, left:left + cw]
        x = ndimage.zoom(x, (size / ch, size / cw), order=1, grid_mode=True, mode="nearest")
        if jitter:
            x = np.clip(x * rng.uniform(0.6, 1.4), 0, 1)
            m = x.mean()
            x = np.clip((x - m) * rng.uniform(0.6, 1.4) + m, 0, 1)
        if blur:
            x = ndimage.gaussian_filter(x, sigma)
        if flip:
            x = x[:, ::-1]
        out.append(x)
    view = np.stack(out, axis=-1).astype(np.float32)
    if rng.random() < 0.2:
        view[:] = view.mean(axis=-1, keepdims=True)
    return view


def _reference_rate(path: str, size: int, batch: int, batches: int) -> float:
    opened = data.open_dataset(path)
    meta, src = opened.meta, opened.source
    stats = normalize.STATS["s2c"]
    mean = [stats[b]["mean"] for b in meta["bands"]]
    std = [stats[b]["std"] for b in meta["bands"]]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(src))
    t = time.perf_counter()
    k = 0
    for _ in range(batches):
        v1, v2 = [], []
        for _ in range(batch):
            ex = records.decode(src[int(order[k % len(order)])])
            k += 1
            s1, s2 = rng.choice(ex["image"].shape[0], 2, replace=False)
            v1.append(_reference_view(ex["image"][s1], rng, size, mean, std, 1.0))
            v2.append(_reference_view(ex["image"][s2], rng, size, mean, std, 0.1))
        np.stack(v1), np.stack(v2)
    return batches * batch / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny, seconds: checks it runs")
    p.add_argument("--data", default="/tmp/softcon_bench_input")
    p.add_argument("--records", type=int, default=32)
    p.add_argument("--image-size", type=int, default=264)
    p.add_argument("--view-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=4, help="timed batches per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="worker processes for the grain row")
    p.add_argument("--machine", default=None, help="machine description for the table")
    a = p.parse_args()
    if a.smoke:
        a.data = a.data + "_smoke"
        a.records, a.image_size, a.view_size = 8, 40, 32
        a.batch_size, a.batches, a.repeats, a.workers = 4, 2, 1, 1

    meta = synthetic.write_dataset(a.data, num_locations=a.records, num_shards=4,
                                   image_size=a.image_size, bands=13, timesteps=4)
    rec_mb = meta["timesteps"] * 13 * a.image_size ** 2 * 2 / 1e6
    rows = []
    ours = "grain + vectorised NumPy (ours)"
    dev = "grain, augment_on='device' (raw uint16 + draws)"
    runs = [(ours, 0, "float32", "host"), (ours, 0, "bfloat16", "host"),
            (ours, a.workers, "float32", "host"), (dev, 0, "bfloat16", "device"),
            (dev, a.workers, "bfloat16", "device")]
    for name, workers, dtype, mode in runs:
        got = [_grain_rate(a.data, a.view_size, 13, a.batch_size, a.batches, workers,
                           warmup=max(1, workers) * 2, dtype=dtype, augment_on=mode)
               for _ in range(a.repeats)]
        rows.append((name, dtype, f"{workers} (main process)" if workers == 0 else
                     str(workers), max(workers, 1), statistics.median(r for r, _ in got),
                     got[0][1]))
    base = [_reference_rate(a.data, a.view_size, a.batch_size, a.batches)
            for _ in range(a.repeats)]
    host_bytes = 2 * a.view_size ** 2 * 13 * 4 + 2 * 9 * 4
    rows.append(("reference-style per-sample loop", "float32", "0 (main process)", 1,
                 statistics.median(base), host_bytes))
    sec, flops, acc = _device_cost(a.data, a.view_size, 13, a.batch_size, "bfloat16",
                                   a.repeats)

    machine = a.machine or f"{os.cpu_count()}-core CPU ({platform.machine()})"
    cmd = "python benchmarks/input_pipeline.py" + (" --smoke" if a.smoke else "")
    print(f"\nInput pipeline: {a.records} records of 4 x 13 x {a.image_size}^2 uint16 -> "
          f"two {a.view_size}x{a.view_size}x13 views; batch {a.batch_size}, "
          f"median of {a.repeats} x {a.batches} batches.")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"Command: `{cmd}`; machine: {machine}; load average during run: {load}.\n")
    print("| pipeline | views | MB/sample to the devices | worker processes | records/s "
          "| records/s per worker | MB/s per worker | vs baseline (per worker) |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    ref = rows[-1][4]
    for name, dtype, workers, n, rate, nbytes in rows:
        print(f"| {name} | {dtype} | {nbytes / 1e6:.2f} | {workers} | {rate:.1f} "
              f"| {rate / n:.1f} | {rate / n * rec_mb:.1f} | {rate / n / ref:.2f}x |")
    host0 = next(r[4] for r in rows if r[1] == "bfloat16" and r[0] == ours)
    dev0 = next(r[4] for r in rows if r[0] == dev and r[3] == 1)
    print(f"\nPer core (main process, bf16 views): device mode {dev0:.1f} records/s vs host "
          f"mode {host0:.1f}: {dev0 / host0:.1f}x.")
    print(f"Device-side views (jit on this CPU, batch {a.batch_size}): {sec * 1e3:.1f} ms per "
          f"sample; compiled cost {flops / 1e6:.1f} MFLOP and {acc / 1e6:.1f} MB accessed "
          "per sample.")


if __name__ == "__main__":
    main()
