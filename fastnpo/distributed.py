"""Processes: join a torchrun job (or run as one plain process) and the few collectives used
outside the model (barrier, sums, a shared yes/no, gathering Python objects).

One process without torchrun is a plain run (no process group). Under torchrun: nccl on
GPU, gloo on CPU. Sharding and checkpoints live in fastnpo.train (sharding.py, checkpoint.py).
"""

import os
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


def setup(device: str = "auto", *, offload: bool = False) -> ProcessInfo:
    """Join the torchrun job if there is one (env:// rendezvous, multi-node included).

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
            dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        else:  # no torchrun: a group of one over an in-process store
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return ProcessInfo(rank, world_size, local_rank, target)


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
