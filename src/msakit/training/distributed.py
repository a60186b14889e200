"""Training on several processes: `torchrun --standalone --nproc_per_node N --no-python msakit train ...`.

torchrun starts N copies of the command and tells each its place in the environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `msakit train` then opens a process group for
its trainings (`session`: NCCL between CUDA GPUs, one per process, gloo on the CPU) and the one
training loop runs on every process with the model in DistributedDataParallel: each batch of the
seeded order is shared out between the ranks, gradients are averaged by DDP, evaluation is shared
out and its predictions gathered so every rank scores the whole split, and rank 0 alone writes
files. Every other helper here is the identity, or rank 0 of 1, when no process group is open, so
the loop has one code path.
"""

from __future__ import annotations

import gc
import inspect
import itertools
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from msakit.errors import MsakitError

Value = TypeVar("Value")
_SESSIONS = itertools.count()  # the sessions this process has opened (every rank opens the same)
# buffers not sent at every forward pass: torch 2.13 renamed DDP's broadcast_buffers
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether a process group is open (this process trains as one rank of several)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files and shows progress (under torchrun, also before
    and after a session)."""
    return rank() == 0 if active() else os.environ.get("RANK", "0") == "0"


def rank_device(device: torch.device) -> torch.device:
    """The device this rank computes on: under torchrun, a CUDA device is the rank's own GPU
    (cuda:LOCAL_RANK); a GPU named by its index is refused, since every rank would take it."""
    if not launched() or device.type != "cuda":
        return device
    if device.index is not None:
        raise MsakitError(f"training.device={device} names one GPU, but under torchrun each process "
                          "takes its own (cuda:LOCAL_RANK): use training.device=cuda or auto")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise MsakitError(f"torchrun started local rank {local}, but this machine has "
                          f"{torch.cuda.device_count()} CUDA GPU(s): use --nproc_per_node "
                          f"{torch.cuda.device_count()} or fewer")
    return torch.device("cuda", local)


@contextmanager
def session(device: torch.device) -> Iterator[None]:
    """Under torchrun, a process group for the trainings run inside (NCCL for CUDA devices, gloo for
    the CPU), closed at the end; log messages below warnings are left to rank 0. Without
    torchrun, or inside an open session, nothing."""
    if not launched() or active():
        yield
        return
    device = rank_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store, own_rank, ranks = next(dist.rendezvous("env://"))
    # a process group's keys in torchrun's store are named after the group, and a group opened
    # after another closed has the same name: each session gets keys of its own, or a rank
    # could read the addresses of the closed group's processes and wait on them for ever
    store = dist.PrefixStore(f"msakit-session-{next(_SESSIONS)}", store)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=own_rank,
                            world_size=ranks)
    messages = logging.getLogger("msakit")
    level = messages.level
    if not is_main():
        messages.setLevel(logging.WARNING)
    try:
        yield
    finally:
        messages.setLevel(level)
        close()


def close() -> None:
    """Closes the open process group. DDP wrappers that a reference cycle keeps alive (a trainer and
    its model) are collected first: freed during interpreter shutdown, after the group, their
    pending gloo work aborts the process (SIGABRT, "terminate called without an active
    exception"), in 8 of 30 two-rank runs of tests/test_grad_features.py's check."""
    gc.collect()
    dist.destroy_process_group()


def wrap(model: nn.Module) -> nn.Module:
    """`model` in DistributedDataParallel when a process group is open, else `model` itself.

    Unused parameters are looked for at every step: stages freeze parts of a model (MMSLF's
    teacher) and branches depend on the batch (missing modalities), so a parameter may have no
    gradient on one rank and one on another. Wrap again after a stage changes which parameters
    train: DDP averages the gradients of those that trained when it was built. Buffers are not
    sent at every step (HME's memory bank is one; every rank builds the same) but once an epoch
    (`align_buffers`)."""
    if not active():
        return model
    return DistributedDataParallel(model, find_unused_parameters=True, **_NO_BUFFER_SYNC)


def align_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics, which each rank updated from its own
    samples) on every rank: evaluation and checkpoints then see one model."""
    if active():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def barrier() -> None:
    """Wait for every rank (after rank 0 has changed files the others read)."""
    if active():
        dist.barrier()


def from_main(value: Value) -> Value:
    """Rank 0's `value` on every rank (a decision all must take the same way)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Value) -> list[Value]:
    """Every rank's `value`, in rank order, on every rank."""
    if not active():
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def concatenate(parts: list[np.ndarray]) -> np.ndarray:
    """Every rank's `parts` concatenated in rank order (one array on every rank)."""
    return np.concatenate([part for ranks_parts in gather(parts) for part in ranks_parts])


def total(*values: float) -> list[float]:
    """The sums of `values` over the ranks."""
    if not active():
        return list(values)
    sums = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        sums = sums.cuda()
    dist.all_reduce(sums)
    return sums.tolist()
