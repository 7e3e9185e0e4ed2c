"""Peak memory and time of loss forward + backward: direct against blockwise, on the CPU.

For each global batch size N, q and k are (N, D) (one device holds all rows, the worst case
for the direct form) and the script times ``jax.jit(jax.value_and_grad(loss))`` with
``num_chunks=1`` (direct) and ``num_chunks=max(ceil(N / block), --min-chunks)``
(blockwise). Every (loss, N,
form) is run once in a fresh subprocess, so the process peak RSS belongs to that
configuration; the timings come from one more subprocess that alternates the two forms,
so that load from other processes on a shared machine affects both alike.

Reported per configuration:
* time: median of ``--repeats`` runs after ``--warmup`` runs;
* XLA temp: scratch memory of the compiled computation (``memory_analysis()``), i.e. what
  it needs on top of its inputs and outputs;
* peak RSS: high-water mark of the worker process (includes the JAX runtime).
A direct run whose compiled memory would exceed ``--memory-budget-gb`` is compiled but not
run, and the table says so.

Usage:
  python benchmarks/loss_scaling.py                       # N in {1k, 4k, 16k, 32k}, D=256
  python benchmarks/loss_scaling.py --sizes 1024,4096 --losses infonce,soft_ce
  python benchmarks/loss_scaling.py --smoke               # seconds; for CI
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

LOSSES = ("infonce", "soft_ce", "bce", "mse")


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1024,4096,16384,32768",
                   help="comma-separated global batch sizes N")
    p.add_argument("--dim", type=int, default=256, help="embedding width D")
    p.add_argument("--block", type=int, default=1024,
                   help="columns per block of the blockwise form (num_chunks = ceil(N/block))")
    p.add_argument("--losses", default="soft_ce",
                   help=f"comma-separated, from {', '.join(LOSSES)} "
                        "(soft_ce/bce/mse are soft_contrastive variants)")
    p.add_argument("--min-chunks", type=int, default=4,
                   help="at least this many blocks, so small N is really blockwise")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs after compilation")
    p.add_argument("--memory-budget-gb", type=float, default=8.0,
                   help="skip running a configuration whose compiled memory exceeds this")
    p.add_argument("--machine", default=None, help="machine description for the table")
    p.add_argument("--json", default=None, help="also write the raw results to this file")
    p.add_argument("--smoke", action="store_true",
                   help="tiny N and D, one repetition: checks the script runs")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.dim, args.block, args.repeats, args.warmup = "256", 32, 64, 1, 0
    unknown = set(args.losses.split(",")) - set(LOSSES)
    if unknown:
        p.error(f"--losses: unknown {sorted(unknown)}; choose from {', '.join(LOSSES)}")
    return args


# --------------------------------------------------------------------------- worker


def _compiled_steps(spec: dict) -> tuple[dict, Any]:
    """Compiles jit(value_and_grad(loss)) for each form in ``spec["forms"]``.

    Returns ``({form: (compiled, memory facts)}, q)``.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from softcon_jax import losses

    n, dim, loss_name = spec["n"], spec["dim"], spec["loss"]
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(n, dim)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(n, dim)).astype(np.float32))
    labels = jnp.asarray((rng.random((n, 9)) < 0.3).astype(np.float32))

    def loss(q_, num_chunks):
        if loss_name == "infonce":
            return losses.infonce(q_, k, temperature=0.2, num_chunks=num_chunks)
        return losses.soft_contrastive(q_, k, labels, labels, temperature=0.2,
                                       variant=loss_name, num_chunks=num_chunks)

    steps = {}
    for form in spec["forms"]:
        chunks = 1 if form == "direct" else spec["num_chunks"]
        compiled = jax.jit(jax.value_and_grad(functools.partial(loss, num_chunks=chunks)))
        compiled = compiled.lower(q).compile()
        mem = compiled.memory_analysis()
        total = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
        steps[form] = (compiled, {"temp_bytes": int(mem.temp_size_in_bytes),
                                  "total_bytes": int(total),
                                  "skipped": bool(total > spec["budget_bytes"])})
    return steps, q


