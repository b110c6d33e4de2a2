"""Everything distributed: process setup, FSDP2 sharding, DCP checkpoints, the final export.

One process without torchrun is a plain run (no process group). Under torchrun: nccl on
GPU, gloo on CPU, one FSDP2 unit per decoder layer plus the root, which keeps the
embeddings, the final norm and the lm_head (so tied weights stay in one unit and the fused
loss runs inside the root's forward).
"""

import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistributedConfig:
    """fsdp: "auto" (shard when world_size > 1), "on", "off". mixed_precision: "none" or
    "bf16" (FSDP2 MixedPrecisionPolicy when sharded, autocast otherwise)."""

    fsdp: str = "auto"
    mixed_precision: str = "none"
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True


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


def setup(device: str = "auto") -> ProcessInfo:
    """Join the torchrun job if there is one (env:// rendezvous, multi-node included)."""
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
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
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


def all_gather_objects(obj, info: ProcessInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def use_fsdp(config: DistributedConfig, info: ProcessInfo) -> bool:
    if config.fsdp not in ("auto", "on", "off"):
        raise ValueError(f"distributed.fsdp must be auto, on or off, got {config.fsdp!r}")
    if config.fsdp == "off" and info.distributed:
        raise ValueError("distributed.fsdp=off with several processes: data parallelism needs FSDP here")
    return config.fsdp == "on" or (config.fsdp == "auto" and info.distributed)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a (possibly PEFT-wrapped) HF causal LM."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and module is not model:
            return list(module)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard")


def shard(root: nn.Module, config: DistributedConfig, info: ProcessInfo) -> nn.Module:
    """fully_shard each decoder layer, then the root (embeddings, norm, lm_head stay in the root)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if config.mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(root):
        fully_shard(layer, mp_policy=policy, reshard_after_forward=config.reshard_after_forward)
    fully_shard(root, mp_policy=policy, reshard_after_forward=config.reshard_after_forward)
    return root


# ----------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_steps(directory: Path) -> list[int]:
    """Steps of the complete checkpoints in `directory` (a checkpoint is complete once renamed)."""
    if not directory.is_dir():
        return []
    return sorted(
        int(p.name.split("_")[1]) for p in directory.glob("step_*") if (p / "trainer.json").exists()
    )


def save_checkpoint(
    directory: Path,
    step: int,
    model: nn.Module,
    optimizer,
    trainer_state: dict,
    info: ProcessInfo,
    keep: int = 2,
) -> Path:
    """Model + optimizer through torch.distributed.checkpoint (sharded, every rank writes its
    part), trainer state and each rank's RNG. Written under a temporary name and renamed by
    rank 0 when every rank is done, so a kill mid-save leaves the previous checkpoint usable."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = directory / f"step_{step}"
    partial = directory / f".partial_step_{step}"
    if info.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier(info)
    model_state, optim_state = get_state_dict(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(partial))
    torch.save(_rng_state(), partial / f"rng_rank{info.rank}.pt")
    barrier(info)
    if info.is_main:
        (partial / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        for old in checkpoint_steps(directory)[:-keep] if keep > 0 else []:
            shutil.rmtree(directory / f"step_{old}", ignore_errors=True)
    barrier(info)
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer, info: ProcessInfo) -> dict:
    """Restore what save_checkpoint wrote; returns the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng_rank{info.rank}.pt"
    if not rng_file.exists():
        raise ValueError(
            f"checkpoint {path} has no RNG state for rank {info.rank}: saved with another world size?"
        )
    _set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / "trainer.json").read_text())


def full_state_dict(model: nn.Module) -> dict:
    """Unsharded CPU state dict (on every rank; only rank 0 should write it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
