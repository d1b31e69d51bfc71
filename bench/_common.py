"""Shared helpers of the GPU benchmarks: CUDA check, random Llama-shaped models, timing, JSON."""

from __future__ import annotations

import gc
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout

GiB = 1024 ** 3
# LONGROPE_BENCH_SMOKE=1: run a script end to end on the CPU with tiny shapes (checks the script, measures nothing)
SMOKE = bool(os.environ.get("LONGROPE_BENCH_SMOKE"))
SHAPES = {  # the real shapes (config.json of Meta-Llama-3-8B, Llama-3.2-1B and SmolLM2-135M)
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
               rms_norm_eps=1e-5, tie_word_embeddings=False,
               rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
               rms_norm_eps=1e-5, tie_word_embeddings=True,
               rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
}


TINY = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32)


def require_cuda(what: str) -> torch.device:
    if SMOKE:
        print(f"{what}: smoke run on the CPU with tiny shapes (LONGROPE_BENCH_SMOKE is set); numbers mean nothing")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        print(f"{what}: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run.")
        sys.exit(2)
    return torch.device("cuda")


def random_llama(shape: str, dtype: torch.dtype = torch.bfloat16, device: torch.device | None = None):
    """A LlamaForCausalLM of the given real shape with random weights (bf16, on the GPU unless told)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**SHAPES[shape], **(TINY if SMOKE else {})}, attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device or ("cpu" if SMOKE else "cuda")):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def swap_rotary(model):
    """(ours, stock): our ScaledRotaryEmbedding for the model's own rope configuration, and the
    original transformers module; put one in place with `model.model.rotary_emb = ...`."""
    from longrope import models

    stock = model.model.rotary_emb
    models.attach(model, models.scaling_from_hf_config(model.config))
    ours = model.model.rotary_emb
    return ours, stock


def matmul_params(model) -> int:
    """Parameters that take part in matmuls (every Linear, lm_head included; not the embedding lookup)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def forward_flops(model, n: int) -> float:
    """2·params·n for the matmuls + causal attention 2·2·n²·d·layers / 2 (d = heads × head_dim)."""
    c = model.config
    d = c.num_attention_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    return 2.0 * matmul_params(model) * n + 2.0 * n * n * d * c.num_hidden_layers


def sync():
    if not SMOKE:
        torch.cuda.synchronize()


def matmul_peak_tflops(size: int = 8192, iters: int = 20) -> float:
    size, iters = (256, 2) if SMOKE else (size, iters)
    a = torch.randn(size, size, device=DEVICE(), dtype=torch.bfloat16)
    b = torch.randn(size, size, device=DEVICE(), dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync()
    return 2 * size ** 3 * iters / (time.perf_counter() - t) / 1e12


def DEVICE() -> torch.device:
    return torch.device("cpu" if SMOKE else "cuda")


def peak_gib() -> float:
    return 1.0 if SMOKE else torch.cuda.max_memory_allocated() / GiB


def gpu_memory_gib() -> float:
    return 24.0 if SMOKE else torch.cuda.get_device_properties(0).total_memory / GiB


@contextmanager
def measured(result: dict):
    """Fills result with seconds and peak_gib (max allocated during the block), or oom=True, and
    live_gib_before (allocated when the block began: weights, inputs, anything leaked)."""
    sync()
    # An out-of-memory error caught earlier leaves its frames, and the tensors they hold, in a
    # reference cycle until the cyclic collector runs: collect them now, or they count as ours.
    gc.collect()
    if not SMOKE:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        result["live_gib_before"] = torch.cuda.memory_allocated() / GiB
    t = time.perf_counter()
    try:
        yield
        sync()
        result.update(seconds=time.perf_counter() - t, peak_gib=peak_gib(), oom=False)
    except torch.OutOfMemoryError:
        result.update(oom=True, peak_gib=peak_gib())
    finally:
        gc.collect()
        if not SMOKE:
            torch.cuda.empty_cache()


def environment() -> dict:
    import transformers

    cuda = torch.cuda.is_available() and not SMOKE
    name = torch.cuda.get_device_properties(0).name if cuda else f"cpu ({os.cpu_count()} cores)" + (" (smoke)" if SMOKE else "")
    return {"device": name, "gpu_memory_gib": gpu_memory_gib() if cuda else None, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}


def write_json(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
    print(f"wrote {path}")


def fmt_len(n: int) -> str:
    if n and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    return f"{n >> 10}k" if n and n % 1024 == 0 else str(n)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")
