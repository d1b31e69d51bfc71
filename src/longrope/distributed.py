"""Processes started by torchrun: where this one stands, joining the group, and agreeing on results.

Generic: nothing here knows what the processes compute. The CLI uses it to report an error once
and to exit cleanly, the search to share candidates, training (`train.parallel`) to shard a model
and its sequences, the pipeline to let rank 0 alone write.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UsageError

RANK_ERROR_GRACE_S = 20.0  # how long a rank > 0 waits for rank 0 to report a shared error


@dataclass(frozen=True)
class Group:
    """This process's place in a torchrun world."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size() -> int:
    """How many processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun), readable before joining."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its host (0 without torchrun): which GPU it takes."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def exit_without_teardown(code: int) -> None:
    """End a rank at once, once its process group is destroyed and its outputs are written. Left to
    the interpreter's exit, torch's C++ distributed threads (gloo's), which outlive
    `destroy_process_group`, can abort the process during teardown ("terminate called without an
    active exception", glibc's "double free or corruption"; seen in about 1 in 40 two-rank runs
    here), and torchrun then reports a finished run as failed. Skipping the teardown skips nothing
    of ours: every output is written and closed by then; the standard streams are flushed here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def before_error_exit(exc: UsageError) -> None:
    """Under torchrun every rank meets the same bad input and rank 0 prints it; torchrun then stops
    the other ranks. A rank > 0 that exited first could get rank 0 stopped before it prints, so it
    waits RANK_ERROR_GRACE_S here (an error that one rank may meet alone is printed at once)."""
    if world_size() > 1 and launched_rank() != 0 and not exc.rank_specific:
        time.sleep(RANK_ERROR_GRACE_S)


def leave(wait: bool = True) -> None:
    """Leave the process group a command joined (nothing without one): a gloo group left to the
    interpreter's exit can abort the process ("terminate called without an active exception").
    `wait`: first a barrier, so that nobody tears down while another rank's last messages are in
    flight (only after success: after a failure the other ranks may never arrive)."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def init(device_type: str) -> Group:
    """Join the torchrun world (NCCL on CUDA, gloo on the CPU); one GPU per local rank."""
    rank, world, local = launched_rank(), world_size(), local_rank()
    if device_type == "cuda":
        if local >= torch.cuda.device_count():
            raise UsageError(f"torchrun local rank {local} has no GPU ({torch.cuda.device_count()} visible); "
                             "use --nproc-per-node at most the number of GPUs", rank_specific=True)
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    join("nccl" if device.type == "cuda" else "gloo", device)
    return Group(rank, world, device)


def join(backend: str, device: torch.device | None = None, timeout_minutes: float | None = None) -> None:
    """Join the process group torchrun describes, once (later calls do nothing). `timeout_minutes`:
    how long a collective may wait (torch's default otherwise)."""
    if dist.is_initialized():
        return
    kwargs: dict = {}
    if timeout_minutes is not None:
        kwargs["timeout"] = datetime.timedelta(minutes=timeout_minutes)
    if device is not None and device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(backend, **kwargs)


def first_error(error: str | None) -> str | None:
    """Every rank's error (None: it is fine), gathered on every rank: the first one, or None. Unlike
    `agree`, an error of any rank (a replica that failed to load) reaches rank 0."""
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def agree(group: Group, fn, everyone: bool = False):
    """Run `fn` on rank 0 only (it may touch the file system), or on every rank with `everyone`
    (a collective job such as a distributed search), and give every rank rank 0's result, or
    raise rank 0's UsageError on every rank (so no rank is left waiting in a collective)."""
    box = [None, None]
    if group.is_main or everyone:
        try:
            value = fn()
            if group.is_main:
                box[0] = value
        except UsageError as exc:
            if not group.is_main:
                raise
            box[1] = str(exc)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise UsageError(box[1])
    return box[0]


def barrier() -> None:
    dist.barrier()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum over the ranks of `value` (a detached copy; `value` is left as it is)."""
    value = value.detach().clone()
    dist.all_reduce(value)
    return value
