"""Speed of one pretraining step (JAX): images/s, step time, compile time, memory, MFU.

For each case (SoftCon RN50 / ViT-S/14 / ViT-B/14 on 13 bands, SeCo RN18 / RN50 on RGB, at
224 px) the script builds the trainer's own state and step (`softcon_jax.state`, `.step`: the same
sharding, donation, loss, optimizer and EMA/queue updates), feeds one random batch that is
placed on the devices once (`sharding.host_batch_to_global`), so only the step is measured,
and reports:

* images/s = global batch / median step time; step time = median over `--steps` timed steps
  after `--warmup` steps, each timed from the call to `block_until_ready` of its outputs;
* dispatch: median time for the compiled call to return, before blocking (host overhead);
* with `--pipelined` also steps issued back to back, and the trainer's loop pattern (a
  fresh host batch every step, placed on the devices by the trainer's `DevicePrefetcher`
  thread, `config.prefetch_to_device` ahead), to expose input-transfer and dispatch costs;
* views in the dtype the trainer ships them in: the model's compute dtype (bf16 halves the
  host-to-device bytes; the first layer would round to it anyway);
* compile: `jit(...).lower(...)` and `.compile()` timed separately; the compiled object is
  the one that runs;
* peak memory per device: `device.memory_stats()['peak_bytes_in_use']` where the runtime
  has it (GPU, TPU), else XLA's compiled estimate (`memory_analysis()`), and the table says
  which;
* MFU = FLOPs per device per step (`compiled.cost_analysis()['flops']`, the partitioned
  program, i.e. one device's share) / step time / peak FLOP/s of the device (table below,
  or `--peak-flops`); n/a on CPU unless `--peak-flops` is given.

Usage:
  python benchmarks/train_step.py --per-device-batch 64               # all cases, all devices
  python benchmarks/train_step.py --cases softcon_vitb14 --dtype bfloat16,float32 --json r.json
  XLA_FLAGS=--xla_force_host_platform_device_count=1 python benchmarks/train_step.py \
      --per-device-batch 2 --steps 3                                   # CPU
  python benchmarks/train_step.py --smoke    # tiny models, XLA -O0 on CPU: ~40 s; for CI
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import train_cases

# Dense peak FLOP/s per device: (substring of jax `device_kind`, bf16, fp32). fp32 on NVIDIA
# is the TF32 tensor-core peak: JAX's default matmul precision uses TF32 there. TPUs run
# fp32 matmuls as bf16 passes, so no separate fp32 peak is claimed (MFU n/a).
PEAK_FLOPS = (
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494e12),  # SXM
    ("H200", 989e12, 494e12),
    ("GH200", 989e12, 494e12),
    ("A100", 312e12, 156e12),
    ("TPU v4", 275e12, None),
    ("TPU v5 lite", 197e12, None),  # v5e
    ("TPU v5e", 197e12, None),
    ("TPU v5p", 459e12, None),
    ("TPU v5", 459e12, None),
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """Peak dense FLOP/s of one device for `dtype`, or None when unknown (CPU)."""
    for pattern, bf16, fp32 in PEAK_FLOPS:
        if pattern.lower() in device_kind.lower():
            return bf16 if dtype == "bfloat16" else fp32
    return None


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(train_cases.DEFAULT_CASES),
                   help=f"comma-separated, from {', '.join(train_cases.CASES)}")
    p.add_argument("--per-device-batch", type=int, default=32,
                   help="images per device per view; global batch = this x devices")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", default="auto",
                   help="compute dtype(s), comma-separated: bfloat16, float32, or auto "
                        "(bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--num-devices", type=int, default=None,
                   help="use the first N devices (default: all)")
    p.add_argument("--attention", default=None, choices=["cudnn"],
                   help="ViT attention implementation (default XLA); cudnn: flash attention "
                        "on NVIDIA GPUs in bf16")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="peak FLOP/s per device for MFU (overrides the built-in table)")
    p.add_argument("--pipelined", action="store_true",
                   help="also time --steps steps issued back to back (one block at the end), "
                        "then the same with a fresh host->device batch per step as the "
                        "trainer's loop does, with and without device prefetch (JSON: "
                        "pipelined_step_s, loop_step_s, loop_sync_step_s, host_to_device_ms)")
    p.add_argument("--no-isolate", action="store_true",
                   help="run every case in this process (by default several cases each get "
                        "a subprocess, so peak device memory is per case; --smoke implies "
                        "this flag)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny models, image {train_cases.SMOKE_IMAGE_SIZE}, batch "
                        f"{train_cases.SMOKE_BATCH} per device, {train_cases.SMOKE_STEPS} "
                        "steps: checks the script runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.image_size = train_cases.SMOKE_IMAGE_SIZE
        args.per_device_batch = train_cases.SMOKE_BATCH
        args.steps, args.warmup = train_cases.SMOKE_STEPS, 1
    args.cases = train_cases.parse_cases(args.cases)
    if args.steps < 1 or args.warmup < 0 or args.per_device_batch < 1:
        p.error("--steps and --per-device-batch must be >= 1, --warmup >= 0")
    return args


# --------------------------------------------------------------------------- one case


def _random_batch(method, rows: int, view_dtype, seed: int = 0) -> dict:
    """Host-local random batch shaped like the method's input; labels are multi-hot."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: method.example_batch(rows))
    batch = {}
    for name, spec in shapes.items():
        if name.startswith("labels"):
            batch[name] = (rng.random(spec.shape) < 0.3).astype(spec.dtype)
        else:
            batch[name] = rng.standard_normal(spec.shape, dtype=np.float32).astype(view_dtype)
    return batch


