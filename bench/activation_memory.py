"""What one fine-tuning step of ours keeps for its backward pass, per token, on the CPU: the bytes
of every tensor autograd saves (weights excluded; a storage counted once), under bf16 autocast as
`longrope finetune` trains, for each checkpointing mode:

- none: every activation kept (no recomputation at all);
- whole: each decoder layer recomputed whole (what `finetune` does below 32k): its inputs kept.

`finetune`'s selective checkpointing (from 32k on) also keeps each layer's attention output, inside
the checkpoint's own storage, which these hooks do not see; the GPU's peak memory measures it
(bench/finetune_step.py).

Measured at two lengths, the saved bytes are a + b·n: b (bytes per token) is what grows with the
sequence, a is what does not (bf16 copies of the weights). The step's activations at --at tokens
are then a + b·at: this is the memory argument of issue 16's speed target (a step that recomputes
nothing keeps all of it). A count, not an allocator's peak: transient buffers inside a kernel and
the gradients are not in it.

    python bench/activation_memory.py --lengths 1k,2k --at 64k --out activation_memory.json
"""

from __future__ import annotations

import argparse

import torch

from _common import GiB, SMOKE, environment, fmt_len, random_llama, write_json
from longrope import models
from longrope.cli import parse_length, parse_lengths
from longrope.train.parallel import chunked_lm_loss

MODES = ("none", "whole")


def saved_bytes(length: int, mode: str, shape: str = "smollm2") -> int:
    """The bytes autograd saves in one forward of our loss at `length` tokens (batch 1, CPU, bf16
    autocast, float32 weights): each saved storage once, the parameters' own storages left out."""
    torch.manual_seed(0)
    model = random_llama(shape, torch.float32, torch.device("cpu")).train()
    model.config.use_cache = False
    if mode == "whole":
        models.enable_checkpointing(model, keep_attention=False)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, model.config.vocab_size, (1, length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", torch.bfloat16):
            chunked_lm_loss(model, ids)
    return sum(storages.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=parse_lengths, default=parse_lengths("1k,2k"), help="two lengths to fit a + b·n")
    p.add_argument("--at", type=parse_length, default=parse_length("64k"), help="the length to extrapolate to")
    p.add_argument("--out", default="activation_memory.json")
    args = p.parse_args()
    if len(args.lengths) != 2 or args.lengths[0] == args.lengths[1]:
        raise SystemExit("--lengths: give two different lengths, e.g. 1k,2k")
    short, long = args.lengths
    rows = []
    for mode in MODES:
        counted = {n: saved_bytes(n, mode) for n in (short, long)}
        per_token = (counted[long] - counted[short]) / (long - short)
        fixed = counted[short] - per_token * short
        at = fixed + per_token * args.at
        rows.append({"mode": mode, "saved_bytes": counted, "bytes_per_token": per_token, "fixed_bytes": fixed,
                     "at": args.at, "gib_at": at / GiB})
        print(f"{mode}: {per_token / 1024:.1f} KiB per token + {fixed / 2**20:.0f} MiB; at {fmt_len(args.at)} "
              f"{at / GiB:.2f} GiB", flush=True)
    write_json(args.out, {"environment": environment(), "shape": "tiny" if SMOKE else "smollm2",
                          "lengths": [short, long], "rows": rows})


if __name__ == "__main__":
    main()
