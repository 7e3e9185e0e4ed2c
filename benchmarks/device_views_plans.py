"""What making the views on the accelerator costs: BENCHMARKS.md "Device augmentation in the
compiled pod step" and the device-view figures of "Augmentations on the device".

    python benchmarks/device_views_plans.py --json benchmarks/device_views_plans.json \
        [--slice v5litepod-4] [--global-batch 256] [--baseline-rev 720226a] \
        [--parts views,steps,cpu] [--timeout 1500]

Three parts, each written to the JSON when done (a run with the same --json skips what it
holds, so an interrupted run goes on where it stopped):

- ``views``: the device views alone (``Views.device_views`` of each recipe, the batch
  sharded over the slice) compiled for the TPU slice through libtpu on this CPU, with this
  checkout's ``softcon_jax/data/device_augment.py`` and with the one at ``--baseline-rev``
  (loaded from git in the same process): XLA's FLOPs and bytes accessed per chip, and the
  gathers / scatters / dynamic slices / sorts / pads left in the compiled HLO.
- ``steps``: each recipe's whole train step, ``python -m softcon_jax.plan`` with
  ``--config.data.augment_on=host`` (views in) and ``device`` (raw images and draws in,
  views in the step): TFLOP, GiB accessed and roofline ms per chip, and what device mode
  adds.
- ``cpu``: ``device_views`` jitted on this CPU for one recipe-shaped batch (SoftCon S2,
  264 px, 13 bands, two 224 px views), ms per sample, this checkout against
  ``--baseline-rev``, interleaved in the same run.

Needs libtpu for ``views`` and ``steps`` (``pip install -e .[tpu]``); no TPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RECIPES = {  # name: config
    "SoftCon ViT-S/14": "configs/softcon.py:vits14,s2c",
    "SoftCon ViT-B/14": "configs/softcon.py:vitb14,s2c",
    "SoftCon RN50": "configs/softcon.py:rn50,s2c",
    "SeCo RN50": "configs/seco.py:rn50",
}
# HLO instructions that move data by index or re-lay it out (the costly ones on a TPU).
HLO_OPS = ("gather", "scatter", "dynamic-slice", "dynamic-update-slice", "sort", "pad",
           "reverse", "transpose", "convolution", "dot")


def _load(spec: str):
    mod, _, arg = spec.partition(":")
    name = os.path.splitext(os.path.basename(mod))[0]
    import importlib
    return importlib.import_module(f"configs.{name}").get_config(arg or None)


@contextlib.contextmanager
def _device_augment_at(rev: str | None):
    """Swaps in ``softcon_jax/data/device_augment.py`` as it was at git ``rev``."""
    from softcon_jax.data import device_augment, views
    if rev is None:
        yield
        return
    src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:softcon_jax/data/device_augment.py"],
                         check=True, capture_output=True, text=True).stdout
    old = types.ModuleType("device_augment_" + rev)
    exec(compile(src, f"{rev}:device_augment.py", "exec"), old.__dict__)
    views.device_augment = old
    try:
        yield
    finally:
        views.device_augment = device_augment


def _device_views_fn(config, stored: int = 264):
    """(spec of one device-mode sample, device_views) for a recipe config."""
    from softcon_jax import methods, plan
    config.data.augment_on = "device"
    return plan._batch_spec(config, methods.get(config.method), stored)


def hlo_op_counts(hlo: str) -> dict:
    return {op: len(re.findall(rf"= \S+ {re.escape(op)}\(", hlo)) for op in HLO_OPS}


def views_part(name: str, slice_: str, batch: int, rev: str | None) -> dict:
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax
    jax.config.update("jax_platforms", "cpu")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from softcon_jax import plan
    _, n_chips, topology = plan.parse_accelerator_type(slice_)
    devices = plan._topology_devices(topology, 1)
    mesh = Mesh(devices, ("data",))
    sharding = NamedSharding(mesh, P("data"))
    config = _load(RECIPES[name])
    config.global_batch_size = batch
    with _device_augment_at(rev):
        spec, fn = _device_views_fn(config)
        abstract = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct((batch,) + tuple(s[0]), s[1], sharding=sharding),
            spec, is_leaf=lambda s: isinstance(s, tuple) and len(s) == 2
            and isinstance(s[0], tuple))
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(abstract).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops_per_device": float(cost.get("flops", 0.0)),
            "hbm_bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "per_device_batch": batch // len(devices), "devices": len(devices),
            "compile_s": round(time.perf_counter() - t0, 1),
            "hlo_ops": hlo_op_counts(compiled.as_text())}


def step_part(name: str, slice_: str, batch: int, mode: str, timeout: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "plan.json")
        cmd = [sys.executable, "-m", "softcon_jax.plan", "--config", RECIPES[name],
               "--accelerator-type", slice_, f"--config.global_batch_size={batch}",
               f"--config.data.augment_on={mode}", "--json", out]
        t0 = time.time()
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"status": f"not compiled within {timeout} s here"}
        if not os.path.exists(out):
            tail = (res.stderr.strip().splitlines() or ["?"])[-1]
            return {"status": f"failed: {tail[:200]}"}
        with open(out) as f:
            r = json.load(f)
    keep = ("flops_per_device", "hbm_bytes_accessed", "roofline_step_s", "per_device_batch",
            "fits", "memory_bytes", "compile_s")
    return {**{k: r.get(k) for k in keep}, "wall_s": round(time.time() - t0, 1)}


def cpu_part(rev: str, batch: int, repeats: int) -> dict:
    """ms per sample of the SoftCon S2 device views jitted on this CPU, new vs ``rev``."""
    import jax
    import numpy as np
    config = _load(RECIPES["SoftCon ViT-S/14"])
    rng = np.random.default_rng(0)
    fns, inputs = {}, None
    for label, r in (("new", None), ("baseline", rev)):
        with _device_augment_at(r):
            spec, fn = _device_views_fn(config)
            if inputs is None:
                inputs = jax.tree.map(
                    lambda s: _fake(rng, (batch,) + tuple(s[0]), np.dtype(s[1])), spec,
                    is_leaf=lambda s: isinstance(s, tuple) and len(s) == 2
                    and isinstance(s[0], tuple))
                inputs = _valid_draws(inputs)
            fns[label] = jax.jit(fn).lower(inputs).compile()
    times = {k: [] for k in fns}
    for _ in range(repeats):  # interleaved, so load changes hit both alike
        for k, f in fns.items():
            jax.block_until_ready(f(inputs))
            t = time.perf_counter()
            jax.block_until_ready(f(inputs))
            times[k].append((time.perf_counter() - t) / batch)
    return {k: {"ms_per_sample": statistics.median(v) * 1e3, "repeats": repeats}
            for k, v in times.items()} | {"batch": batch}


def _fake(rng, shape, dtype):
    import numpy as np
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 4000, shape).astype(dtype)
    return rng.random(shape).astype(dtype)


def _valid_draws(inputs):
    """Crop boxes inside the image, blur kernels that sum to one, orders a permutation."""
    import numpy as np
    rng = np.random.default_rng(1)
    for d in inputs["draws"].values():
        b = d["crop"].shape[0]
        h = rng.integers(40, 264, b)
        w = rng.integers(40, 264, b)
        d["crop"] = np.stack([rng.integers(0, 264 - h + 1), rng.integers(0, 264 - w + 1), h, w],
                             1).astype(np.int32)
        if "blur" in d:
            d["blur"] = d["blur"] / d["blur"].sum(1, keepdims=True)
        if "order" in d:
            d["order"] = np.tile(np.arange(4, dtype=np.int32), (b, 1))
        if "flags" in d:
            d["flags"] = (rng.random(d["flags"].shape) < 0.5).astype(np.float32)
    return inputs


def tables(results: dict) -> str:
    rows = ["| model | per-chip batch | TFLOP/chip/step host -> device | GiB accessed host -> "
            "device | roofline ms/step host -> device | added (bytes / FLOPs / roofline) |",
            "|---|---:|---:|---:|---:|---:|"]
    for name in RECIPES:
        h, d = results.get(f"step | {name} | host"), results.get(f"step | {name} | device")
        if not (h and d and "status" not in h and "status" not in d):
            rows.append(f"| {name} | | not compiled: {(h or d or {}).get('status', 'missing')}"
                        " | | | |")
            continue
        cols = {"flops_per_device": (1e-12, ".2f"), "hbm_bytes_accessed": (2.0**-30, ".1f"),
                "roofline_step_s": (1e3, ".1f")}
        cells = [f"{h[k] * u:{fmt}} -> {d[k] * u:{fmt}}" for k, (u, fmt) in cols.items()]
        added = [f"{(d[k] / h[k] - 1) * 100:+.1f} %"
                 for k in ("hbm_bytes_accessed", "flops_per_device", "roofline_step_s")]
        rows.append(f"| {name} | {d['per_device_batch']} | {' | '.join(cells)} | "
                    f"{' / '.join(added)} |")
    rows += ["", "| model | views alone: GFLOP/chip baseline -> new | GiB accessed/chip "
             "baseline -> new | gathers / dynamic slices / sorts / pads, baseline -> new |",
             "|---|---:|---:|---|"]
    for name in RECIPES:
        o, n = results.get(f"views | {name} | baseline"), results.get(f"views | {name} | new")
        if not (o and n):
            continue
        ops = ", ".join(f"{k} {o['hlo_ops'][k]} -> {n['hlo_ops'][k]}"
                        for k in ("gather", "dynamic-slice", "sort", "pad"))
        rows.append(f"| {name} | {o['flops_per_device'] / 1e9:.1f} -> "
                    f"{n['flops_per_device'] / 1e9:.1f} | {o['hbm_bytes_accessed'] / 2**30:.2f}"
                    f" -> {n['hbm_bytes_accessed'] / 2**30:.2f} | {ops} |")
    c = results.get("cpu")
    if c:
        rows.append(f"\nCPU, device_views of the SoftCon S2 recipe (batch {c['batch']}, jitted, "
                    f"median of {c['new']['repeats']} interleaved): baseline "
                    f"{c['baseline']['ms_per_sample']:.1f} ms/sample, new "
                    f"{c['new']['ms_per_sample']:.1f} ms/sample "
                    f"({c['baseline']['ms_per_sample'] / c['new']['ms_per_sample']:.2f}x).")
    return "\n".join(rows)


def _parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default="device_views_plans.json")
    p.add_argument("--slice", default="v5litepod-4")
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--baseline-rev", default="720226a",
                   help="git revision whose device_augment.py is the baseline")
    p.add_argument("--parts", default="views,steps,cpu")
    p.add_argument("--models", default=",".join(RECIPES))
    p.add_argument("--cpu-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--timeout", type=int, default=1500, help="Seconds per step compile.")
    return p.parse_args(argv)


def main(argv=None):
    a = _parse(argv)
    results = json.load(open(a.json)) if os.path.exists(a.json) else {}
    parts, models = a.parts.split(","), a.models.split(",")
    todo = []
    if "cpu" in parts:
        todo.append(("cpu", lambda: cpu_part(a.baseline_rev, a.cpu_batch, a.repeats)))
    for name in models:
        if "views" in parts:
            for label, rev in (("new", None), ("baseline", a.baseline_rev)):
                todo.append((f"views | {name} | {label}",
                             lambda n=name, r=rev: views_part(n, a.slice, a.global_batch, r)))
    for name in models:
        if "steps" in parts:
            for mode in ("device", "host"):
                todo.append((f"step | {name} | {mode}",
                             lambda n=name, m=mode: step_part(n, a.slice, a.global_batch, m,
                                                              a.timeout)))
    for key, fn in todo:
        if key in results and "status" not in results[key]:
            continue
        print(f"{key} ...", file=sys.stderr, flush=True)
        results[key] = fn()
        results["setting"] = {"slice": a.slice, "global_batch": a.global_batch,
                              "baseline_rev": a.baseline_rev}
        with open(a.json + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(a.json + ".tmp", a.json)
    print(tables(results))


if __name__ == "__main__":
    main()
