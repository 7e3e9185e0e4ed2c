"""Train-step benchmarks: JAX, PyTorch baseline and their comparison run end to end (--smoke),
and the PyTorch baseline computes the same losses as softcon_jax. No timing assertions."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
CASES = ["softcon_rn50", "softcon_vits14", "softcon_vitb14", "seco_rn18", "seco_rn50"]


def _run(script, *args, devices=1, timeout=900):
    # Own XLA_FLAGS: the subprocess must not inherit the 8 fake devices of conftest.
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), *args],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _table_cases(stdout, header_start="| case | framework |"):
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _check_rows(results, framework, devices, batch):
    assert [r["case"] for r in results] == CASES
    for r in results:
        assert "error" not in r, r
        assert r["framework"] == framework and r["devices"] == devices
        assert r["global_batch"] == batch * devices and r["per_device_batch"] == batch
        assert r["images_per_s"] > 0 and r["step_s"] > 0 and r["dispatch_ms"] > 0
        assert r["peak_mem_bytes"] > 0 and r["finite"]
        assert r["compile_s"] >= 0


def test_jax_train_step_smoke(tmp_path):
    out = tmp_path / "jax.json"
    stdout = _run("train_step.py", "--smoke", "--pipelined", "--json", str(out), devices=2)
    rows = _table_cases(stdout)
    assert [r[0] for r in rows] == CASES and all(r[1] == "jax" for r in rows)
    assert all(float(r[5]) > 0 for r in rows)  # images/s column
    result = json.loads(out.read_text())
    assert result["info"]["devices"] == 2 and result["info"]["platform"] == "cpu"
    _check_rows(result["results"], "jax", devices=2, batch=2)
    for r in result["results"]:
        assert r["lower_s"] > 0 and r["compile_s"] > 0
        assert r["flops_per_step_per_device"] > 0  # from compiled.cost_analysis()
        # --pipelined: back to back, and the trainer's loop with and without device prefetch
        assert r["pipelined_step_s"] > 0 and r["host_to_device_ms"] > 0
        assert r["loop_step_s"] > 0 and r["loop_sync_step_s"] > 0
        assert r["prefetch_to_device"] == 2 and r["view_dtype"] == "float32"
        assert r["mfu"] is None  # no CPU peak in the table and no --peak-flops
        assert r["dtype"] == "float32"  # auto on CPU


def test_torch_baseline_smoke(tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "torch.json"
    stdout = _run("torch_baseline.py", "--smoke", "--threads", "1", "--json", str(out))
    rows = _table_cases(stdout)
    assert [r[0] for r in rows] == CASES and all(r[1] == "torch" for r in rows)
    result = json.loads(out.read_text())
    _check_rows(result["results"], "torch", devices=1, batch=2)
    assert {r["optimizer"] for r in result["results"]} == {"lars_moco", "adamw", "sgd"}


def test_compare_smoke(tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "cmp.json"
    stdout = _run("compare.py", "--smoke", "--cases", "seco_rn18", "--json", str(out))
    ratio = _table_cases(stdout, "| case | dtype | JAX images/s/device |")
    assert len(ratio) == 1 and ratio[0][0] == "seco_rn18"
    assert float(ratio[0][4].strip("*x")) > 0
    pair = json.loads(out.read_text())["pairs"][0]
    assert pair["jax"]["framework"] == "jax" and pair["torch"]["framework"] == "torch"
    assert pair["jax"]["dtype"] == pair["torch"]["dtype"] == "float32"


# ---------------------------------------------------------------- the baseline's losses


@pytest.fixture(scope="module")
def baseline():
    torch = pytest.importorskip("torch")
    sys.path.insert(0, BENCH)
    try:
        import torch_baseline
    finally:
        sys.path.remove(BENCH)
    torch.manual_seed(0)
    return torch, torch_baseline


def test_torch_soft_contrastive_matches_jax(baseline):
    torch, tb = baseline
    from softcon_jax import losses

    rng = np.random.default_rng(0)
    n, d = 12, 16
    q, k = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    lq = (rng.random((n, 9)) < 0.3).astype(np.float32)
    lk = (rng.random((n, 9)) < 0.3).astype(np.float32)
    lq[:2] = 0.0  # unlabelled rows: no soft target
    want = losses.soft_contrastive(q.astype(np.float32), k.astype(np.float32), lq, lk,
                                   temperature=0.2, soft_weight=0.7, variant="soft_ce")
    got = tb.soft_contrastive_loss(*(torch.tensor(a) for a in (q, k, lq, lk)),
                                   temperature=0.2, soft_weight=0.7)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_torch_seasonal_infonce_matches_jax(baseline):
    torch, tb = baseline
    from softcon_jax import losses

    rng = np.random.default_rng(1)
    e, n, d, queue = 3, 6, 8, 10
    q = rng.normal(size=(e, n, d)).astype(np.float32)
    keys = rng.normal(size=(e, e, n, d)).astype(np.float32)
    queues = rng.normal(size=(e, queue, d)).astype(np.float32)
    queues /= np.linalg.norm(queues, axis=-1, keepdims=True)
    want = losses.seasonal_infonce(q, keys, temperature=0.07, queues=queues,
                                   batch_negatives=False)
    keys_unit = keys / np.linalg.norm(keys, axis=-1, keepdims=True)  # the baseline's keys
    got = tb.seasonal_infonce_loss(torch.tensor(q), torch.tensor(keys_unit),
                                   torch.tensor(queues), temperature=0.07)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
