"""Processes: join a torchrun job (or run as one plain process) and the few collectives used
outside the model (barrier, sums, a shared yes/no, gathering Python objects).

One process without torchrun is a plain run (no process group). Under torchrun: nccl on
GPU, gloo on CPU. Sharding and checkpoints live in fastnpo.train (sharding.py, checkpoint.py).
"""

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class ProcessInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# distributed.timeout_s's default: the longest a rank may wait in one collective for the others.
# The longest legitimate wait is a checkpoint write: a 70B model trained in full keeps fp32
# parameters and two fp32 Adam moments, 12 B x 70e9 = 840 GB of DCP shards; one node of 8 GPUs
# (CPU offload) writing them at ~1 GB/s to shared storage takes ~840 s, and rank 0 exporting the
# 140 GB bf16 model at 0.5 GB/s ~280 s. 1800 s (torch's own default) leaves twice the worst of those.
DEFAULT_TIMEOUT_S = 1800.0


class CollectiveTimeout(TimeoutError):
    """A collective outlived distributed.timeout_s: a rank frozen, killed or far slower. A
    TimeoutError (an OSError), so the CLI ends with its one-line error and exit status 2."""


def setup(device: str = "auto", *, offload: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S) -> ProcessInfo:
    """Join the torchrun job if there is one (env:// rendezvous, multi-node included).

    timeout_s (distributed.timeout_s): how long a collective waits for the other ranks before it
    fails (gloo raises it on the waiting ranks: see raise_if_timeout; nccl's watchdog ends the
    process with its own message).

    offload (optim.offload, FSDP2's CPU offload): a process group even for one process, since
    FSDP2 shards over a group (of one here), and on GPU gloo beside nccl, for the collectives on
    the gradients that live in CPU memory (clipping's global norm)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device(device)
    if (world_size > 1 or offload) and not dist.is_initialized():
        backend = "gloo"
        if target.type == "cuda":
            backend = "cuda:nccl,cpu:gloo" if offload else "nccl"
        if world_size > 1:
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        else:  # no torchrun: a group of one over an in-process store
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return ProcessInfo(rank, world_size, local_rank, target)


def raise_if_timeout(error: BaseException, info: ProcessInfo, timeout_s: float) -> None:
    """Raise CollectiveTimeout (from `error`) if `error` is a collective that timed out, naming the
    unresponsive rank when it can be known: gloo's message ("Timed out waiting 10000ms for recv
    operation to complete") names no peer, so only a two-rank job knows it (the other one)."""
    if not info.distributed or not isinstance(error, RuntimeError):
        return
    if not re.search(r"timed out|timeout", str(error), re.IGNORECASE):
        return
    if info.world_size == 2:
        who = f"rank {1 - info.rank}"
    else:
        who = f"another rank (of {info.world_size}; gloo does not say which)"
    raise CollectiveTimeout(
        f"{who} did not answer within distributed.timeout_s={timeout_s:g} s "
        "(a collective timed out: a rank frozen, killed or far slower; raise distributed.timeout_s "
        "if a step or a checkpoint write legitimately takes longer)"
    ) from error


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: ProcessInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, info: ProcessInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_true(flag: bool, info: ProcessInfo) -> bool:
    """Whether `flag` holds on every rank (an all-reduce MIN): one decision all ranks share, so
    none takes a branch that enters collectives the others skip."""
    if not info.distributed:
        return bool(flag)
    # nccl reduces only device tensors; gloo takes CPU ones.
    device = info.device if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def all_gather_objects(obj, info: ProcessInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
