"""`bench/finetune_step.py` in its CPU smoke mode (tiny shapes): the GPU calls that run it cost
device time, so the script itself is checked here: every implementation is timed at every length,
the ratios are each one's seconds over stock's, and the profile accounts for the step's ops."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_finetune_step_bench_smoke(tmp_path):
    out = tmp_path / "step.json"
    env = {**os.environ, "LONGROPE_BENCH_SMOKE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(BENCH.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(BENCH / "finetune_step.py"), "--lengths", "256", "--steps", "1", "--profile",
           "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=BENCH, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [row["length"] for row in result["rows"]] == [256]
    for row in result["rows"]:
        stock = row["stock"]["seconds_per_step"]
        for name in ("ours", "ours, whole layers", "ours, attention kept", "ours, compiled", "ours, cuDNN first",
                     "attention alone"):
            seconds = row[name]["seconds_per_step"]
            assert seconds > 0 and abs(row[name]["time_ratio"] - seconds / stock) < 1e-3 * seconds / stock, name
    from longrope import nll
    fused = nll.fused_nll_available() is None  # Liger's row only where its kernels run
    assert all(("ours, compiled, fused loss" in row) == fused for row in result["rows"])
    assert fused or "no 'ours, compiled, fused loss' row: --fused-loss needs" in proc.stdout
    assert result["profile, compiled"]["ms_by_kind"]["matmul"] > 0  # the compiled step profiled too
    prof = result["profile"]
    assert prof["length"] == 256 and prof["timer"] == "cpu (ops)"
    times = [r["self_ms"] for r in prof["top"]]
    assert times == sorted(times, reverse=True) and sum(times) <= prof["total_ms"] * (1 + 1e-6)
    assert abs(sum(prof["ms_by_kind"].values()) - prof["total_ms"]) < 1e-6 * prof["total_ms"]
    kinds = {r["name"]: r["kind"] for r in prof["top"]}
    assert kinds["aten::mm"] == "matmul" and kinds["aten::_scaled_dot_product_flash_attention_for_cpu"] == "attention"
    for kind in ("attention", "matmul"):  # each kind's sum holds at least its ops in the top rows
        assert prof["ms_by_kind"][kind] >= sum(r["self_ms"] for r in prof["top"] if r["kind"] == kind) * (1 - 1e-6)
    names = set(kinds)
    # one whole step was profiled: the matmuls, the attention kernel, its backward and AdamW's update
    assert {"aten::mm", "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward"} <= names
    assert any(n.startswith("Optimizer.step#AdamW") for n in names)
