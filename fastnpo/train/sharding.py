"""FSDP2 sharding: one unit per decoder layer plus the root, which keeps the embeddings, the
final norm and the lm_head (so tied weights stay in one unit and the fused loss runs inside
the root's forward, where the lm_head gradient is reduced like any other)."""

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import require
from ..distributed import DEFAULT_TIMEOUT_S, ProcessInfo


@dataclass
class DistributedConfig:
    """fsdp: "auto" (shard when world_size > 1), "on", "off". mixed_precision: "none" or
    "bf16" (FSDP2 MixedPrecisionPolicy when sharded, autocast otherwise). timeout_s: how long a
    collective waits for the other ranks before the waiting ones exit naming the silent rank;
    default 1800 s, sized for a 70B checkpoint write (fastnpo.distributed.DEFAULT_TIMEOUT_S);
    lower it on preemptible machines to learn of a frozen rank sooner."""

    fsdp: str = "auto"
    mixed_precision: str = "none"
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self):
        # YAML 1.1 reads on / off (and true / false) as booleans, which reach a str field as
        # "True" / "False": `fsdp: off` means off.
        self.fsdp = {"True": "on", "False": "off"}.get(str(self.fsdp), self.fsdp)
        require(self.fsdp in ("auto", "on", "off"), "distributed.fsdp", "must be auto, on or off", self.fsdp)
        precision = self.mixed_precision
        require(precision in ("none", "bf16"), "distributed.mixed_precision", "must be none or bf16", precision)
        timeout = self.timeout_s
        require(math.isfinite(timeout) and timeout > 0, "distributed.timeout_s", "must be seconds > 0", timeout)


def use_fsdp(config: DistributedConfig, info: ProcessInfo) -> bool:
    if config.fsdp == "off" and info.distributed:
        raise ValueError("distributed.fsdp=off with several processes: data parallelism needs FSDP here")
    return config.fsdp == "on" or (config.fsdp == "auto" and info.distributed)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a (possibly PEFT-wrapped) HF causal LM."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and module is not model:
            return list(module)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard")


def shard(root: nn.Module, config: DistributedConfig, info: ProcessInfo, offload: bool = False) -> nn.Module:
    """fully_shard each decoder layer, then the root (embeddings, norm, lm_head stay in the root).

    offload (optim.offload): CPUOffloadPolicy keeps every shard, its gradient and so the optimizer
    state in CPU memory (pinned on GPU machines, for asynchronous copies); a unit's parameters come
    to the GPU for its forward and backward only, its gradients go back once reduced."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if config.mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    placement = CPUOffloadPolicy(pin_memory=info.device.type == "cuda") if offload else OffloadPolicy()
    options = dict(mp_policy=policy, offload_policy=placement, reshard_after_forward=config.reshard_after_forward)
    for layer in decoder_layers(root):
        fully_shard(layer, **options)
    fully_shard(root, **options)
    return root
