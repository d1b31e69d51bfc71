"""`bench/context_parallel.py` in its CPU smoke mode under torchrun (2 gloo ranks, tiny model):
the GPU calls that run it cost device time, so the script itself is checked here. In float32 on
the CPU, context parallelism must give one process's loss and gradients; the sweep must report
every length for both."""

from __future__ import annotations

import pytest
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.torchrun
def test_context_parallel_bench_smoke(tmp_path):
    out = tmp_path / "cp.json"
    env = {**os.environ, "LONGROPE_BENCH_SMOKE": "1", "OMP_NUM_THREADS": "1",
           "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(BENCH.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(BENCH / "context_parallel.py"), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=BENCH, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    check = result["check"]
    # smoke mode runs float32 throughout (no CPU autocast): all four runs are the same computation
    for key in ("loss_one_gpu_bf16", "loss_context_parallel_fp32", "loss_context_parallel_bf16"):
        assert abs(check[key] - check["loss_one_gpu_fp32"]) < 1e-5 * check["loss_one_gpu_fp32"], (key, check)
    for key in ("grad_context_parallel_fp32", "grad_context_parallel_bf16"):
        assert check[key]["max"] < 1e-4, (key, check[key])
    one = {r["n"]: r["loss"] for r in result["rows"] if r["impl"] == "one GPU"}
    many = {r["n"]: r["loss"] for r in result["rows"] if r["impl"].startswith("context parallel")}
    assert sorted(one) == sorted(many) == [256, 512]
    assert all(abs(one[n] - many[n]) < 1e-5 * one[n] for n in one)
    assert result["longest"] == {"one GPU": 512, "context parallel ×2": 512}
    assert "] context parallel fp32 step done" in proc.stdout  # timestamped progress lines
