"""GPU planning on a machine without a GPU, and cuDNN attention at any token count.

The compile tests need JAX's CUDA plugin and ptxas: the `gpu-plan` extra installed, or the
folder `bash tests/run.sh` installs them into (`.venv/gpu-plan`, named by
SOFTCON_GPU_PLAN_SITE), which they put on PYTHONPATH of the planning processes only; they
are skipped without either. The attention test runs everywhere: it checks the padding and masking
that make cuDNN accept 257 tokens, with XLA's implementation of the same masked call.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from softcon_jax import cli, gpu_targets, plan
from softcon_jax.models import vit


def _attention64(q, k, v):
    """Softmax attention in float64 NumPy over (B, N, H, D)."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("n,multiple", [(17, 2), (17, 8), (16, 8), (257, 2)])
def test_padded_masked_attention_equals_plain_attention(n, multiple):
    q, k, v = jax.random.normal(jax.random.key(n), (3, 2, n, 2, 8))
    got = vit.padded_attention(q, k, v, implementation="xla", multiple=multiple)
    assert got.shape == q.shape
    np.testing.assert_allclose(got, _attention64(q, k, v), rtol=1e-5, atol=1e-5)

    def loss(qkv, fn):
        return jnp.sum(jnp.sin(fn(*qkv)))

    plain = jax.grad(loss)((q, k, v), lambda *t: vit.padded_attention(
        *t, implementation="xla", multiple=1))
    padded = jax.grad(loss)((q, k, v), lambda *t: vit.padded_attention(
        *t, implementation="xla", multiple=multiple))
    for a, b in zip(padded, plain):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    if n % multiple:  # the mask matters: zero keys left in would take softmax weight
        pad = -n % multiple
        unmasked = jax.nn.dot_product_attention(
            *(jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (q, k, v)))[:, :n]
        assert np.abs(np.asarray(unmasked) - _attention64(q, k, v)).max() > 1e-3


# ==== Planning NVIDIA GPU clusters =========================================================

# JAX's CUDA plugin apart from this process (tests/run.sh), or installed with the package.
GPU_PLAN_SITE = os.environ.get("SOFTCON_GPU_PLAN_SITE")
needs_cuda_plugin = pytest.mark.skipif(
    not (GPU_PLAN_SITE and os.path.isdir(GPU_PLAN_SITE))
    and importlib.util.find_spec("jax_plugins.xla_cuda12") is None,
    reason="JAX's CUDA plugin not installed (pip install -e .[gpu-plan], or bash tests/run.sh)")
TINY = ["--config", "configs/softcon.py:vits14,s2c,runlocal"]


def _with_plugin(env=None):
    """The environment of a process that plans for GPUs: the plugin's folder on PYTHONPATH."""
    env = {**os.environ, **(env or {})}
    if GPU_PLAN_SITE:
        env["PYTHONPATH"] = os.pathsep.join(
            [GPU_PLAN_SITE] + [p for p in (env.get("PYTHONPATH") or "").split(os.pathsep) if p])
    return env


def _plan(tmp_path, accelerator, *args, env=None):
    out = tmp_path / f"plan{len(list(tmp_path.iterdir()))}.json"
    res = subprocess.run([sys.executable, "-m", "softcon_jax.plan", *TINY, "--accelerator-type",
                          accelerator, *args, "--json", str(out)], capture_output=True,
                         text=True, timeout=600, env=_with_plugin(env))
    return res, (json.loads(out.read_text()) if out.exists() else None)


