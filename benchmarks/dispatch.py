"""Dispatch cost per pytree leaf: how much of a step's host overhead the state's size sets.

A jitted step's call returns once its arguments are checked and the program is enqueued;
the C++ fast path does work per argument leaf. This times a trivial donated
`jit(lambda xs: [x + 1 for x in xs])` over N small leaves (median of `--repeats` calls, each
blocked before the next), so the per-leaf cost can be set against the train states' leaf
counts (`train_step.py` JSON: `state_leaves`). Baseline: the same call with 1 leaf.

    python benchmarks/dispatch.py [--leaves 1,10,100,1000] [--repeats 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def dispatch_ms(num_leaves: int, repeats: int) -> float:
    import jax
    import jax.numpy as jnp

    step = jax.jit(lambda xs: [x + 1 for x in xs], donate_argnums=0)
    xs = jax.block_until_ready(step([jnp.ones((4,), jnp.float32) for _ in range(num_leaves)]))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        xs = step(xs)
        times.append(time.perf_counter() - t)
        jax.block_until_ready(xs)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--leaves", default="1,10,100,1000")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--smoke", action="store_true", help="few leaves and repeats; for CI")
    args = p.parse_args(argv)
    if args.smoke:
        args.leaves, args.repeats = "1,10", 3
    import jax

    counts = [int(n) for n in args.leaves.split(",")]
    rows = [(n, dispatch_ms(n, args.repeats)) for n in counts]
    base = rows[0][1]
    device = jax.devices()[0]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nDispatch of a donated jit over N leaves: {device.device_kind} ({device.platform}),"
          f" jax {jax.__version__}; median of {args.repeats} calls; load average {load}.\n")
    print("| leaves | dispatch (ms) | per leaf above 1 leaf (us) | vs 1 leaf |")
    print("|---:|---:|---:|---:|")
    for n, ms in rows:
        per_leaf = f"{1e3 * (ms - base) / (n - counts[0]):.2f}" if n > counts[0] else "n/a"
        print(f"| {n} | {ms:.3f} | {per_leaf} | {ms / base:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