class _Repeat:
    """The same host batch forever, with the iterator state protocol of Grain."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __next__(self) -> dict:
        return self.batch

    def get_state(self) -> dict:
        return {}

    def set_state(self, state) -> None:
        del state


def _peak_memory(devices, compiled) -> tuple[int | None, str]:
    """(bytes, source): runtime peak where the device reports it, else XLA's estimate."""
    peaks = []
    for d in devices:
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    if peaks:
        return max(peaks), "device peak"
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None, "n/a"
    if m is None:
        return None, "n/a"
    peak = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    if peak:
        return peak, "XLA peak est."
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    return int(total), "XLA arg+out+temp-alias"


def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def measure_case(case: str, dtype: str, args, devices) -> dict:
    """Builds the trainer's state and step for `case` and times it; returns one result row."""
    import jax
    import numpy as np

    from softcon_jax import data, methods, optim, sharding
    from softcon_jax.state import create_train_state
    from softcon_jax.step import jit_train_step

    n_dev = len(devices)
    local = [d for d in devices if d.process_index == jax.process_index()]
    config = train_cases.build_config(case, global_batch=args.per_device_batch * n_dev,
                                      image_size=args.image_size, dtype=dtype,
                                      smoke=args.smoke)
    if args.attention and "attention" in config.model.backbone_kwargs:
        config.model.backbone_kwargs.attention = args.attention
    mesh = sharding.make_mesh(config.mesh, devices)
    method = methods.get(config.method)(config, mesh)
    tx, schedule = optim.make_optimizer(config)
    init_fn, rng, _, shardings = create_train_state(config, method, tx, mesh)
    state = jax.block_until_ready(init_fn(rng))
    # As the trainer: views in config.data.dtype, else the model's compute dtype.
    view_dtype = data.view_dtype(config.data.get("dtype") or config.model.dtype)
    host_batch = _random_batch(method, args.per_device_batch * len(local), view_dtype)
    batch = jax.block_until_ready(sharding.host_batch_to_global(host_batch, mesh))

    step_fn = jit_train_step(config, method, tx, schedule, mesh, shardings)
    t0 = time.perf_counter()
    lowered = step_fn.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()

    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))

    step_times, dispatch_times = [], []
    for _ in range(args.steps):
        s0 = time.perf_counter()
        state, metrics = compiled(state, batch)  # the state is donated, as in the trainer
        s1 = time.perf_counter()
        jax.block_until_ready((state, metrics))
        s2 = time.perf_counter()
        dispatch_times.append(s1 - s0)
        step_times.append(s2 - s0)

    pipelined = loop = loop_sync = h2d = None
    if args.pipelined:
        # Back to back, one block at the end: what the device sustains.
        s0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        pipelined = (time.perf_counter() - s0) / args.steps
        # Host-to-device time of one batch, measured alone.
        h2d_times = []
        for _ in range(3):
            t = time.perf_counter()
            jax.block_until_ready(sharding.host_batch_to_global(host_batch, mesh))
            h2d_times.append(time.perf_counter() - t)
        h2d = 1e3 * statistics.median(h2d_times)
        # The trainer's pattern: a fresh host batch every step, placed on the devices by
        # the DevicePrefetcher thread while the previous steps run; baseline: placed in the
        # loop's own thread (prefetch_to_device=0), as before the prefetcher.
        loop = {}
        for ahead in (0, config.prefetch_to_device):
            batches = data.DevicePrefetcher(_Repeat(host_batch),
                                            lambda b: sharding.host_batch_to_global(b, mesh),
                                            ahead)
            state, metrics = compiled(state, next(batches))  # starts the thread
            jax.block_until_ready((state, metrics))
            s0 = time.perf_counter()
            for _ in range(args.steps):
                state, metrics = compiled(state, next(batches))
            jax.block_until_ready((state, metrics))
            loop[ahead] = (time.perf_counter() - s0) / args.steps
            batches.close()
        loop_sync, loop = loop[0], loop[config.prefetch_to_device]

    loss = float(jax.device_get(metrics["loss/total"]))
    step_s = statistics.median(step_times)
    flops = _flops(compiled)
    peak = args.peak_flops or peak_flops(devices[0].device_kind, dtype)
    mem, mem_source = _peak_memory(local, compiled)
    row = {
        "case": case, "framework": "jax", "dtype": dtype, "devices": n_dev,
        "device_kind": devices[0].device_kind, "per_device_batch": args.per_device_batch,
        "global_batch": config.global_batch_size, "image_size": args.image_size,
        "in_channels": config.data.in_channels, "backbone": config.model.backbone,
        "attention": config.model.backbone_kwargs.get("attention") or "xla",
        "optimizer": config.optimizer.name,
        "images_per_s": config.global_batch_size / step_s,
        "images_per_s_per_device": args.per_device_batch / step_s,
        "step_s": step_s, "step_s_all": step_times,
        "dispatch_ms": 1e3 * statistics.median(dispatch_times),
        "lower_s": t1 - t0, "compile_s": t2 - t1,
        "pipelined_step_s": pipelined, "loop_step_s": loop, "loop_sync_step_s": loop_sync,
        "prefetch_to_device": config.prefetch_to_device, "host_to_device_ms": h2d,
        "view_dtype": str(view_dtype),
        "batch_bytes_per_process": int(sum(x.nbytes for x in host_batch.values())),
        "peak_mem_bytes": mem, "mem_source": mem_source,
        "flops_per_step_per_device": flops,
        "achieved_flops_per_device": flops / step_s if flops else None,
        "peak_flops_per_device": peak,
        "mfu": flops / step_s / peak if flops and peak else None,
        "loss": loss, "finite": bool(np.isfinite(loss)),
        "state_leaves": len(jax.tree.leaves(state)),
    }
    del state, metrics, compiled, lowered, batch
    return row


