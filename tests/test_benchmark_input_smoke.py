"""The input-pipeline benchmark runs end to end and prints its markdown table."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_input_pipeline_smoke(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "input_pipeline.py"), "--smoke",
         "--data", str(tmp_path / "bench")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr[-2000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| pipeline | worker processes | records/s")
    assert len(table) == 5  # header, rule, ours x2, reference-style baseline
    assert "reference-style per-sample loop" in table[-1]
    assert all(float(row.split("|")[3]) > 0 for row in table[2:])
