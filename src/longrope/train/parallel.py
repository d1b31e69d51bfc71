"""How a fine-tuning run spreads over processes: `Local` (one process, one device) or, under
torchrun, `ContextParallel` (FSDP2 shards the weights, context parallelism splits each sequence's
positions across the ranks). `finetune` runs one loop over either (`strategy` picks).

Context parallelism here is the all-gather form (the one Llama 3's long-context training used),
load-balanced: the sequence is cut into 2W chunks and rank r holds chunks r and 2W−1−r, so
every rank has the same share of the causal attention work (with contiguous slices the last rank
would do 2W−1 times the first one's). Each rank computes queries, keys and values at the
*global* positions of its chunks (so RoPE, n̂ and the short/long choice are those of the whole
sequence), gathers everybody's keys and values, puts them back in sequence order, and each of
its two chunks attends to the keys up to its own end with a bottom-right-aligned causal mask
(flash/efficient SDPA kernels, no materialised mask on CUDA). Packed documents (`--doc-mask`) cut
each chunk into runs of positions inside one document, each attending from its document's start
the same way (`set_documents`). The backward all-reduces the
key/value gradients and keeps the local part. Compared with ring attention it holds the
(GQA-small) keys and values of the whole sequence on every rank, and needs nothing beyond
all_gather/all_reduce, so the same code runs with NCCL and with gloo on the CPU (which is how
the tests check it against one process).

The loss of a sequence is the sum of the ranks' token NLLs divided by the global target count
(and so are its distillation and answer terms),
so the gradient is the sum of the ranks' gradients. FSDP2's reduce-scatter averages over the
ranks (a sum without averaging needs PREMUL_SUM, which gloo lacks), so each rank scales its
loss by the world size before the backward (`ContextParallelLM.loss_scale`).

The torchrun plumbing that is not about training (joining, agreeing, exiting) is `distributed`'s.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface

from .. import distributed, models, nll
from ..errors import UsageError
from . import loop, retention

ATTENTION = "longrope_cp"
_PREFIX = "model."  # ContextParallelLM holds the model as `.model`


def chunked_lm_loss(model, input_ids: torch.Tensor, chunk: int = nll.DEFAULT_CHUNK, *,
                    position_ids: torch.Tensor | None = None, teacher=None, distill_weight: float = 0.0,
                    answers: torch.Tensor | None = None, answer_weight: float = 0.0,
                    fused: bool = False) -> tuple[torch.Tensor, int]:
    """(summed next-token cross entropy, number of targets) of a [batch, seq] batch, without ever
    building (tokens × vocab) logits: the decoder's final hidden states are scored `chunk`
    positions at a time (`nll.summed_nll`; under autograd each chunk is recomputed in the backward
    pass). With a `teacher` (frozen) the sum adds distill_weight · KL(teacher ‖ model) at every
    scored position (`nll.summed_kl`, just as chunked). `position_ids` (batch, seq): restarting
    per packed document, transformers masks attention across documents. `answers` (batch, seq)
    bool marks answer tokens (retrieval sequences): the sum adds their NLL scaled so that, in the
    mean over all targets, it counts answer_weight × the answers' mean NLL (a few answer tokens
    would otherwise vanish among 64k others). `fused`: the sequence's NLL through Liger's fused
    kernel (`nll.summed_nll_fused`; the few answer tokens and the KL stay chunked).
    `local_lm_loss` is its context-parallel twin."""
    hidden = _final_hidden(model, input_ids, position_ids)[:, :-1]
    batch, length = input_ids.shape
    targets = batch * (length - 1)
    if fused:
        loss = nll.summed_nll_fused(model, hidden, input_ids[:, 1:])
    else:
        loss = nll.summed_nll(model, hidden, input_ids[:, 1:], chunk, torch.float32)
    if teacher is not None and distill_weight:
        with torch.no_grad():
            taught = _final_hidden(teacher, input_ids, position_ids)[:, :-1]
        loss = loss + distill_weight * nll.summed_kl(model, hidden, teacher, taught, chunk, torch.float32)
    if answers is not None and answer_weight and (scored := answers[:, 1:]).any():
        answer_nll = nll.summed_nll(model, hidden[scored], input_ids[:, 1:][scored], chunk, torch.float32)
        loss = loss + _answer_scale(answers, targets, answer_weight) * answer_nll
    return loss, targets


def _answer_scale(answers: torch.Tensor, targets: int, answer_weight: float) -> float:
    """What the summed NLL of the answer tokens is multiplied by, so that in the mean over all
    `targets` it counts answer_weight × the answers' mean NLL. `answers` (batch, seq) marks the
    answer tokens of the whole batch (the first position is never a target)."""
    return answer_weight * targets / int(answers[:, 1:].sum())


def _final_hidden(model, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    out = nll.decoder(model)(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


# --------------------------------------------------------------------------------------------
# the two strategies


class Local:
    """One process on one device: the model trains as it is.

    The strategy (`ContextParallel` has the same members): `open_out` checks the output folder and
    returns the checkpoint to resume from; `prepare` gives the module to train and `prepare_teacher`
    the distillation teacher to run beside it; `keeps_attention` whether its checkpointing may keep
    attention outputs; `nll` this process's summed NLL of a batch, `loss_scale` its factor before
    the backward, `sum_over_ranks` the whole batch's; `needle_loss` and `passkey_accuracy` the
    in-training checks (the latter None where another process logs); `load_state`/`full_state` the
    checkpoint's state dicts; `final_model` the model to export (None where another process exports)."""

    world, is_main, loss_scale = 1, True, 1.0  # loss_scale: what the backward multiplies the loss by
    keeps_attention = True  # checkpointing may keep attention outputs (`models.enable_checkpointing`)

    def __init__(self, device: torch.device, loss_chunk: int, fused_loss: bool = False):
        self.device, self.loss_chunk, self.fused_loss = device, loss_chunk, fused_loss

    def open_out(self, out: Path, resume: bool, force: bool, record: str) -> dict | None:
        return loop.prepare_out(out, resume, force, record)

    def prepare(self, model):
        attention = getattr(model.config, "_attn_implementation", "sdpa")
        if attention not in ("sdpa", "flash_attention_2", "flash_attention_3"):
            print(f"note: attention implementation {attention!r}; load with sdpa for long sequences")
        return model

    def nll(self, model, batch: torch.Tensor, **objective) -> torch.Tensor:
        """`objective`: chunked_lm_loss's position_ids, teacher, distill_weight, answers and
        answer_weight."""
        return chunked_lm_loss(model, batch, self.loss_chunk, fused=self.fused_loss, **objective)[0]

    def prepare_teacher(self, teacher):
        return teacher

    def needle_loss(self, model, samples) -> tuple[float, dict[str, float]]:
        return retention.needle_loss(model, samples, self.loss_chunk)

    def passkey_accuracy(self, model, tokenizer, prompts, scaling) -> tuple[float, dict[str, float]] | None:
        return retention.passkey_accuracy(model, tokenizer, prompts)

    def sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        return value.detach()

    def load_state(self, model, optimizer, checkpoint: dict) -> None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])

    def full_state(self, model, optimizer) -> tuple[dict, dict]:
        return model.state_dict(), optimizer.state_dict()

    def barrier(self) -> None:
        pass

    def final_model(self, model, trained, optimizer, scaling):
        return model


