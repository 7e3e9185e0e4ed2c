"""Export: band selection in the sidecar, usual file modes, no side effects on bad input."""

import json
import os
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import torchvision
from helpers import fill_disk, small_tmpfs, snapshot

from configs import seco
from softcon_jax import cli, export, interop, methods, optim, sharding, train
from softcon_jax.checkpoint import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def default_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _seco_workdir(tmp_path):
    """A workdir with one checkpoint of a 3-band (B4 B3 B2) SeCo ResNet-18 run."""
    c = seco.get_config("rn18")
    c.global_batch_size, c.data.image_size = 8, 16
    c.data.path = str(tmp_path / "no_data_here")  # the export needs only the config
    c.model.dtype = "float32"
    c.model.head.hidden_dim, c.model.head.out_dim = 32, 16
    c.loss.queue_size = 16
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    method = methods.get(c.method)(c, mesh)
    tx, _ = optim.make_optimizer(c)
    init_fn, rng, _, _ = train.create_train_state(c, method, tx, mesh)
    workdir = str(tmp_path / "run")
    ck = Checkpointer(workdir, async_save=False)
    ck.save(5, init_fn(rng), config=c)
    ck.wait()
    ck.close()
    return workdir


def test_three_band_seco_export_loads_in_torchvision_with_usual_modes(tmp_path, default_umask):
    workdir = _seco_workdir(tmp_path)
    out = str(tmp_path / "export" / "rn18.safetensors")
    export.export_workdir(workdir, out, "torchvision")
    sidecar = json.loads(open(out + ".json").read())
    assert sidecar["band_order"] == ["B4", "B3", "B2"] and sidecar["in_chans"] == 3
    assert list(sidecar["normalization"]["per_band"]) == ["B4", "B3", "B2"]
    for path in (out, out + ".json"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path
    assert not [f for f in os.listdir(os.path.dirname(out)) if ".tmp-" in f]

    model, variables, _, _ = export.restore_backbone(workdir)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    ours = np.asarray(interop.backbone_features(model, variables, x))
    from safetensors.torch import load_file
    net = torchvision.models.resnet18(weights=None)  # the standard 3-channel stem
    net.fc = torch.nn.Identity()
    net.load_state_dict(load_file(out), strict=True)
    net.eval()
    with torch.no_grad():
        theirs = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_export_of_a_missing_workdir_creates_nothing(tmp_path):
    missing = tmp_path / "no_such_run"
    out = tmp_path / "export" / "x.safetensors"
    with pytest.raises(cli.UserFileNotFoundError, match=f"no checkpoints in --workdir {missing}"):
        export.export_workdir(str(missing), str(out))
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(cli.UserFileNotFoundError, match="empty_run"):
        export.export_workdir(str(tmp_path / "empty_run"), str(out))
    assert sorted(os.listdir(tmp_path)) == ["empty_run"]
    assert os.listdir(tmp_path / "empty_run") == []


def test_export_cli_error_is_one_line_with_the_traceback_in_a_log(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, SOFTCON_LOG_DIR=str(tmp_path / "logs"),
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "softcon_jax.export", "--workdir", str(tmp_path / "none"),
           "--out", str(tmp_path / "x.safetensors")]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    assert res.returncode == 1, res.stderr
    lines = [line for line in res.stderr.splitlines() if not line.startswith(("W", "I"))]
    assert lines[0].startswith("error: no checkpoints in --workdir") and len(lines) == 2, lines
    assert "Traceback" not in res.stderr
    (log,) = os.listdir(tmp_path / "logs")
    assert "Traceback" in open(tmp_path / "logs" / log).read() and log in lines[1]
    verbose = subprocess.run(cmd + ["--verbose"], capture_output=True, text=True, cwd=REPO,
                             env=env)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr
    assert not os.path.exists(tmp_path / "none")


@pytest.mark.parametrize("content", [b"II*\x00" + bytes(range(256)) * 8, b"hello"])
def test_importer_names_a_file_that_is_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "scene.pth"  # e.g. a GeoTIFF given by mistake
    path.write_bytes(content)
    with pytest.raises(cli.UserValueError) as err:
        interop.import_torch(str(path), "resnet18", 3)
    assert str(path) in str(err.value) and "not a PyTorch checkpoint" in str(err.value)
    assert len(str(err.value).splitlines()) == 1
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(content)
    with pytest.raises(cli.UserValueError, match="not a readable .safetensors file"):
        interop.read_state_dict(str(bad))
    assert snapshot(str(tmp_path)) == {"scene.pth": content, "x.safetensors": content}


def test_export_to_a_full_disk_is_one_line_and_keeps_the_previous_export(tmp_path):
    """Disk full while exporting over an earlier export: one `error:` line naming the file
    and the cause, exit 1; the earlier weights and sidecar byte-identical, no temporary file."""
    workdir = _seco_workdir(tmp_path)
    with small_tmpfs(tmp_path / "disk", 96 * 1024) as disk:  # ResNet-18: 45 MB
        out = os.path.join(disk, "rn18.safetensors")
        export.export_workdir(workdir, out, "torchvision")
        fill_disk(disk, leave_bytes=1 << 20)
        before = {p: open(p, "rb").read() for p in (out, out + ".json")}
        env = dict(os.environ, PYTHONPATH=REPO, SOFTCON_LOG_DIR=str(tmp_path / "logs"),
                   JAX_PLATFORMS="cpu")
        res = subprocess.run([sys.executable, "-m", "softcon_jax.export", "--workdir", workdir,
                              "--out", out, "--format", "torchvision", "--which", "student"],
                             capture_output=True, text=True, cwd=REPO, env=env)
        assert res.returncode == 1, res.stderr[-3000:]
        (line,) = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert line.startswith(f"error: could not write the weights to {out} (No space left "
                               "on device;"), line
        assert line.endswith(f"{out} is unchanged."), line
        assert "Traceback" not in res.stderr
        assert {p: open(p, "rb").read() for p in before} == before
        assert sorted(os.listdir(disk)) == ["filler", "rn18.safetensors",
                                            "rn18.safetensors.json"]
