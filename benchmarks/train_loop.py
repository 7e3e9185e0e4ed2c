"""Trainer loop throughput: `softcon_jax.train.train` itself, with and without device prefetch.

Unlike `train_step.py` (one batch placed on the devices once), this runs the real loop:
Grain reads and augments synthetic records, batches go onto the devices, steps are
dispatched, metrics are fetched at log steps. It measures what the host-side optimisations
buy: `config.prefetch_to_device` = 0 (the batch is read and placed in the loop's own thread,
the baseline) against N (a background thread does it, N batches ahead).

Each run gets a fresh workdir; runs of the variants alternate, so load hits all alike. The
step time of a run is the median over its log windows (`perf/step_time_s`), leaving out the
first window (compilation); the table gives the median over `--repeats` runs.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/train_loop.py
    python benchmarks/train_loop.py --smoke     # seconds; for CI
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60, help="steps per run")
    p.add_argument("--log-every", type=int, default=10, help="steps per timing window")
    p.add_argument("--prefetch", default="0,2",
                   help="config.prefetch_to_device values; the first is the baseline")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", default=None, help="synthetic dataset directory (default: temp)")
    p.add_argument("--smoke", action="store_true", help="quickstart 'test' config, 6 steps")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.log_every, args.repeats = 6, 2, 1
    args.prefetch = [int(x) for x in args.prefetch.split(",")]
    return args


def _config(args, data_path: str, prefetch: int):
    from configs import quickstart

    c = quickstart.get_config("test" if args.smoke else None)
    c.unlock()
    c.data.path = data_path
    c.total_steps = args.steps
    c.log_every_steps = args.log_every
    c.checkpoint.every_steps = 10 ** 9  # one save, at the last step
    c.eval.every_steps = 0              # no online kNN
    c.prefetch_to_device = prefetch
    return c


def _run(config, workdir: str) -> float:
    """Median step time (s) over the log windows after the first one."""
    from softcon_jax import train

    windows = []
    write = train.MetricWriter.write_scalars

    def capture(self, step, scalars):
        if "perf/step_time_s" in scalars:
            windows.append(float(scalars["perf/step_time_s"]))
        return write(self, step, scalars)

    train.MetricWriter.write_scalars = capture
    try:
        train.train(config, workdir)
    finally:
        train.MetricWriter.write_scalars = write
    timed = windows[1:] or windows
    return statistics.median(timed)


def main(argv=None) -> int:
    args = _parse_args(argv)
    import jax
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from softcon_jax import logs

    logs.quiet_library_logs()
    with tempfile.TemporaryDirectory() as tmp:
        data_path = args.data or os.path.join(tmp, "data")
        times = {p: [] for p in args.prefetch}
        for r in range(args.repeats):
            for p in args.prefetch:
                config = _config(args, data_path, p)
                times[p].append(_run(config, os.path.join(tmp, f"run_{r}_{p}")))
                print(f"repeat {r}: prefetch_to_device={p}: "
                      f"{1e3 * times[p][-1]:.1f} ms/step", flush=True)
        config = _config(args, data_path, args.prefetch[0])

    devices = jax.devices()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nTrainer loop: configs/quickstart.py{' (test)' if args.smoke else ''}, global "
          f"batch {config.global_batch_size}, {len(devices)} x {devices[0].device_kind} "
          f"({devices[0].platform}); {args.steps} steps per run, windows of "
          f"{args.log_every}, first window left out; median of {args.repeats} runs; host "
          f"{os.cpu_count()} CPUs, load average after: {load}.\n")
    print("| prefetch_to_device | step (ms) | images/s | vs baseline |")
    print("|---:|---:|---:|---:|")
    base = statistics.median(times[args.prefetch[0]])
    for p in args.prefetch:
        t = statistics.median(times[p])
        print(f"| {p} | {1e3 * t:.1f} | {config.global_batch_size / t:.1f} | "
              f"{base / t:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