class ContextParallel:
    """This rank's part of a torchrun run: every rank takes the same sequences and runs its slice
    of their positions, the weights sharded by FSDP2; rank 0 alone writes files. Checkpoints hold
    full state dicts, so a run resumes only with the same number of processes."""

    # its attention builds a CausalBias tensor subclass, which selective checkpointing's dispatch
    # mode cannot create: whole layers are recomputed
    keeps_attention = False

    def __init__(self, group: distributed.Group, seq_len: int, loss_chunk: int):
        check_splits(seq_len, group.world)
        self.group, self.loss_chunk = group, loss_chunk
        self.device, self.world, self.is_main = group.device, group.world, group.is_main
        self.loss_scale = float(group.world)  # FSDP2 averages gradients: see ContextParallelLM.loss_scale

    def open_out(self, out: Path, resume: bool, force: bool, record: str) -> dict | None:
        """Rank 0 checks (and with --force clears) the folder; the others read the checkpoint after it."""
        found = distributed.agree(self.group, lambda: loop.prepare_out(out, resume, force, record) is not None)
        return loop.read_checkpoint(out) if found else None

    def prepare(self, model) -> ContextParallelLM:
        use_context_parallel_attention(model)
        return shard_model(model, self.group, self.loss_chunk)

    def nll(self, root: ContextParallelLM, batch: torch.Tensor, **objective) -> torch.Tensor:
        """`objective`: position_ids, teacher, distill_weight, answers and answer_weight (`local_lm_loss`)."""
        return root(batch, **objective)[0]

    def prepare_teacher(self, teacher):
        """The frozen teacher runs this rank's positions too, attending across the ranks."""
        use_context_parallel_attention(teacher)
        return teacher

    def needle_loss(self, root: ContextParallelLM, samples) -> tuple[float, dict[str, float]]:
        """`retention.needle_loss` over the ranks: each runs its positions of every sample."""
        device = self.device
        per_sample = []
        with retention.evaluating(root), torch.no_grad():
            for s in samples:
                ids = torch.as_tensor(s.input_ids, device=device)[None]
                marked = torch.zeros_like(ids, dtype=torch.bool)
                marked[:, s.answer_start:] = True
                total, count = root(ids, scored_only=marked)
                per_sample.append((float(distributed.all_reduce_sum(total.detach().double())), count))
        return retention.summarise_needles(samples, per_sample)

    def passkey_accuracy(self, root: ContextParallelLM, tokenizer, prompts, scaling):
        """`retention.passkey_accuracy` on rank 0, on an unsharded copy of the weights gathered from
        every rank (greedy decoding is one position at a time: nothing to split); None elsewhere."""
        model_state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        model = unsharded_copy(root.model, _unprefixed(model_state))
        models.attach(model.to(self.device), scaling)
        return retention.passkey_accuracy(model, tokenizer, prompts)

    def sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce_sum(value)

    def load_state(self, root: ContextParallelLM, optimizer, checkpoint: dict) -> None:
        load_full_state(root, optimizer, checkpoint["model"], checkpoint["optimizer"])

    def full_state(self, root: ContextParallelLM, optimizer) -> tuple[dict, dict]:
        return full_state(root, optimizer)  # a collective: every rank gathers, rank 0 gets them

    def barrier(self) -> None:
        distributed.barrier()

    def final_model(self, model, root: ContextParallelLM, optimizer, scaling):
        """On rank 0 an unsharded copy of the trained model, scaling attached, to export; None on
        the others, which wait for rank 0's export."""
        model_state, _ = full_state(root, optimizer)
        if not self.is_main:
            distributed.barrier()
            return None
        model = unsharded_copy(model, model_state)
        models.attach(model, scaling)
        return model


