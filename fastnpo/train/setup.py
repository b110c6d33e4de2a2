"""Everything a run builds before its first step: tokenizer, data, example weights, the
reference log-probs, the model wrapped for training (LoRA, activation checkpointing, the fused
log-prob wrapper, FSDP2), the optimizer and its schedule. (The output folder: output.py.)

The train loop calls these in a fixed order; the order matters for bit-exact reruns (LoRA
initialisation draws from the RNG after the model is loaded)."""

import copy
import dataclasses
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from ..data import build_unlearning_data
from ..distributed import ProcessInfo
from ..files import check_model_source
from ..methods import Method, PrepareInputs
from ..modeling import SequenceLogprobModel, add_lora, checkpoint_dtype, load_causal_lm, output_weight
from ..modeling import load_tokenizer as load_tokenizer_from
from ..refcache import item_target_hidden_states, reference_logprobs
from . import sharding
from .config import Config, ConfigError, default_cache_dir
from .optimizers import KahanAdamW, adamw_8bit

# optim.offload moves state from GPU memory to CPU memory: meaningless on any other device. Tests
# add "cpu" to run the same code path (FSDP2's offload policy over one process) on the CPU.
OFFLOAD_DEVICES = ("cuda",)


def check_offload(config: Config, info: ProcessInfo, log) -> None:
    """optim.offload, before any work: refused without a CUDA GPU, and refused when the planned host
    memory of this node's processes (memory_plan: shards, gradients, optimizer state) exceeds what
    the node has available, rather than being killed after the model is loaded and pinned."""
    if not config.optim.offload:
        return
    if info.device.type not in OFFLOAD_DEVICES:
        raise ConfigError(
            f"optim.offload: moves the optimizer state from GPU memory to CPU memory and needs a CUDA GPU; "
            f"this run's device is {info.device.type} (run.device={config.run.device!r}): set optim.offload=false"
        )
    from .memory_plan import DEFAULT_GPU_GIB, plan

    try:  # the host memory does not depend on the GPU's size
        per_process = plan(config, gpus=info.world_size, gpu_gib=DEFAULT_GPU_GIB)["host_memory_gib"]
    except (OSError, ValueError) as error:  # a model the planner cannot read: loading it will say more
        log(f"optim.offload: no host-memory plan ({error})")
        return
    node = per_process * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    available = available_host_gib()
    shown = "unknown" if available is None else f"{available:.1f} GiB"
    log(f"optim.offload: planned host memory {node:.1f} GiB on this node, {shown} available")
    if available is not None and node > available:
        raise ConfigError(
            f"optim.offload: the parameter shards, gradients and optimizer state need about {node:.1f} GiB of "
            f"host memory on this node (fastnpo plan), {available:.1f} GiB is available: use more nodes, "
            "optim.name=adamw_kahan optim.state_dtype=bfloat16 (10 bytes per parameter), or no offload"
        )


