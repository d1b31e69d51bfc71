"""Issue 17's check on a real model: llama.cpp on our GGUF export against plain transformers on our
Hugging Face export of the same weights and scaling, next-token log-probabilities at positions
beyond the original window; and the same GGUF without the factors and temperature, which must
differ there (so the check can fail). CPU only; needs llama-cpp-python (`make check-llamacpp`).

    python bench/gguf_llamacpp_check.py smollm2-135m --scaling smollm2-135m-64k --length 16k \\
        --data report_prose.jsonl.gz --out gguf_check.json
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from _common import environment, write_json
from longrope import data, gguf_export, models
from longrope.cli import parse_length


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def llama_cpp_logprobs(path, ids: list[int], rows: np.ndarray, threads: int) -> np.ndarray:
    import llama_cpp

    # the KV cache in float32 (llama.cpp's default is float16), so the comparison is at f32 tolerance
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids), logits_all=True, verbose=False, n_threads=threads,
                          n_batch=512, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(ids)
    return log_softmax(np.asarray(llm.scores[rows], dtype=np.float32))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--scaling", required=True)
    p.add_argument("--length", type=parse_length, default=parse_length("16k"))
    p.add_argument("--data", required=True, help="a document of at least --length tokens (the first is used)")
    p.add_argument("--positions", type=int, default=64, help="positions compared beyond the window (default 64)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="gguf_check.json")
    args = p.parse_args()
    model, tokenizer = models.load(args.model)
    info = models.rope_info(model.config)
    scaling = models.resolve_scaling(args.scaling, None, None, info)
    doc = data.select(data.load_tokenized(args.data, tokenizer), args.length, 1)[0]
    ids = [int(t) for t in doc.tokens[:args.length]]
    rows = np.linspace(info.original_length, args.length - 1, args.positions).round().astype(int)
    work = tempfile.mkdtemp(prefix="gguf-check-")
    t0 = time.time()
    models.attach(model, scaling)
    hf_dir = models.export(model, tokenizer, scaling, f"{work}/hf")
    factors = gguf_export.export_gguf(model, tokenizer, scaling, f"{work}/gguf", "f32")
    plain = dataclasses.replace(scaling, long_factor=(1.0,) * len(scaling.long_factor), attention_setting=1.0, n_hat=0)
    without = gguf_export.export_gguf(model, tokenizer, plain, f"{work}/gguf-plain", "f32", drop_n_hat=True)
    del model
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()  # plain transformers
    with torch.no_grad():
        hidden = reference.model(input_ids=torch.tensor([ids])).last_hidden_state[0, rows]
        ref = log_softmax(reference.lm_head(hidden).numpy())
    del reference
    ours = llama_cpp_logprobs(factors, ids, rows, args.threads)
    other = llama_cpp_logprobs(without, ids, rows, args.threads)
    next_ids = np.asarray(ids)[np.minimum(rows + 1, len(ids) - 1)]
    pick = lambda lp: lp[np.arange(len(rows)), next_ids]  # noqa: E731 - the actual next token's log-prob
    result = {
        "model": args.model, "scaling": args.scaling, "length": args.length, "document": doc.id,
        "positions": rows.tolist(), "gguf_type": "f32",
        "max_abs_logprob_diff": float(np.abs(ours - ref).max()),
        "max_abs_next_token_logprob_diff": float(np.abs(pick(ours) - pick(ref)).max()),
        "without_factors_max_abs_logprob_diff": float(np.abs(other - ref).max()),
        "without_factors_max_abs_next_token_logprob_diff": float(np.abs(pick(other) - pick(ref)).max()),
        "seconds": round(time.time() - t0, 1), "environment": environment(),
    }
    print({k: v for k, v in result.items() if "diff" in k})
    write_json(args.out, result)


if __name__ == "__main__":
    main()