def test_gpu_cluster_types():
    c = gpu_targets.parse_accelerator_type("h100-16")
    assert (c.gpu.name, c.num_gpus, c.hosts, c.topology) == ("h100", 16, 2, "1x2x8")
    assert gpu_targets.parse_accelerator_type("a100-4").topology == "1x1x4"  # one host
    assert gpu_targets.parse_accelerator_type("h200-16", gpus_per_host=4).topology == "1x4x4"
    assert gpu_targets.parse_accelerator_type("b200-64").hosts == 8
    for bad in ("h100-12", "h100-3", "x100-8", "h100", "v100-8"):
        with pytest.raises(cli.UserValueError, match=r"unknown GPU cluster\. Valid types: "
                                                     r"a100-N, h100-N, h200-N, b200-N"):
            gpu_targets.parse_accelerator_type(bad)
    with pytest.raises(cli.UserValueError, match="slices are for TPUs"):
        gpu_targets.parse_accelerator_type("h100-16", num_slices=2)
    # The descriptions ship with the package and carry XLA's memory size for each GPU.
    assert gpu_targets.GPUS["h100"].hbm_bytes() == 84942979072
    assert gpu_targets.GPUS["a100"].hbm_bytes() == 85100068864


def test_usable_memory_fraction(monkeypatch):
    monkeypatch.delenv(gpu_targets.MEM_FRACTION_ENV, raising=False)
    assert gpu_targets.memory_fraction() == 0.75  # JAX's default preallocation
    monkeypatch.setenv(gpu_targets.MEM_FRACTION_ENV, ".9")
    assert gpu_targets.memory_fraction() == 0.9
    for bad in ("0", "1.5", "most"):
        monkeypatch.setenv(gpu_targets.MEM_FRACTION_ENV, bad)
        with pytest.raises(cli.UserValueError, match="XLA_PYTHON_CLIENT_MEM_FRACTION"):
            gpu_targets.memory_fraction()