def strategy(device: torch.device, seq_len: int, loss_chunk: int, fused_loss: bool = False) -> Local | ContextParallel:
    """`ContextParallel` under torchrun (WORLD_SIZE > 1), else `Local` on `device` (`fused_loss`:
    Liger's fused loss, one process only: `FinetuneConfig.validate`)."""
    if distributed.world_size() > 1:
        return ContextParallel(distributed.init(device.type), seq_len, loss_chunk)
    return Local(device, loss_chunk, fused_loss)


# --------------------------------------------------------------------------------------------
# context-parallel attention


def check_splits(length: int, world: int, what: str = "--seq-len") -> None:
    """UsageError unless a sequence of `length` tokens (`what`: which one, for the message) splits
    into the 2·world equal chunks of context parallelism."""
    if length % (2 * world):
        raise UsageError(f"{what} {length} must be a multiple of twice the number of processes "
                         f"({2 * world}) for context parallelism")


def shard_chunks(length: int, world: int, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The two [start, end) position ranges `rank` holds in a sequence of `length` tokens: chunks
    `rank` and 2·world−1−rank of 2·world equal chunks (the load-balanced layout)."""
    check_splits(length, world)
    c = length // (2 * world)
    late = 2 * world - 1 - rank
    return (rank * c, (rank + 1) * c), (late * c, (late + 1) * c)


def sequence_order(gathered: torch.Tensor, world: int) -> torch.Tensor:
    """(B, H, world·2c, d) gathered in rank order (each rank: its early chunk, then its late one)
    -> the same positions in sequence order (chunk j held by rank j, or by rank 2W−1−j)."""
    b, h, n, d = gathered.shape
    parts = gathered.view(b, h, world, 2, n // (2 * world), d)
    chunks = [parts[:, :, r, 0] for r in range(world)] + [parts[:, :, r, 1] for r in reversed(range(world))]
    return torch.cat(chunks, dim=2)


class _GatherPositions(torch.autograd.Function):
    """All-gather along dim 2 (positions of (batch, heads, positions, head_dim)); the backward
    sums the full gradient over the ranks and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.world, ctx.size = dist.get_rank(), dist.get_world_size(), x.shape[2]
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[:, :, ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size]


def context_parallel_attention(module, query, key, value, attention_mask=None, dropout: float = 0.0,
                               scaling: float | None = None, is_causal=None, **kwargs):
    """transformers attention interface: query (B, H, 2c, d), key/value (B, Hk, 2c, d) of this
    rank's two chunks (`shard_chunks`), already rotated at their global positions. Returns
    ((B, 2c, H, d), None)."""
    if attention_mask is not None:
        raise ValueError("context parallelism: padded or packed-document masks are not supported")
    # Under autocast transformers' rotary leaves q and k in float32 (its cos/sin follow the float32
    # residual) while v comes out of a bf16 matmul; plain SDPA would cast them, but the
    # causal_lower_right mask checks the dtypes before autocast does.
    kind = query.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else query.dtype
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    rank, world, c = dist.get_rank(), dist.get_world_size(), query.shape[2] // 2
    keys = sequence_order(_GatherPositions.apply(key), world)
    values = sequence_order(_GatherPositions.apply(value), world)
    if keys.shape[1] != query.shape[1]:  # GQA
        repeat = query.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(repeat, dim=1), values.repeat_interleave(repeat, dim=1)
    sdpa = dict(dropout_p=dropout if module.training else 0.0, scale=scaling)
    pieces = _document_pieces
    outs = []
    for half, (start, end) in enumerate(shard_chunks(2 * world * c, world, rank)):  # keys after `end` are all masked
        q = query[:, :, half * c:(half + 1) * c]
        if pieces is None:
            outs.append(F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end],
                                                       attn_mask=causal_lower_right(c, end), **sdpa))
            continue
        # packed documents: each run of queries inside one document attends causally from its start
        rows = [torch.cat([F.scaled_dot_product_attention(
            q[b:b + 1, :, a - start:e - start], keys[b:b + 1, :, d:e], values[b:b + 1, :, d:e],
            attn_mask=causal_lower_right(e - a, e - d), **sdpa) for a, e, d in pieces[b][half]], dim=2)
            for b in range(q.shape[0])]
        outs.append(torch.cat(rows, dim=0))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


