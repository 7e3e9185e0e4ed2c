"""The pod planner: the trainer's step compiled for a TPU slice on a CPU (libtpu), and remat.

The compile tests need libtpu (`pip install -e .[tpu]`); they are skipped without it.
"""

import importlib.util
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import seco, softcon
from softcon_jax import cli, hlo, methods, models, plan, sharding

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e .[tpu])")
TINY = ["--config", "configs/softcon.py:vits14,s2c,runlocal", "--accelerator-type",
        "v5litepod-4"]


def _plan(tmp_path, *args):
    out = tmp_path / f"plan{len(list(tmp_path.iterdir()))}.json"
    res = subprocess.run([sys.executable, "-m", "softcon_jax.plan", *TINY, *args,
                          "--json", str(out)], capture_output=True, text=True, timeout=300)
    return res, (json.loads(out.read_text()) if out.exists() else None)


def test_accelerator_types_as_gcloud_writes_them():
    chip, n, topology = plan.parse_accelerator_type("v4-32")
    assert (chip.family, n, topology) == ("v4", 16, "v4:2x2x4")  # v4 counts TensorCores
    assert plan.parse_accelerator_type("v5litepod-16")[1:] == (16, "v5e:4x4")
    assert plan.parse_accelerator_type("v5p-128")[1:] == (64, "v5p:4x4x4")
    assert plan.parse_accelerator_type("v6e-256")[1:] == (256, "v6e:16x16")
    for bad in ("v5e-16", "v4-7", "v5litepod-3", "tpu"):
        with pytest.raises(cli.UserValueError, match="Valid types.*v5litepod-16"):
            plan.parse_accelerator_type(bad)


