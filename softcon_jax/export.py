"""Export a trained backbone from a training workdir to PyTorch.

    python -m softcon_jax.export --workdir runs/quickstart \
        --out runs/quickstart/export/backbone.safetensors --format timm [--step N] \
        [--which teacher|student]

The teacher (EMA) backbone is exported by default, as MoCo-v3 and SoftCon release it.
Beside the `.safetensors` file a JSON sidecar records the timm model name and arguments,
input channels, image size, band order and normalisation (see `softcon_jax.interop`). The band
order is the run's band selection (`config.data.bands`, e.g. SeCo's B4 B3 B2), or all bands of
the dataset when it selects none. Both files are written atomically with the usual file mode
(0644 under the default umask). Nothing is created when `--workdir` has no checkpoints.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from etils import epath

from softcon_jax import cli, interop, logs
from softcon_jax.data import normalize
from softcon_jax.state import restore_backbone

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (with checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Output .safetensors path.")
_FORMAT = flags.DEFINE_enum("format", "timm", ["timm", "torchvision", "dinov2"],
                            "Key layout of the exported file.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_WHICH = flags.DEFINE_enum("which", "teacher", ["teacher", "student"],
                           "Which backbone to export.")


def _dataset_metadata(data_config) -> dict:
    path = epath.Path(data_config.path) / "metadata.json"  # local or gs://
    return json.loads(path.read_text()) if path.exists() else {}


def input_bands(data_config, meta: dict) -> list[str] | None:
    """The model's input bands, in order: the band selection, else the dataset's bands."""
    selected = data_config.get("bands")
    if selected:
        return [selected] if isinstance(selected, str) else [str(b) for b in selected]
    return list(meta["bands"]) if meta.get("bands") else None


def _normalization_record(data_config, bands) -> dict:
    """What a PyTorch user needs to feed the model as in pretraining (for the sidecar)."""
    formulas = {
        "softcon": "clip((x - (mean - 2*std)) / (4*std), 0, 1)",
        "zscore": "(x - mean) / std",
        "seco_quantile": "(clip((x - lo) / (hi - lo), 0, 1) - mean) / std",
    }
    record = {"name": data_config.normalization, "stats": data_config.get("stats"),
              "formula": formulas.get(data_config.normalization)}
    table = normalize.STATS.get(data_config.get("stats"), {})
    if bands and table:
        record["per_band"] = {b: table[b] for b in bands if b in table}
    return record


def export_workdir(workdir: str, out: str, fmt: str = "timm", step: int | None = None,
                   which: str = "teacher") -> str:
    model, variables, config, step = restore_backbone(workdir, step, which)
    bands = input_bands(config.data, _dataset_metadata(config.data))
    normalization = _normalization_record(config.data, bands)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    interop.export_torch(model, variables, out, fmt, band_order=bands,
                         normalization=normalization)
    logging.info("Exported the %s backbone of step %d to %s (%s layout).", which, step, out,
                 fmt)
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    for flag in (_WORKDIR, _OUT):
        if flag.value is None:
            raise app.UsageError(f"--{flag.name} is required.")
    logs.quiet_library_logs()
    out = export_workdir(_WORKDIR.value, _OUT.value, _FORMAT.value, _STEP.value, _WHICH.value)
    print(f"Exported {_WHICH.value} backbone to {out} (+ {out}.json sidecar)")


if __name__ == "__main__":
    cli.run_absl(main)
