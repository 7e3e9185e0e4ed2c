"""End to end as a user runs it: train CLI -> checkpoints, TensorBoard -> export -> timm."""

import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import timm
import torch
from safetensors.torch import load_file

from softcon_jax import interop
from softcon_jax.export import restore_backbone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


def test_train_cli_then_export_loads_in_timm(tmp_path):
    workdir, data = tmp_path / "run", tmp_path / "data"
    log = _run("softcon_jax.train", "--config", "configs/quickstart.py:test",
               "--workdir", str(workdir), f"--config.data.path={data}",
               "--config.total_steps=6", "--config.stop_after_step=4")
    assert "step 4/6" in log and "Stopped at step 4" in log
    assert os.path.isdir(workdir / "checkpoints" / "4")
    log = _run("softcon_jax.train", "--config", "configs/quickstart.py:test",
               "--workdir", str(workdir), f"--config.data.path={data}",
               "--config.total_steps=6")
    assert "Resuming from" in log and "step 6/6" in log
    assert glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
    assert os.path.exists(data / "metadata.json")

    out = tmp_path / "export" / "backbone.safetensors"
    _run("softcon_jax.export", "--workdir", str(workdir), "--out", str(out), "--format", "timm")
    meta = json.loads((tmp_path / "export" / "backbone.safetensors.json").read_text())
    assert meta["in_chans"] == 13 and len(meta["band_order"]) == 13
    assert meta["normalization"]["name"] == "softcon"
    assert set(meta["normalization"]["per_band"]) == set(meta["band_order"])

    model = timm.create_model(meta["timm_name"], num_classes=0, **meta["timm_kwargs"]).eval()
    model.load_state_dict(load_file(str(out)), strict=True)

    # The exported teacher computes the same features in PyTorch as in JAX.
    backbone, variables, _, step = restore_backbone(str(workdir))
    assert step == 6
    x = np.random.default_rng(0).random((2, meta["img_size"], meta["img_size"], 13),
                                        dtype=np.float32)
    expected = np.asarray(interop.backbone_features(backbone, variables, x))
    with torch.no_grad():
        got = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    assert jax.device_count() == 8