def available_host_gib() -> float | None:
    """MemAvailable of /proc/meminfo in GiB (Linux), else None."""
    try:
        with open("/proc/meminfo") as meminfo:
            line = next(line for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 2**20


def check_model_sources(config: Config) -> None:
    """model.name_or_path and model.tokenizer, before any work: a missing folder, or a hub name
    while the hub is off or unreachable, is refused in a second (files.check_model_source), not
    after the hub client's minute of retries."""
    check_model_source(config.model.name_or_path, "model.name_or_path")
    if config.model.tokenizer and config.model.tokenizer != config.model.name_or_path:
        check_model_source(config.model.tokenizer, "model.tokenizer")


def resolve_model_dtype(config: Config, log) -> Config:
    """model.dtype "auto" made concrete, once, before anything depends on it (the reference cache's
    key, the optimizer, config.yaml): the dtype the model's config.json names, else float32, as
    `fastnpo plan` plans it. Plain AdamW on 16-bit parameters loses small updates: said, not refused."""
    m = config.model
    if m.dtype != "auto":
        return config
    dtype = checkpoint_dtype(m.name_or_path, what="model.name_or_path")
    log(f"model.dtype=auto: {dtype} (the model's config)")
    if dtype != "float32" and config.optim.name == "adamw":
        log(
            f"note: plain AdamW on {dtype} parameters has no fp32 master copy and loses updates much smaller "
            "than the weights (docs/trainer.md: optim); optim.name=adamw_kahan or model.dtype=float32 keeps them"
        )
    return dataclasses.replace(config, model=dataclasses.replace(m, dtype=dtype))


def load_tokenizer(config: Config):
    what = "model.tokenizer" if config.model.tokenizer else "model.name_or_path"
    return load_tokenizer_from(config.model.tokenizer or config.model.name_or_path, what=what)


def load_model(config: Config, device: torch.device) -> nn.Module:
    m = config.model
    model = load_causal_lm(
        m.name_or_path,
        dtype=m.dtype,
        attn_implementation=m.attn_implementation,
        random_init=m.random_init,
        what="model.name_or_path",
    )
    return model.to(device)


def load_data(config: Config, tokenizer, method: Method, micro_per_step: int):
    """The example sets the method reads, and the step sampler. The sampler draws GLOBAL
    batches (micro-batch size x processes x grad_accum) so that the data order, and hence the
    run, does not depend on how a step is split across processes."""
    data_config = dataclasses.replace(
        config.data,
        retain=config.data.retain if "retain" in method.sets else "",
        batch_size=config.data.batch_size * micro_per_step,
        retain_batch_size=config.data.retain_batch_size * micro_per_step,
    )
    data = build_unlearning_data(data_config, tokenizer, idk="idk" in method.sets, alternate="alternate" in method.sets)
    sets = {"forget": data.forget.items}
    if data.retain is not None:
        sets["retain"] = data.retain.items
    if data.idk is not None:
        sets["idk"] = data.idk.items
    if data.alternate is not None:
        sets["alternate"] = data.alternate.items
    return sets, data.batches


def load_example_weights(config: Config, forget: list[dict]) -> torch.Tensor | None:
    """run.example_weights as a tensor indexed by forget example index (the row in the forget
    split), or None; refused before any work unless it has a weight for every example in `forget`."""
    if not config.run.example_weights:
        return None
    path = Path(config.run.example_weights)
    if not path.is_file():
        raise FileNotFoundError(f"run.example_weights: no such file: {str(path)!r}")
    try:
        weights = torch.tensor(json.loads(path.read_text()), dtype=torch.float32)
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        raise ConfigError(f"run.example_weights {str(path)!r}: not a JSON list of numbers ({error})") from None
    if weights.dim() != 1 or bool((weights < 0).any()) or not torch.isfinite(weights).all():
        raise ConfigError("run.example_weights must be a JSON list of finite numbers >= 0")
    needed = 1 + max((item["index"] for item in forget), default=-1)
    if len(weights) < needed:
        raise ConfigError(
            f"run.example_weights {str(path)!r}: {len(weights)} weights, but the forget set's examples "
            f"reach row {needed - 1} of data.forget_split={config.data.forget_split!r} (one weight per row)"
        )
    return weights


def reference_cache_dir(config: Config) -> Path:
    """run.cache_dir: load_config has resolved an empty one already; a Config built without it
    gets the same folder (config.default_cache_dir: ref-cache/ beside the output folder)."""
    return Path(config.run.cache_dir or default_cache_dir(config.run.output_dir))


def cached_reference_logprobs(config: Config, model, tokenizer, sets, ref_sets, info: ProcessInfo, log):
    """The reference pass (refcache.reference_logprobs), cached in run.cache_dir (reference_cache_dir)."""
    return reference_logprobs(
        model,
        tokenizer,
        {name: sets[name] for name in ref_sets},
        pad_token_id=tokenizer.pad_token_id,
        batch_size=2 * config.data.batch_size,
        impl=config.model.impl,
        cache_dir=reference_cache_dir(config),
        info=info,
        progress=config.run.progress,
        log=log,
    )


def prepare_method(config: Config, method: Method, model: nn.Module, forget: list[dict], pad_token_id: int):
    """What the method builds once (Method.prepare), from the initial model before any wrapping:
    e.g. frozen copies of layers, or the initial model's final hidden states of every forget
    example's answer tokens (kept in memory for the run on the CPU in the model's dtype, not in the
    on-disk reference cache: they are answer tokens x D numbers, not one per example; every process
    computes all of them in one no-grad forward over the forget set). None: nothing."""
    if method.lora_conflict and config.model.lora.enabled:
        raise ConfigError(f"model.lora.enabled: {method.lora_conflict}; turn LoRA off")

    def target_hidden_states(items):
        wrapper = SequenceLogprobModel(model, impl=config.model.impl)
        return item_target_hidden_states(wrapper, items, pad_token_id, 2 * config.data.batch_size)

    inputs = PrepareInputs(model, config.run.seed, forget, target_hidden_states, output_weight(model))
    try:
        return method.prepare(config.method, inputs)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def frozen_reference(config: Config, model: nn.Module) -> SequenceLogprobModel:
    """A frozen copy of the initial model, for a method whose term needs the reference's full
    distribution (Method.live_reference, e.g. a KL term), which cached per-sequence log-probs
    cannot give. Copy it before any wrapping."""
    return SequenceLogprobModel(copy.deepcopy(model).eval().requires_grad_(False), impl=config.model.impl)


@dataclasses.dataclass
class TrainModel:
    """The model as the loop sees it. `hf` is the Hugging Face model (PEFT-wrapped with LoRA)
    that export and on_epoch_end get; `wrapper` is what the loop calls and checkpoints, sharded
    when `sharded`; `reference` is the frozen copy a live_reference method needs, or None."""

    hf: nn.Module
    wrapper: SequenceLogprobModel
    reference: SequenceLogprobModel | None
    parameters: list[nn.Parameter]
    sharded: bool
    autocast: bool  # bf16 autocast stands in for FSDP's mixed precision when unsharded


def wrap_model(config: Config, model: nn.Module, reference: SequenceLogprobModel | None, info: ProcessInfo):
    """LoRA, activation checkpointing, the fused log-prob wrapper, then FSDP2 (both models)."""
    if config.model.lora.enabled:
        model = add_lora(model, config.model.lora)
    if config.distributed.activation_checkpointing:
        # transformers 5 renamed it; keep working on 4.x.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapper = SequenceLogprobModel(model, impl=config.model.impl)
    offload = config.optim.offload
    sharded = offload or sharding.use_fsdp(config.distributed, info)
    if sharded:
        sharding.shard(wrapper, config.distributed, info, offload=offload)
        if reference is not None:
            sharding.shard(reference, config.distributed, info, offload=offload)
    return TrainModel(
        hf=model,
        wrapper=wrapper,
        reference=reference,
        parameters=[p for p in wrapper.parameters() if p.requires_grad],
        sharded=sharded,
        autocast=config.distributed.mixed_precision == "bf16" and not sharded,
    )


def linear_schedule(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def check_optimizer(config: Config) -> None:
    """What optim.name needs of the rest of the config and of the installation, checked before any
    work (the trainer calls it once model.dtype is resolved, before the reference pass)."""
    o = config.optim
    if o.name == "adamw_kahan" and config.model.dtype != "bfloat16":
        raise ConfigError(
            f"optim.name: adamw_kahan keeps bf16 parameters and needs model.dtype=bfloat16, "
            f"got model.dtype={config.model.dtype!r} (use optim.name=adamw)"
        )
    if o.name == "adamw_8bit":
        import importlib.util

        if importlib.util.find_spec("torchao") is None:
            raise ConfigError("optim.name: adamw_8bit is torchao's AdamW8bit: pip install 'fastnpo[lean]'")


def build_optimizer(config: Config, parameters, steps_per_epoch: int):
    """The optimizer named by optim.name (AdamW, or KahanAdamW for bf16 parameters without an
    fp32 master copy) and its linear warm-up / decay schedule; returns (optimizer, scheduler,
    total steps). With optim.offload the parameters are CPU DTensors (FSDP2's offload policy), so
    the state is made, and the step runs, in CPU memory."""
    o = config.optim
    check_optimizer(config)
    if o.name == "adamw_kahan":
        optimizer = KahanAdamW(
            parameters, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, state_dtype=o.state_dtype
        )
    elif o.name == "adamw_8bit":
        bf16 = config.model.dtype == "bfloat16"
        args = dict(lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, stochastic_rounding=bf16)
        optimizer = adamw_8bit(parameters, **args)
    else:
        # Looked up at call time: tests swap torch.optim.AdamW for a gradient recorder. Offloaded,
        # the state and the step are in CPU memory, where the fused step is the fast one.
        fused = {"fused": True} if o.offload else {}
        optimizer = torch.optim.AdamW(
            parameters, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, **fused
        )
    total_steps = o.max_steps or math.ceil(o.epochs * steps_per_epoch)
    warmup_steps = round(o.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total_steps, warmup_steps))
    return optimizer, scheduler, total_steps
