"""Command-line pieces shared by the converters: common arguments, Beam options, summary."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from softcon_jax.data import storage


def summary(meta: dict, out_dir: str) -> str:
    """One-paragraph human summary of a written dataset."""
    lines = [f"{meta['num_records']} records in {meta['num_shards']} shards at {out_dir}; "
             f"{meta['num_skipped']} inputs skipped"]
    lines += [f"  skipped {s['path']}: {s['reason']}" for s in meta["skipped"]]
    if meta["num_skipped"] > len(meta["skipped"]):
        lines.append(f"  ... {meta['num_skipped'] - len(meta['skipped'])} more in "
                     f"{storage.join(out_dir, meta['skipped_file'])}")
    nonfinite = meta.get("nonfinite")
    if nonfinite and nonfinite.get("num_pixels"):
        lines.append(f"  {nonfinite['num_pixels']} non-finite pixels in "
                     f"{nonfinite['num_locations']} locations replaced by "
                     f"{nonfinite['fill_value']}")
    return "\n".join(lines)


def add_common_args(parser: Any) -> None:
    """Adds --out, --num-shards, --num-workers, --engine, --resume, --skip-bad."""
    parser.add_argument("--out", required=True,
                        help="output directory for shards + metadata.json (local or a URL "
                             "such as gs://bucket/path)")
    parser.add_argument("--num-shards", type=int, default=16,
                        help="number of ArrayRecord shards (aim at 1-4 GB per shard)")
    parser.add_argument("--num-workers", type=int, default=default_num_workers(),
                        help="writer processes of the local engine (default: the cores "
                             "available to this process; 0 = write in this process)")
    parser.add_argument("--engine", choices=["local", "beam"], default="local",
                        help="local processes, or an Apache Beam pipeline (the 'beam' "
                             "extra) whose options follow '--', e.g. -- "
                             "--runner=DataflowRunner --project=P ...")
    parser.add_argument("--compression", default="uncompressed",
                        help="ArrayRecord compression: uncompressed (fastest reads), zstd:3 "
                             "(~30%% smaller), snappy, brotli:N")
    parser.add_argument("--resume", action="store_true",
                        help="keep shards that a previous run with the same inputs finished")
    parser.add_argument("--skip-bad", action="store_true",
                        help="log and skip unusable locations (counted in metadata.json) "
                             "instead of stopping with an error")


def default_num_workers() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_args(parser: Any, argv: Sequence[str] | None) -> Any:
    """``parser.parse_args`` of the arguments before ``--``; those after it are Beam's
    pipeline options (``args.beam_args``), refused with the local engine."""
    argv = list(sys.argv[1:] if argv is None else argv)
    beam_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if beam_args and args.engine != "beam":
        parser.error(f"options after '--' ({' '.join(beam_args)}) are Beam pipeline options; "
                     f"they need --engine beam")
    args.beam_args = beam_args
    return args


def add_nonfinite_args(parser: Any) -> None:
    """Adds --nonfinite and --fill-value (float bands: Sentinel-1 dB)."""
    parser.add_argument("--nonfinite", choices=["error", "fill"], default="error",
                        help="NaN/inf pixels in a float band: 'error' refuses the location "
                             "(naming the file; --skip-bad skips it), 'fill' replaces them "
                             "by --fill-value and records the policy and counts in "
                             "metadata.json")
    parser.add_argument("--fill-value", type=float, default=None,
                        help="value for non-finite pixels with --nonfinite fill")


def fill_value(parser: Any, args: Any) -> float | None:
    """The fill value the arguments ask for (None: non-finite pixels are an error)."""
    if args.nonfinite == "fill":
        if args.fill_value is None or not math.isfinite(args.fill_value):
            parser.error("--nonfinite fill needs a finite --fill-value")
        return args.fill_value
    if args.fill_value is not None:
        parser.error("--fill-value is used only with --nonfinite fill")
    return None