def _print_row(row: dict) -> None:
    if "error" in row:
        print(f"{row['case']} {row.get('dtype', '')}: {row['error']}", flush=True)
        return
    print(f"{row['case']} {row['dtype']}: {row['images_per_s']:.2f} img/s, "
          f"step {1e3 * row['step_s']:.1f} ms, "
          f"compile {row['lower_s'] + row['compile_s']:.1f} s, "
          f"dispatch {row['dispatch_ms']:.2f} ms", flush=True)
    if row.get("pipelined_step_s"):
        print(f"  back to back {1e3 * row['pipelined_step_s']:.1f} ms/step; "
              f"trainer loop (fresh batch each step) {1e3 * row['loop_step_s']:.1f} ms/step "
              f"with device prefetch, {1e3 * row['loop_sync_step_s']:.1f} ms/step without; "
              f"host->device {row['host_to_device_ms']:.2f} ms", flush=True)


def _run_here(args) -> tuple[list[dict], dict]:
    """All (case, dtype) pairs in this process."""
    import jax

    devices = jax.devices()[: args.num_devices] if args.num_devices else jax.devices()
    platform = devices[0].platform
    dtypes = (["float32"] if platform == "cpu" else ["bfloat16"]) if args.dtype == "auto" \
        else [d.strip() for d in args.dtype.split(",")]
    info = {"jax": jax.__version__, "platform": platform,
            "device_kind": devices[0].device_kind, "devices": len(devices)}
    rows = []
    for case in args.cases:
        for dtype in dtypes:
            try:
                row = measure_case(case, dtype, args, devices)
            except Exception as e:  # noqa: BLE001 - one failing case (e.g. OOM) keeps the rest
                traceback.print_exc()
                row = {"case": case, "framework": "jax", "dtype": dtype,
                       "devices": len(devices), "per_device_batch": args.per_device_batch,
                       "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
            rows.append(row)
            _print_row(row)
    return rows, info


def _run_isolated(args) -> tuple[list[dict], dict]:
    """Each (case, dtype) in a fresh subprocess: the device's peak memory, compilation
    caches and allocator state then belong to that case alone. This process never starts
    a JAX backend (it would hold accelerator memory)."""
    rows, info = [], {}
    for case in args.cases:
        for dtype in args.dtype.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "row.json")
                cmd = [sys.executable, os.path.abspath(__file__), "--cases", case,
                       "--dtype", dtype.strip(), "--json", out, "--no-isolate",
                       "--per-device-batch", str(args.per_device_batch),
                       "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--image-size", str(args.image_size)]
                if args.smoke:
                    cmd.append("--smoke")
                if args.pipelined:
                    cmd.append("--pipelined")
                if args.num_devices:
                    cmd += ["--num-devices", str(args.num_devices)]
                if args.peak_flops:
                    cmd += ["--peak-flops", str(args.peak_flops)]
                if args.attention:
                    cmd += ["--attention", args.attention]
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)
                if os.path.exists(out):
                    with open(out) as f:
                        result = json.load(f)
                    info = {k: v for k, v in result["info"].items()
                            if k in ("jax", "platform", "device_kind", "devices")}
                    case_rows = result["results"]
                else:
                    print(proc.stdout[-3000:], file=sys.stderr)
                    case_rows = [{"case": case, "framework": "jax", "dtype": dtype,
                                  "per_device_batch": args.per_device_batch,
                                  "error": f"worker exited with {proc.returncode}"}]
            for row in case_rows:
                rows.append(row)
                _print_row(row)
    return rows, info


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args.smoke and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        # Smoke runs check the script, not speed: LLVM -O0 halves the CPU compile time.
        # Set before jax is imported (this module imports it lazily).
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_backend_optimization_level=0").strip()
    isolate = (not args.no_isolate and not args.smoke
               and len(args.cases) * len(args.dtype.split(",")) > 1)
    load_before = train_cases.machine_info().get("load_avg")
    print(f"# JAX train step; host {os.cpu_count()} CPUs, load {load_before}"
          + ("; one subprocess per case" if isolate else ""), flush=True)
    rows, info = _run_isolated(args) if isolate else _run_here(args)
    info = {**train_cases.machine_info(), **info,
            "command": " ".join(["python"] + sys.argv), "load_avg_before": load_before}
    info["load_avg_after"] = info.pop("load_avg", None)
    print(f"\n# {info.get('devices', '?')} x {info.get('device_kind', '?')} "
          f"({info.get('platform', '?')}), jax {info.get('jax', '?')}\n")
    print(train_cases.markdown_table(rows))
    print(f"\nLoad average (1, 5, 15 min) before: {load_before}, after: "
          f"{info['load_avg_after']}.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": rows}, f, indent=1)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
