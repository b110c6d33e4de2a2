"""FSDP2 sharding: one unit per decoder layer plus the root, which keeps the embeddings, the
final norm and the lm_head (so tied weights stay in one unit and the fused loss runs inside
the root's forward, where the lm_head gradient is reduced like any other).

Full sharding spreads every unit over all ranks; hybrid sharding (HSDP) shards it over the
`shard_size` ranks of a node and replicates it across nodes, so the per-layer all-gathers and
reduce-scatters stay on the fast intra-node links and only one all-reduce of the gradient shards
per step crosses nodes."""

import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..config import require
from ..distributed import DEFAULT_TIMEOUT_S, ProcessInfo


@dataclass
class DistributedConfig:
    """fsdp: "auto" (shard when world_size > 1), "on" (full sharding over every rank), "hybrid"
    (shard within groups of shard_size ranks, replicate across them: HSDP), "off". shard_size:
    the ranks a hybrid unit is sharded over; 0 (default) means the processes of one node
    (torchrun's LOCAL_WORLD_SIZE, i.e. the GPUs of a node); it must divide the world size.
    mixed_precision: "none" or "bf16" (FSDP2 MixedPrecisionPolicy when sharded, autocast
    otherwise). timeout_s: how long a collective waits for the other ranks before the waiting
    ones exit naming the silent rank; default 1800 s, sized for a 70B checkpoint write
    (fastnpo.distributed.DEFAULT_TIMEOUT_S); lower it on preemptible machines to learn of a
    frozen rank sooner."""

    fsdp: str = "auto"
    shard_size: int = 0
    mixed_precision: str = "none"
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self):
        # YAML 1.1 reads on / off (and true / false) as booleans, which reach a str field as
        # "True" / "False": `fsdp: off` means off.
        self.fsdp = {"True": "on", "False": "off"}.get(str(self.fsdp), self.fsdp)
        require(
            self.fsdp in ("auto", "on", "hybrid", "off"),
            "distributed.fsdp",
            "must be auto, on, hybrid or off",
            self.fsdp,
        )
        size = self.shard_size
        require(
            isinstance(size, int) and not isinstance(size, bool) and size >= 0,
            "distributed.shard_size",
            "must be an int >= 0",
            size,
        )
        require(size == 0 or self.fsdp == "hybrid", "distributed.shard_size", "is for distributed.fsdp=hybrid", size)
        precision = self.mixed_precision
        require(precision in ("none", "bf16"), "distributed.mixed_precision", "must be none or bf16", precision)
        timeout = self.timeout_s
        require(math.isfinite(timeout) and timeout > 0, "distributed.timeout_s", "must be seconds > 0", timeout)


def use_fsdp(config: DistributedConfig, info: ProcessInfo) -> bool:
    if config.fsdp == "off" and info.distributed:
        raise ValueError("distributed.fsdp=off with several processes: data parallelism needs FSDP here")
    return config.fsdp in ("on", "hybrid") or (config.fsdp == "auto" and info.distributed)


def hybrid_shape(config: DistributedConfig, info: ProcessInfo) -> tuple[int, int] | None:
    """(replicas, shard_size) of distributed.fsdp=hybrid, checked against the world size before any
    work (ValueError naming the settings); None for full sharding."""
    if config.fsdp != "hybrid":
        return None
    size = config.shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    if size < 1 or info.world_size % size:
        raise ValueError(
            f"distributed.fsdp=hybrid: distributed.shard_size={config.shard_size} "
            f"({'the processes per node' if not config.shard_size else 'as set'}: {size}) must divide the "
            f"{info.world_size} processes of this job into equal shard groups"
        )
    return info.world_size // size, size


def device_mesh(config: DistributedConfig, info: ProcessInfo):
    """FSDP2's mesh: 1-D over every rank (full sharding), or 2-D (replicas, shard) for hybrid
    sharding; rank r is in replica r // shard_size, so with torchrun's contiguous ranks per node
    a shard group is one node."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = hybrid_shape(config, info)
    if shape is None:
        return init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(info.device.type, shape, mesh_dim_names=("replicate", "shard"))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a (possibly PEFT-wrapped) HF causal LM."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and module is not model:
            return list(module)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard")


def shard(root: nn.Module, config: DistributedConfig, info: ProcessInfo, offload: bool = False) -> nn.Module:
    """fully_shard each decoder layer, then the root (embeddings, norm, lm_head stay in the root),
    over device_mesh(config, info).

    offload (optim.offload): CPUOffloadPolicy keeps every shard, its gradient and so the optimizer
    state in CPU memory (pinned on GPU machines, for asynchronous copies); a unit's parameters come
    to the GPU for its forward and backward only, its gradients go back once reduced."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if config.mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    placement = CPUOffloadPolicy(pin_memory=info.device.type == "cuda") if offload else OffloadPolicy()
    options = dict(
        mesh=device_mesh(config, info),
        mp_policy=policy,
        offload_policy=placement,
        reshard_after_forward=config.reshard_after_forward,
    )
    for layer in decoder_layers(root):
        fully_shard(layer, **options)
    fully_shard(root, **options)
    return root
