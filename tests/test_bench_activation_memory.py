"""`bench/activation_memory.py`: its count of what autograd saves, on tiny shapes. Hand-derived:
with whole layers recomputed each decoder layer keeps only its input, the float32 residual stream
(hidden × 4 bytes per token); with nothing recomputed a layer keeps far more."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    common = importlib.import_module("_common")
    monkeypatch.setattr(common, "SMOKE", True)  # tiny shapes on the CPU
    return importlib.import_module("activation_memory"), common


def test_whole_layer_checkpointing_keeps_one_float32_hidden_state_per_layer(bench, monkeypatch):
    module, common = bench
    per_layer = {}
    for mode in ("whole", "none"):
        counts = []
        for layers in (2, 3):
            monkeypatch.setitem(common.TINY, "num_hidden_layers", layers)
            counts.append(module.saved_bytes(64, mode))
        per_layer[mode] = (counts[1] - counts[0]) / 64
    hidden = common.TINY["hidden_size"]
    assert per_layer["whole"] == 4 * hidden  # one more layer: its float32 input, nothing else
    assert per_layer["none"] > 4 * per_layer["whole"]  # q, k, v, the MLP's activations, norms...
    assert module.saved_bytes(128, "whole") > module.saved_bytes(64, "whole")