# The packed documents of the batch last run context parallel (`set_documents`): per row, per chunk
# of this rank, (first, end, document start) of each run of positions inside one document; None:
# plain causal attention. Module state rather than a context: gradient checkpointing recomputes the
# attention in the backward pass, after the forward returned (on a GPU in autograd's own thread),
# so the documents stay set until the next forward sets them.
_document_pieces: list | None = None


def set_documents(position_ids: torch.Tensor | None, group: distributed.Group) -> None:
    """Make `context_parallel_attention` keep attention inside each packed document of the batch
    whose `position_ids` (batch, n), held whole, restart at 0 where a document starts (what
    transformers' packed-sequence mask does in one process); None: plain causal attention. Each
    run of positions inside one document is one SDPA call per layer: cheap with a few long
    documents per sequence (long-context data), slow with hundreds of short ones."""
    global _document_pieces
    if position_ids is None:
        _document_pieces = None
        return
    n = position_ids.shape[1]
    pieces = []
    for row in position_ids.cpu():
        starts = (row == 0).nonzero().flatten().tolist()
        chunks = []
        for start, end in shard_chunks(n, group.world, group.rank):
            cuts = [start] + [p for p in starts if start < p < end] + [end]
            chunks.append([(a, e, a - int(row[a])) for a, e in zip(cuts[:-1], cuts[1:])])
        pieces.append(chunks)
    _document_pieces = pieces