@needs_libtpu
def test_plan_reports_memory_flops_and_collectives(tmp_path):
    res, small = _plan(tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    for key in ("accelerator_type", "devices", "mesh", "per_device_batch", "fits",
                "hbm_bytes", "memory_bytes", "flops_per_device", "collectives",
                "min_collective_bytes", "compile_s", "roofline_images_per_s_per_device",
                "collective_ratio", "collective_s_at_ici"):
        assert key in small, key
    assert set(small["memory_bytes"]) >= {"arguments", "outputs", "temporaries", "aliased",
                                          "total"}
    assert (small["devices"], small["mesh"], small["per_device_batch"]) == (
        4, {"data": 4, "fsdp": 1}, 4)
    assert small["fits"] is True and small["hbm_bytes"] == 16 * 2**30
    assert small["augment_on"] == "device"  # as the recipe trains: views made in the step
    assert small["flops_per_device"] > 0 and small["memory_bytes"]["aliased"] > 0  # donated
    kinds = {c["kind"] for c in small["collectives"]}
    assert {"all-reduce", "all-gather"} <= kinds  # gradients; the loss's gathered keys
    assert all(c["count"] > 0 and c["bytes"] > 0 for c in small["collectives"])
    # Plain data parallelism sends no more than the gradients once, the gathered keys and
    # labels, and the sync-BN statistics (the health metrics' few gathered rows aside).
    parts = small["min_collective_parts"]
    assert parts["gradients"] == 4 * small["param_count"] and parts["gathered"] > 0
    assert parts["batch_norm_statistics"] > 0  # the MoCo-v3 heads' sync BN
    assert 1.0 <= small["collective_ratio"] <= 1.05
    assert "fits" in res.stdout and "all-reduce" in res.stdout

    res, big = _plan(tmp_path, "--config.global_batch_size=64")
    assert res.returncode == 0, res.stderr[-2000:]
    assert big["per_device_batch"] == 16
    assert big["memory_bytes"]["total"] > small["memory_bytes"]["total"]
    assert big["flops_per_device"] > 3 * small["flops_per_device"]


@needs_libtpu
def test_oversized_batch_does_not_fit(tmp_path):
    res, report = _plan(tmp_path, "--config.data.image_size=224", "--stored-image-size=264",
                        "--config.model.backbone_kwargs.img_size=224",
                        "--config.global_batch_size=1024")
    assert res.returncode == plan.EXIT_DOES_NOT_FIT
    err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "does not fit" in err[0] and "GiB per chip" in err[0], res.stderr
    for knob in ("global_batch_size", "config.mesh.fsdp", "config.model.remat"):
        assert knob in err[0]
    assert "Traceback" not in res.stderr and "RESOURCE_EXHAUSTED" not in res.stderr
    assert report["fits"] is False and report["shortfall_gib"] > 0


def test_unknown_accelerator_type_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "softcon_jax.plan", TINY[0], TINY[1],
                          "--accelerator-type", "v5e-16"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1
    assert "error: --accelerator-type='v5e-16': unknown TPU slice" in res.stderr
    assert "v5litepod-256" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("name,kwargs", [
    ("vit_small_patch14_dinov2", dict(img_size=16, patch_size=4, embed_dim=32, depth=2,
                                      num_heads=2, init_values=0.1)),
    ("resnet18", dict(stage_sizes=(1, 1, 1, 1), widths=(8, 8, 16, 16)))])
def test_remat_keeps_outputs_and_gradients(name, kwargs):
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    plain = models.build_backbone(name, in_channels=3, **kwargs)
    remat = models.build_backbone(name, in_channels=3, remat=True, **kwargs)
    variables = plain.init(jax.random.key(1), x)

    def loss(params, model):
        out = model.apply({**variables, "params": params}, x, train=True,
                          mutable=["batch_stats"])[0]
        return jnp.sum(jnp.sin(out))

    value, grads = jax.value_and_grad(loss)(variables["params"], plain)
    value_r, grads_r = jax.value_and_grad(loss)(variables["params"], remat)
    np.testing.assert_allclose(value_r, value, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads_r, grads)


def test_config_model_remat_reaches_the_backbones():
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
    for config in (softcon.get_config("vits14,s2c,runlocal"), seco.get_config("rn18,runlocal")):
        assert config.model.remat is False
        config.model.remat = True
        method = methods.get(config.method)(config, mesh)
        assert method.backbone.remat is True


def test_gpu_suite_passes_shellcheck():
    import shutil
    from pathlib import Path

    exe = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    res = subprocess.run([exe, "-x", "benchmarks/gpu_suite.sh"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_pod_plans_table_marks_rows_not_compiled(tmp_path):
    sys.path.insert(0, "benchmarks")
    import pod_plans

    text = pod_plans.table({}, [1], ["v5litepod-64"])
    assert text.count("not compiled here (command: `python -m softcon_jax.plan") == 4


# A compiled-HLO excerpt in XLA:TPU's shapes: tuple results with tiled layouts, a counted
# while loop, one all-gather that XLA split over two fusions of a chain, async starts.
_HLO = """HloModule jit_step, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ar = f32[8]{0:T(128)} all-reduce(%x), channel_id=3, replica_groups={{0,1}}, to_apply=%add
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %c = s32[]{:T(128)} constant(5)
  ROOT %lt = pred[]{:T(512)} compare(%i, %c), direction=LT
}

%gather_part.1 (param_0: f32[2,4]) -> f32[8,4] {
  %all-gather.1 = f32[8,4]{1,0:T(8,128)} all-gather(%param_0), channel_id=1, dimensions={0}, frontend_attributes={chain_id="0"}
}

%gather_part.2 (param_0: f32[2,4]) -> f32[8,4] {
  %all-gather.2 = f32[8,4]{1,0:T(8,128)S(1)} all-gather(%param_0), channel_id=1, dimensions={0}, frontend_attributes={chain_id="0"}
}

%never_called (param_0: f32[2,4]) -> f32[8,4] {
  %all-gather.3 = f32[8,4]{1,0} all-gather(%param_0), channel_id=4, dimensions={0}
}

ENTRY %main (a: f32[32]) -> f32[8] {
  %ar.t = (f32[32]{0:T(128)S(1)}, bf16[16,2]{1,0:T(8,128)(2,1)}) all-reduce(%a, %b), channel_id=2, to_apply=%add, metadata={op_name="jit(step)/bn0/bn_statistics/reduce_sum"}
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body
  %f1 = f32[8,4] fusion(%g), kind=kCustom, calls=%gather_part.1
  %f2 = f32[8,4] fusion(%g), kind=kCustom, calls=%gather_part.2
  %ags = (f32[2,4]{1,0}, f32[8,4]{1,0}, u32[]{:S(2)}) all-gather-start(%y), channel_id=7
  %agd = f32[8,4]{1,0} all-gather-done(%ags)
  %cps = (f32[4]{0}, f32[4]{0}, u32[], u32[]) collective-permute-start(%z), channel_id=9
  ROOT %out = f32[8] copy(%x)
}
"""


def test_collectives_counted_where_they_run():
    found, bn_bytes, unknown = hlo.collectives(_HLO, by_scope=True)
    by_kind = {c["kind"]: (c["count"], c["bytes"]) for c in found}
    # all-reduce: the tuple (32 f32 + 16x2 bf16 = 192 B) once, the loop body's 8 f32 5 times.
    assert by_kind["all-reduce"] == (1 + 5, 32 * 4 + 16 * 2 * 2 + 5 * 8 * 4)
    # all-gather: the chained pair once, the async start's result once; never_called: no.
    assert by_kind["all-gather"] == (2, 2 * 8 * 4 * 4)
    assert by_kind["collective-permute"] == (1, 4 * 4)
    assert bn_bytes == 192 and unknown == 0
    assert hlo.collectives(_HLO) == found