def _flops_against_a_hand_count():
    """Convolution, dense and cuDNN attention (49 tokens, padded to 50), data parallel; run
    by the test below in a process that has the CUDA plugin."""
    devices = gpu_targets.parse_accelerator_type("h100-8").devices()
    mesh = jax.sharding.Mesh(devices, ("data",))
    b, s, c, f, heads, dim = 32, 7, 4, 16, 2, 8

    def loss(params, x):
        y = jax.lax.conv_general_dilated(x, params["conv"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        qkv = (y.reshape(b, s * s, f) @ params["qkv"]).reshape(b, s * s, 3, heads, dim)
        out = vit.padded_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        return jnp.sum(out.astype(jnp.float32))

    shard = jax.sharding.NamedSharding
    params = {"conv": jax.ShapeDtypeStruct((3, 3, c, f), jnp.bfloat16,
                                           sharding=shard(mesh, P())),
              "qkv": jax.ShapeDtypeStruct((f, 3 * f), jnp.bfloat16, sharding=shard(mesh, P()))}
    x = jax.ShapeDtypeStruct((b, s, s, c), jnp.bfloat16, sharding=shard(mesh, P("data")))
    step = jax.jit(jax.grad(loss))
    flops, loops = gpu_targets.flops_per_device(step.trace(params, x).lower(),
                                                jax.make_jaxpr(step)(params, x).jaxpr,
                                                len(devices))
    tokens, padded = b * s * s, s * s + 1
    # 3x3 'SAME' on 7x7: the border outputs see fewer taps (2+3+3+3+3+3+2 = 19 per axis).
    conv = 2 * b * 19 * 19 * f * c         # forward; backward: the kernel's gradient only
    dense = 2 * tokens * f * 3 * f         # forward; backward: kernel and input gradients
    attention = 2 * b * heads * padded * padded * dim  # one of the kernels' matmuls
    hand = 2 * conv + 3 * dense + (2 + 5) * attention
    assert loops == 0
    assert flops == pytest.approx(hand / len(devices), rel=0.02)


@needs_cuda_plugin
def test_gpu_flops_per_device_against_a_hand_count():
    code = ("import sys; sys.path.insert(0, 'tests'); import test_plan_gpu; "
            "test_plan_gpu._flops_against_a_hand_count(); print('hand count ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600, env=_with_plugin(), cwd=os.path.dirname(
                             os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0 and "hand count ok" in res.stdout, res.stderr[-3000:]


@needs_cuda_plugin
def test_gpu_plan_memory_flops_and_collectives(tmp_path):
    res, small = _plan(tmp_path, "h100-8", "--config.global_batch_size=16")
    assert res.returncode == 0, res.stderr[-2000:]
    for key in ("accelerator_type", "devices", "mesh", "per_device_batch", "fits",
                "hbm_bytes", "usable_bytes", "memory_fraction", "memory_bytes",
                "flops_per_device", "hbm_bytes_accessed", "roofline_images_per_s_per_device",
                "collectives", "min_collective_bytes", "collective_ratio", "compile_s",
                "collective_s_at_nvlink", "collective_s_at_network", "hosts"):
        assert key in small, key
    assert (small["devices"], small["hosts"], small["mesh"], small["per_device_batch"]) == (
        8, 1, {"data": 8, "fsdp": 1}, 2)
    assert small["hbm_bytes"] == 84942979072 and small["memory_fraction"] == 0.75
    assert small["usable_bytes"] == int(0.75 * small["hbm_bytes"]) and small["fits"] is True
    assert small["memory_bytes"]["aliased"] > 0  # the donated state
    assert small["flops_per_device"] > 0 and small["collective_s_at_network"] is None
    kinds = {c["kind"] for c in small["collectives"]}
    assert {"all-reduce", "all-gather"} <= kinds  # gradients; the loss's gathered keys
    assert small["min_collective_parts"]["gradients"] == 4 * small["param_count"]
    assert 1.0 <= small["collective_ratio"] <= 1.1
    assert "per-GPU batch 2" in res.stdout and "at NVLink" in res.stdout

    res, big = _plan(tmp_path, "h100-8", "--config.global_batch_size=64")
    assert res.returncode == 0, res.stderr[-2000:]
    assert big["per_device_batch"] == 8
    assert big["memory_bytes"]["total"] > small["memory_bytes"]["total"]
    assert 3 < big["flops_per_device"] / small["flops_per_device"] < 4.2


@needs_cuda_plugin
def test_gpu_plan_cudnn_attention_across_hosts(tmp_path):
    """17 tokens (4 x 4 patches + CLS) through cuDNN on 2 hosts; the network is timed."""
    hlo_path = tmp_path / "step.hlo"
    res, r = _plan(tmp_path, "h100-16", "--config.global_batch_size=32",
                   "--config.model.dtype=bfloat16",
                   "--config.model.backbone_kwargs.attention=cudnn", "--hlo", str(hlo_path))
    assert res.returncode == 0, res.stderr[-2000:]
    assert (r["devices"], r["hosts"], r["gpus_per_host"], r["topology"]) == (16, 2, 8, "1x2x8")
    assert "__cudnn$fmhaSoftmaxBackward" in hlo_path.read_text()
    assert r["collective_s_at_network"] > r["collective_s_at_nvlink"] > 0
    assert 1.0 <= r["collective_ratio"] <= 1.1
    assert "at the network between hosts" in res.stdout


@needs_cuda_plugin
def test_gpu_plan_over_the_usable_memory_exits_3(tmp_path):
    # JAX's share of HBM as the user sets it: a millionth of an H100 is 80 kB.
    res, r = _plan(tmp_path, "h100-8", "--config.global_batch_size=16",
                   "--config.data.augment_on=host",
                   env={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.000001"})
    assert res.returncode == plan.EXIT_DOES_NOT_FIT, res.stderr[-2000:]
    err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "does not fit" in err[0] and "GiB per GPU" in err[0], res.stderr
    for knob in ("global_batch_size", "config.mesh.fsdp", "config.model.remat"):
        assert knob in err[0]
    assert r["fits"] is False and r["memory_fraction"] == 0.000001
    assert r["shortfall_gib"] == pytest.approx(
        (r["memory_bytes"]["total"] - r["usable_bytes"]) / 2**30, abs=0.01)


def test_pod_plans_gpu_table_marks_rows_not_compiled():
    sys.path.insert(0, "benchmarks")
    import pod_plans

    text = pod_plans.gpu_table({})
    # 2 ViTs x (XLA, cuDNN attention) + 2 ResNets, at 1x and 4x the recipe batch, 3 clusters.
    assert text.count("not compiled here (command: `python -m softcon_jax.plan") == 6 * 2 * 3
    assert text.count("attention=cudnn`") == 2 * 2 * 3