def use_context_parallel_attention(model) -> None:
    """Make `model` (a transformers causal LM) attend with `context_parallel_attention`; no mask is
    built for it (transformers skips mask creation for an attention it has no mask function for)."""
    AttentionInterface.register(ATTENTION, context_parallel_attention)
    try:
        model.set_attn_implementation(ATTENTION)
    except (ValueError, AttributeError):  # older transformers: set it on the config
        model.config._attn_implementation = ATTENTION


@contextmanager
def global_regime(model, length: int):
    """The attached rotary picks short or long factors from the *global* sequence length, not from
    the largest position of this rank's slice."""
    rotary = model.model.rotary_emb
    previous = getattr(rotary, "regime_length", None)
    rotary.regime_length = length
    try:
        yield
    finally:
        rotary.regime_length = previous


# --------------------------------------------------------------------------------------------
# FSDP2: the sharded model, its loss and its full state


class ContextParallelLM(torch.nn.Module):
    """The root FSDP2 unit: `forward(input_ids)` returns this rank's (summed NLL, global target
    count) for a batch every rank holds whole. Wrapping the loss in one module puts the
    embeddings, the final norm and the head (tied or not) in one FSDP unit that is gathered once
    per step, while the decoder stack is called directly for the final hidden states."""

    def __init__(self, model, group: distributed.Group, chunk: int):
        super().__init__()
        self.model, self.group, self.chunk = model, group, chunk

    @property
    def loss_scale(self) -> float:
        """Multiply this rank's loss by this before backward: FSDP2 averages gradients over the
        ranks, and the true gradient is their sum."""
        return float(self.group.world)

    def forward(self, input_ids: torch.Tensor, scored_only: torch.Tensor | None = None,
                **objective) -> tuple[torch.Tensor, int]:
        """`objective`: `local_lm_loss`'s teacher, distill_weight, answers and answer_weight. With
        `scored_only` (batch, n) bool, held whole: this rank's summed NLL of the marked tokens
        alone and their global count (FSDP2 gathers the root's weights in `forward` only, so an
        evaluation comes through here too)."""
        if scored_only is not None:
            return local_marked_nll(self.model, input_ids, scored_only, self.group, self.chunk)
        return local_lm_loss(self.model, input_ids, self.group, self.chunk, **objective)


def shard_model(model, group: distributed.Group, chunk: int) -> ContextParallelLM:
    """FSDP2: each decoder layer, then the root (`ContextParallelLM`: embeddings, final norm,
    head). Gradients are averaged over the ranks: scale the loss by `root.loss_scale`."""
    for layer in model.model.layers:
        fully_shard(layer)
    root = ContextParallelLM(model, group, chunk)
    fully_shard(root)
    return root


def local_lm_loss(model, input_ids: torch.Tensor, group: distributed.Group, chunk: int, *,
                  position_ids: torch.Tensor | None = None, teacher=None, distill_weight: float = 0.0,
                  answers: torch.Tensor | None = None, answer_weight: float = 0.0) -> tuple[torch.Tensor, int]:
    """(this rank's summed next-token NLL, the global number of targets) of a [batch, n] batch that
    every rank holds whole: this rank runs the positions of its two chunks and scores, for each
    position p, the token p+1 (rank 0, which holds the last chunk, has one target fewer).
    `chunked_lm_loss`'s other terms, each rank adding its positions' share so that the ranks' sums
    add up to it: `position_ids` (batch, n), held whole, restarting per packed document, keep
    attention inside each document (`set_documents`); with a `teacher` (frozen, unsharded,
    attending context parallel too) distill_weight · KL(teacher ‖ model) at its scored positions;
    with `answers` (batch, n), held whole too, the answer term of the answer tokens among its
    targets."""
    batch, n = input_ids.shape
    at, hidden = _local_hidden(model, input_ids, group, position_ids)
    target_ids = input_ids[:, at]
    total = nll.summed_nll(model, hidden, target_ids, chunk, torch.float32)
    targets = batch * (n - 1)
    if teacher is not None and distill_weight:
        with torch.no_grad():
            taught = _local_hidden(teacher, input_ids, group, position_ids)[1]
        total = total + distill_weight * nll.summed_kl(model, hidden, teacher, taught, chunk, torch.float32)
    if answers is not None and answer_weight and answers[:, 1:].any():
        mine = answers[:, at]  # this rank's targets that are answer tokens
        answer_nll = nll.summed_nll(model, hidden[mine], target_ids[mine], chunk, torch.float32)
        total = total + _answer_scale(answers, targets, answer_weight) * answer_nll
    return total, targets


