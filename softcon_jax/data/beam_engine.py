"""The Beam engine: the same shards written by an Apache Beam pipeline (``--engine beam``).

One Beam element per shard (``shards.Task``: its locations in order), each written by
``shards.write_shard`` (passed in as ``write``), exactly what the local engine runs: the
output is byte-identical, a location's 1 + T records stay together in one shard, bad inputs
are counted the same way, and every shard is uploaded under a temporary name and renamed
when complete. There is no shuffle of the data: only the small task list is redistributed
(``Reshuffle``) so that a runner spreads the shards over its workers. The launcher plans the
tasks (resume keeps the finished shards), runs the pipeline, then writes ``metadata.json``
itself, last. This is the pattern tensorflow-datasets uses to build large datasets with
Beam.

Pipeline options are Beam's own, given after ``--`` on the command line, e.g.
``-- --runner=DataflowRunner --project=P --region=R --temp_location=gs://b/tmp
--setup_file=./setup.py``. With a distributed runner the output (and input) must be on
storage every worker reaches (``gs://``); the workers need this package and rasterio.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from softcon_jax import cli


def _write(task: Any, write: Callable[[Any], dict]) -> str:
    write(task)
    return task.filename


def run(todo: Sequence[Any], beam_args: Sequence[str], desc: str,
        write: Callable[[Any], dict]) -> None:
    """Writes every task of ``todo`` (``shards.Task``) with ``write`` (``shards.write_shard``)
    in a Beam pipeline; returns when it has finished."""
    try:
        import apache_beam as beam
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        raise cli.UserValueError(
            "--engine beam needs Apache Beam: pip install 'softcon-jax[beam]'") from None
    if not todo:
        return
    options = PipelineOptions(list(beam_args) or ["--runner=DirectRunner"])
    with beam.Pipeline(options=options) as pipeline:
        _ = (pipeline
             | "Shards" >> beam.Create(list(todo))
             | "Spread" >> beam.Reshuffle()
             | f"Write {desc}" >> beam.Map(_write, write))