def _run_worker(spec: dict) -> dict:
    """Runs one measurement task in this process and returns its results.

    ``task == "memory"``: compile one form, run it once, report compiled memory and the
    process peak RSS. ``task == "time"``: compile both forms and time them alternately
    (direct, blockwise, direct, ...), so that load from other processes on a shared machine
    hits both forms alike; report the median of each.
    """
    import resource

    import jax
    import numpy as np

    steps, q = _compiled_steps(spec)
    if spec["task"] == "memory":
        ((form, (compiled, facts)),) = steps.items()
        if not facts["skipped"]:
            jax.block_until_ready(compiled(q))
            facts["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return facts
    runnable = {form: c for form, (c, facts) in steps.items() if not facts["skipped"]}
    times: dict[str, list[float]] = {form: [] for form in runnable}
    for rep in range(spec["warmup"] + spec["repeats"]):
        for form, compiled in runnable.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled(q))
            if rep >= spec["warmup"]:
                times[form].append(time.perf_counter() - start)
    return {form: {"times": t, "median_s": float(np.median(t))} for form, t in times.items()}


def measure(spec: dict) -> dict:
    """Memory of each form (one fresh process each) and their alternating timings."""
    out = {}
    for form in ("direct", "blockwise"):
        out[form] = {**spec, "form": form,
                     **_spawn({**spec, "task": "memory", "forms": [form]})}
    timing = _spawn({**spec, "task": "time", "forms": ["direct", "blockwise"]})
    for form in out:
        if "error" in timing:
            out[form]["error"] = timing["error"]
        elif form in timing:
            out[form].update(timing[form])
    return out


def _spawn(spec: dict) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker",
                           json.dumps(spec)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report


def _machine() -> str:
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        mem = f", {kib / 2**20:.0f} GB"
    except (OSError, ValueError, IndexError):
        mem = ""
    return f"{os.cpu_count()}-core CPU{mem} ({platform.machine()})"


def _mib(x: int) -> str:
    return f"{x / 2**20:,.1f}" if x < 10 * 2**20 else f"{x / 2**20:,.0f}"


def _cell_time(r: dict) -> str:
    if "error" in r:
        return "error"
    if r["skipped"]:
        return f"skipped (needs {r['total_bytes'] / 2**30:.1f} GB)"
    return f"{r['median_s']:.3f}"


def format_table(rows: list[tuple[dict, dict]]) -> str:
    """Markdown table, one line per (loss, N), direct and blockwise side by side."""
    lines = [
        "| loss | N | num_chunks | direct time (s) | blockwise time (s) | time ratio "
        "blockwise/direct | direct XLA temp (MiB) | blockwise XLA temp (MiB) | "
        "direct peak RSS (MiB) | blockwise peak RSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for direct, block in rows:
        ran = lambda r: "error" not in r and not r["skipped"]  # noqa: E731
        ratio = (f"{block['median_s'] / direct['median_s']:.2f}"
                 if ran(direct) and ran(block) else "n/a")
        temp = lambda r: _mib(r["temp_bytes"]) if "temp_bytes" in r else "error"  # noqa
        rss = lambda r: _mib(r["peak_rss_bytes"]) if ran(r) else "n/a"  # noqa: E731
        lines.append(
            f"| {block['loss']} | {block['n']} | {block['num_chunks']} | {_cell_time(direct)}"
            f" | {_cell_time(block)} | {ratio} | {temp(direct)} | {temp(block)} | "
            f"{rss(direct)} | {rss(block)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args.worker is not None:
        print(json.dumps(_run_worker(json.loads(args.worker))))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for loss in args.losses.split(","):
        for n in sizes:
            base = dict(n=n, dim=args.dim, loss=loss, repeats=args.repeats,
                        warmup=args.warmup, budget_bytes=int(args.memory_budget_gb * 2**30))
            chunks = max(-(-n // args.block), args.min_chunks)
            result = measure({**base, "num_chunks": chunks})
            direct, block = result["direct"], result["blockwise"]
            rows.append((direct, block))
            print(f"# done {loss} N={n}: direct {_cell_time(direct)}, "
                  f"blockwise {_cell_time(block)}", file=sys.stderr, flush=True)
    import jax  # only for the version line

    command = "python benchmarks/loss_scaling.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]))
    print(f"Command: `{command.strip()}`  ")
    print(f"Machine: {args.machine or _machine()}; jax {jax.__version__}, CPU backend; "
          f"D = {args.dim}, q and k both (N, D) on one device, float32; blockwise block = "
          f"{args.block} columns (at least {args.min_chunks} blocks); time = median of "
          f"{args.repeats} run(s) after "
          f"{args.warmup} warm-up run(s) of jit(value_and_grad(loss)).\n")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r for pair in rows for r in pair], f, indent=1)
    return 1 if any("error" in r for pair in rows for r in pair) else 0


if __name__ == "__main__":
    sys.exit(main())