def local_marked_nll(model, input_ids: torch.Tensor, marked: torch.Tensor, group: distributed.Group,
                     chunk: int) -> tuple[torch.Tensor, int]:
    """(this rank's summed NLL of the tokens `marked` (batch, n) among its targets, how many are
    marked in all): the ranks' sums add up to the marked tokens' NLL (a needle's answer)."""
    at, hidden = _local_hidden(model, input_ids, group)
    mine = marked[:, at]
    total = nll.summed_nll(model, hidden[mine], input_ids[:, at][mine], chunk, torch.float32)
    return total, int(marked[:, 1:].sum())


def _local_hidden(model, input_ids: torch.Tensor, group: distributed.Group,
                  position_ids: torch.Tensor | None = None):
    """(the positions of the tokens this rank's positions predict, the final hidden states that
    predict them) of a [batch, n] batch every rank holds whole, at the global positions (or
    `position_ids`, restarting per packed document) and the regime of the whole length."""
    batch, n = input_ids.shape
    ranges = shard_chunks(n, group.world, group.rank)
    index = torch.cat([torch.arange(a, b) for a, b in ranges]).to(input_ids.device)
    scored = index < n - 1  # every position but the sequence's last predicts a token
    positions = index[None].expand(batch, -1) if position_ids is None else position_ids[:, index]
    set_documents(position_ids, group)
    with global_regime(model, n):
        hidden = _final_hidden(model, input_ids[:, index], positions)[:, scored]
    return index[scored] + 1, hidden


def iter_full_gradients(model):
    """(name, full gradient on the parameter's device) for each parameter with a gradient, named as
    in the unwrapped model, one at a time: every rank must iterate to the end (each full gradient is
    a collective), and only one full gradient exists at once (an 8B model's would not fit twice)."""
    inner = model.model if isinstance(model, ContextParallelLM) else model
    for name, p in inner.named_parameters():
        if p.grad is not None:
            g = p.grad
            yield name, (g.full_tensor() if hasattr(g, "full_tensor") else g).detach()


def full_gradients(model) -> dict[str, torch.Tensor]:
    """{name: full gradient} on every rank, on the CPU (FSDP2 keeps shards as DTensors)."""
    return {name: g.cpu() for name, g in iter_full_gradients(model)}


def full_state(root: ContextParallelLM, optimizer) -> tuple[dict, dict]:
    """(model, optimizer) full state dicts on the CPU of rank 0 (empty elsewhere), the model's
    keys as in the unwrapped model. A collective: every rank calls it."""
    msd, osd = get_state_dict(root, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _unprefixed(msd), osd


def _unprefixed(root_state: dict) -> dict:
    """The root's state dict keyed as the unwrapped model's."""
    return {k[len(_PREFIX):]: v for k, v in root_state.items()}


def load_full_state(root: ContextParallelLM, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Inverse of `full_state`; every rank passes the same full dicts (read from the checkpoint)."""
    set_state_dict(root, optimizer, model_state_dict={_PREFIX + k: v for k, v in model_state.items()},
                   optim_state_dict=optimizer_state, options=StateDictOptions(full_state_dict=True))


def unsharded_copy(model, model_state: dict, attention: str = "sdpa"):
    """A plain (unsharded, CPU, float32) copy of `model` holding `model_state`, attending with
    `attention`: what gets exported after a sharded run."""
    config = copy.deepcopy(model.config)
    config._attn_implementation = attention
    with torch.device("cpu"):
        fresh = type(model)(config)
    fresh.load_state_dict(model_state)
    return fresh.float()
