"""`fastnpo plan`: will a run fit? Per-GPU peak memory by component, before any work.

Reads a run config (or --model plus dotted overrides), counts the model's parameters on the
meta device (never loads weights), estimates every component (memory_estimate.py states the
formulas), prints a table (or --json) against the GPU memory and says which settings would fit.

The dtype planned: model.dtype; "auto" (its default) as the trainer resolves it: the dtype the
model's own config names (config.json `dtype`, or `torch_dtype` before transformers 5), else
float32. The GPU memory: --gpu-memory, else the config's run.gpu_memory_gib, else the
visible GPU's, else DEFAULT_GPU_GIB. The plan says where each came from.

`fastnpo plan` (fastnpo/cli.py) parses the arguments, calls plan() and prints its table; a plan
that does not fit makes the command exit with EXIT_DOES_NOT_FIT.
"""

import math
from dataclasses import asdict, replace
from pathlib import Path

from ..config import ConfigError
from ..files import check_model_source
from ..methods import MethodConfig, method_for
from ..modeling import config_dtype
from .communication import (
    DEFAULT_INTER_NODE_GBPS,
    DEFAULT_INTRA_NODE_GBPS,
    communication_plan,
    step_collectives,
)
from .config import Config
from .memory_estimate import (
    DTYPE_BYTES,
    FRAGMENTATION,
    GIB,
    ModelShape,
    Settings,
    compute_bytes,
    estimate,
    state_bytes_per_parameter,
    trainable_params,
    with_settings,
)

# Public config.json values (no hub access at plan or test time). Llama-3.x rope_scaling does
# not change any parameter count and is left out.
# dtype: what the hub's config.json names (torch_dtype); the Gemma-2 entries name none (float32 planned).
_LLAMA = dict(
    model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500000.0, vocab_size=128256, dtype="bfloat16"
)
KNOWN_MODELS = {
    "meta-llama/Llama-3.2-1B": dict(
        _LLAMA,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    "meta-llama/Llama-3.1-8B": dict(
        _LLAMA,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
    "meta-llama/Llama-3.1-70B": dict(
        _LLAMA,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
    "Qwen/Qwen2.5-7B": dict(
        model_type="qwen2",
        dtype="bfloat16",
        hidden_act="silu",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    ),
    "google/gemma-2-9b": dict(
        model_type="gemma2",
        hidden_activation="gelu_pytorch_tanh",
        vocab_size=256000,
        hidden_size=3584,
        intermediate_size=14336,
        num_hidden_layers=42,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        tie_word_embeddings=True,
    ),
}
# Instruct / chat variants share the base model's shape.
for _name in list(KNOWN_MODELS):
    KNOWN_MODELS[_name + "-Instruct"] = KNOWN_MODELS[_name]
KNOWN_MODELS["google/gemma-2-9b-it"] = KNOWN_MODELS["google/gemma-2-9b"]
DEFAULT_GPU_GIB = 80.0
EXIT_DOES_NOT_FIT = 3  # `fastnpo plan`'s exit status when the plan does not fit (the cli's plan parser says it too)


def hf_config(source: str | dict):
    """A transformers config from a KNOWN_MODELS name, a dict of config.json values, a local folder
    with config.json, or a hub name (the hub's config.json only, never weights)."""
    from transformers import CONFIG_MAPPING, AutoConfig

    if isinstance(source, str) and source in KNOWN_MODELS:
        source = KNOWN_MODELS[source]
    if isinstance(source, dict):
        values = dict(source)
        return CONFIG_MAPPING[values.pop("model_type")](**values)
    path = Path(source)
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(f"model.name_or_path: the folder {source} has no config.json")
    known = ", ".join(sorted(k for k in KNOWN_MODELS if not k.endswith(("-Instruct", "-it"))))
    try:
        check_model_source(source, "model.name_or_path")  # in a second, not after the hub client's retries
        return AutoConfig.from_pretrained(source)
    except FileNotFoundError as error:
        raise ConfigError(f"{error}; offline, `fastnpo plan` also knows: {known}") from None
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"model.name_or_path: cannot read the config of {source!r} ({str(error).splitlines()[0]}); "
            f"offline, pass a local folder with config.json or one of: {known}"
        ) from None


def model_shape(
    source: str | dict, lora_targets: tuple[str, ...] = (), lora_r: int = 8, method: MethodConfig | None = None
) -> ModelShape:
    """Count the architecture's parameters exactly by building it on the meta device (method: the
    method config whose own needs, Method.memory, are counted: e.g. the parameters it trains and
    the layers it keeps frozen copies of)."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    from .sharding import decoder_layers

    config = hf_config(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    params = {id(p): p for p in model.parameters()}
    layers = decoder_layers(model)
    layer_params = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    lora = sum(
        lora_r * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in lora_targets
    )
    norms = sum(1 for name, m in layers[0].named_modules() if "norm" in type(m).__name__.lower() and "." not in name)
    heads = text.num_attention_heads
    notes = []
    for name in ("final_logit_softcapping", "logit_scale"):
        value = getattr(text, name, None)
        if value not in (None, 1, 1.0):
            notes.append(f"fastnpo's fused op refuses this model ({name}={value}): this plan is for reference only")
    if getattr(text, "attn_logit_softcapping", None):
        notes.append("attention soft-capping: transformers may use eager attention, which keeps [T, T] scores")
    needs = method_for(method.name).memory(method, model, layers) if method is not None else None
    method_trainable = needs.trainable if needs else 0
    method_frozen_copy = needs.frozen_copy if needs else 0
    method_backward_layers = needs.backward_layers if needs else 0
    return ModelShape(
        name=source if isinstance(source, str) else text.model_type,
        model_type=text.model_type,
        params=sum(p.numel() for p in params.values()),
        layer_params=layer_params,
        layers=len(layers),
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
        tied=bool(getattr(text, "tie_word_embeddings", False)),
        norms_per_layer=max(2, norms),
        largest_tensor=max(p.numel() for p in params.values()),
        linear_params=sum(m.weight.numel() for m in linears),
        lora_params=lora,
        method_trainable=method_trainable,
        method_frozen_copy=method_frozen_copy,
        method_backward_layers=method_backward_layers,
        config_dtype=config_dtype(config),
        notes=tuple(notes),
    )


def settings_from_config(config: Config, gpus: int, device: str = "cuda") -> Settings:
    """The Settings of a run config on `gpus` GPUs (FSDP as distributed.fsdp decides it)."""
    d = config.data
    method = method_for(config.method.name)
    rows = sum(d.retain_batch_size if name == "retain" else d.batch_size for name in method.sets)
    fsdp = config.distributed.fsdp
    if fsdp == "off" and gpus > 1:
        raise ConfigError("distributed.fsdp: off with several GPUs: data parallelism needs FSDP here")
    o = config.optim
    if o.offload and fsdp == "off":  # as check_config refuses it
        raise ConfigError("optim.offload: is FSDP2's CPUOffloadPolicy: set distributed.fsdp=auto or on")
    if o.name == "adamw_kahan" and config.model.dtype != "bfloat16":  # as build_optimizer refuses it
        raise ConfigError(
            f"optim.name: adamw_kahan keeps bf16 parameters and needs model.dtype=bfloat16, "
            f"got model.dtype={config.model.dtype!r} (use optim.name=adamw)"
        )
    return Settings(
        dtype=config.model.dtype,
        mixed_precision=config.distributed.mixed_precision,
        activation_checkpointing=config.distributed.activation_checkpointing,
        gpus=gpus,
        sharded=fsdp in ("on", "hybrid") or (fsdp == "auto" and gpus > 1) or o.offload,
        rows=rows,
        seq_len=max(d.max_length, d.pack_tokens) if d.packing else d.max_length,
        lora=config.model.lora.enabled,
        live_reference_rows=d.retain_batch_size if method.live_reference else 0,
        reference_head=method.keeps_reference_head,
        device=device,
        optimizer=o.name,
        state_dtype=o.state_dtype,
        in_backward=o.in_backward,
        offload=o.offload,
    )


def suggestions(shape: ModelShape, s: Settings, config: Config, budget: int) -> list[str]:
    """Settings changes (one at a time, then combined) under which the estimate fits."""

    def fits(t: Settings) -> bool:
        return estimate(shape, t).total <= budget

    out = []
    if not s.activation_checkpointing and fits(with_settings(s, activation_checkpointing=True)):
        out.append("distributed.activation_checkpointing=true")
    # Every other change is tried with activation checkpointing on: it costs time, not memory.
    ckpt = with_settings(s, activation_checkpointing=True)
    out += _smaller_micro_batch(s, ckpt, config, fits)
    if config.distributed.fsdp != "off":
        out += _more_gpus(s, ckpt, fits)
    out += _leaner_optimizer(s, ckpt, fits)
    if not s.offload and config.distributed.fsdp != "off":
        out += _cpu_offload(shape, s, ckpt, fits)
    if s.offload:
        return out
    out.append(_per_parameter_budget(shape, s, ckpt, budget))
    return out


def _smaller_micro_batch(s: Settings, ckpt: Settings, config: Config, fits) -> list[str]:
    """The largest smaller micro-batch that fits, with the gradient accumulation that keeps the global batch."""
    d = config.data
    for micro in range(max(d.batch_size, d.retain_batch_size) - 1, 0, -1):
        scale = micro / max(d.batch_size, d.retain_batch_size)
        rows = max(1, math.floor(s.rows * scale))
        if fits(with_settings(ckpt, rows=rows)):
            accum = math.ceil(config.optim.grad_accum / scale)
            return [
                f"data.batch_size={max(1, math.floor(d.batch_size * scale))} "
                f"data.retain_batch_size={max(1, math.floor(d.retain_batch_size * scale))} "
                f"optim.grad_accum={accum} (same global batch)"
                + ("" if s.activation_checkpointing else " distributed.activation_checkpointing=true")
            ]
    return []


def _more_gpus(s: Settings, ckpt: Settings, fits) -> list[str]:
    """The fewest GPUs (a power of two, more than now) over which FSDP2 makes the run fit."""
    for gpus in (2, 4, 8, 16, 32, 64, 128):
        if gpus > s.gpus and fits(with_settings(ckpt, gpus=gpus, sharded=True)):
            return [f"{gpus} GPUs with FSDP2 ({launch(gpus)}), activation checkpointing on"]
    return []


def _leaner_optimizer(s: Settings, ckpt: Settings, fits) -> list[str]:
    """Smaller parameters or optimizer state, or gradients that never all exist, that make the run fit."""
    out = []
    if s.dtype == "float32" and s.optimizer == "adamw" and fits(with_settings(ckpt, dtype="bfloat16")):
        out.append("model.dtype=bfloat16 (halves parameters, gradients and AdamW state; no fp32 master: see the note)")
    lean = with_settings(ckpt, state_dtype="bfloat16")
    if s.optimizer == "adamw_kahan" and s.state_dtype == "float32" and fits(lean):
        out.append("optim.state_dtype=bfloat16 (adamw_kahan's moments in bf16: 4 bytes per parameter less)")
    if not s.in_backward:
        # in the backward alone, else (adamw_kahan with fp32 moments) also with bf16 moments
        for lean_state in (ckpt, lean if s.optimizer == "adamw_kahan" and s.state_dtype == "float32" else None):
            if lean_state is not None and fits(with_settings(lean_state, in_backward=True)):
                change = "optim.in_backward=true optim.max_grad_norm=0 optim.grad_accum=1"
                if lean_state is lean:
                    change += " optim.state_dtype=bfloat16"
                out.append(
                    change + " (the optimizer steps inside the backward, so the gradients never all exist; "
                    "no clipping, no accumulation)"
                )
                break
    eight_bit = with_settings(ckpt, dtype="bfloat16", optimizer="adamw_8bit", state_dtype="float32", in_backward=True)
    if s.optimizer != "adamw_8bit" and fits(eight_bit):
        out.append(
            "model.dtype=bfloat16 optim.name=adamw_8bit optim.in_backward=true optim.max_grad_norm=0 "
            "optim.grad_accum=1 (torchao 8-bit moments, stochastic rounding, steps inside the backward: "
            "~4 bytes per parameter; pip install 'fastnpo[lean]')"
        )
    return out


def _cpu_offload(shape: ModelShape, s: Settings, ckpt: Settings, fits) -> list[str]:
    """FSDP2's CPU offload, when it makes the run fit (adamw_8bit, which it cannot run, becomes adamw_kahan)."""
    offloaded = with_settings(ckpt, offload=True, sharded=True, in_backward=False)
    if s.optimizer == "adamw_8bit":
        offloaded = with_settings(offloaded, optimizer="adamw_kahan", state_dtype="bfloat16")
    if not fits(offloaded):
        return []
    host = estimate(shape, offloaded).host
    change = "optim.offload=true" + (" optim.in_backward=false" if s.in_backward else "")
    if s.optimizer == "adamw_8bit":
        change += " optim.name=adamw_kahan optim.state_dtype=bfloat16"
    return [
        f"{change} (FSDP2 CPU offload: parameters, gradients and optimizer state in CPU memory, "
        f"{host / GIB:.1f} GiB per process; the step runs on the CPU)"
    ]


def _per_parameter_budget(shape: ModelShape, s: Settings, ckpt: Settings, budget: int) -> str:
    """The line that says how many bytes per parameter the GPU can afford, against what the optimizer uses."""
    per_param = per_param_budget(shape, ckpt, budget)
    trainable = trainable_params(shape, s)
    p = DTYPE_BYTES[s.dtype]
    used = 2 * p + state_bytes_per_parameter(s)
    held = f"{used * trainable / max(1, s.gpus if s.sharded else 1) / GIB:.1f} GiB per GPU before them"
    state = state_bytes_per_parameter(s)
    if s.optimizer == "adamw_kahan":
        kind = f"adamw_kahan here: {used} = {p} + {p} + {state} (parameter, gradient, m + v + compensation)"
    elif s.optimizer == "adamw_8bit":
        kind = f"adamw_8bit here: {used:.2f} = {p} + {p} + {state:.2f} (parameter, gradient, 8-bit m + v)"
    else:
        kind = f"plain AdamW here: {used} = {p} x (parameter, gradient, m, v)"
    return (
        f"budget: at this micro-batch with checkpointing the GPU can afford "
        f"{per_param:.1f} bytes per parameter for parameters + gradients + optimizer state and its step "
        f"({kind} plus the step's temporaries, {held})"
    )


def launch(gpus: int) -> str:
    if gpus <= 8:
        return f"torchrun --nproc_per_node={gpus}"
    return f"{gpus // 8} nodes x 8: torchrun --nnodes={gpus // 8} --nproc_per_node=8"


def per_param_budget(shape: ModelShape, s: Settings, budget: int) -> float:
    """Bytes per parameter that parameters, gradients, optimizer state and its step temporaries
    could use per GPU: the budget less the overhead and what the activation peak needs besides."""
    e = estimate(shape, s)
    c = e.components
    at_backward = e.phases["backward start (fused op backward)"]
    rest = at_backward - c["parameters"] - c["optimizer state"] - c["autocast bf16 weight copies"]
    fixed = e.overhead - FRAGMENTATION * e.allocated  # context and NCCL
    usable = budget * (1 - FRAGMENTATION) - fixed - rest
    world = s.gpus if s.sharded else 1
    return max(0.0, usable * world / max(1, shape.params))


def plan(
    config: Config,
    model: str | dict | None = None,
    gpu_gib: float | None = None,
    gpus: int = 1,
    device: str = "cuda",
    *,
    nodes: int = 1,
    intra_node_gbps: float = DEFAULT_INTRA_NODE_GBPS,
    inter_node_gbps: float = DEFAULT_INTER_NODE_GBPS,
) -> dict:
    """The JSON-able plan of `config` (model: overrides model.name_or_path) on `gpus` GPUs per node
    and `nodes` nodes: memory per GPU, and with several GPUs the communication per GPU and step
    (communication.py; link rates in Gb/s each way per GPU).

    gpu_gib: memory per GPU (--gpu-memory); None: config.run.gpu_memory_gib, else the visible
    GPU's, else DEFAULT_GPU_GIB. model.dtype "auto": the dtype the model's config names, else float32.
    distributed.fsdp=hybrid: memory as sharded over a shard group (distributed.shard_size, default
    the GPUs of a node), replicated across the groups."""
    if not isinstance(gpus, int) or gpus < 1:
        raise ConfigError(f"--gpus: must be an int >= 1, got {gpus!r}")
    if not isinstance(nodes, int) or nodes < 1:
        raise ConfigError(f"--nodes: must be an int >= 1, got {nodes!r}")
    world = gpus * nodes
    hybrid = config.distributed.fsdp == "hybrid"
    shard_group = (config.distributed.shard_size or gpus) if hybrid else world
    if world % shard_group:
        raise ConfigError(
            f"distributed.shard_size: {shard_group} must divide the {world} GPUs ({nodes} node(s) x {gpus})"
        )
    source = model if model is not None else config.model.name_or_path
    if not source:
        raise ConfigError("model.name_or_path: is required (or pass --model)")
    lora = config.model.lora
    shape = model_shape(source, tuple(lora.target_modules) if lora.enabled else (), lora.r, config.method)
    if config.model.dtype == "auto":  # as the trainer resolves it (setup.resolve_model_dtype)
        dtype = shape.config_dtype or "float32"
        named = "named in the model's config" if shape.config_dtype else "the model's config names none"
        dtype_source = f"auto: {named}"
        config = replace(config, model=replace(config.model, dtype=dtype))
    else:
        dtype_source = "set in the run config"
    s = settings_from_config(config, shard_group, device)
    gpu_gib, gpu_source = gpu_memory(gpu_gib, config)
    budget = int(gpu_gib * GIB)
    e = estimate(shape, s)
    other = estimate(shape, with_settings(s, activation_checkpointing=not s.activation_checkpointing))
    fits = e.total <= budget
    return {
        "model": shape.name if isinstance(shape.name, str) else str(shape.name),
        "shape": {k: v for k, v in asdict(shape).items() if k != "notes"},
        "settings": asdict(s),
        "method": config.method.name,
        "trainable_params": trainable_params(shape, s),
        "dtype_source": dtype_source,
        "gpu_memory_gib": gpu_gib,
        "gpu_memory_source": gpu_source,
        "components_gib": {k: v / GIB for k, v in e.components.items()},
        "activations_gib": {
            "with_checkpointing": e.activations_with_checkpointing / GIB,
            "without_checkpointing": e.activations_without_checkpointing / GIB,
        },
        "reference_cache": "fp32 per example in host memory (4 B each); one micro-batch's values on the GPU",
        "phases_gib": {k: v / GIB for k, v in e.phases.items()},
        "peak_phase": e.peak_phase,
        "host_memory_gib": e.host / GIB,
        "allocated_gib": e.allocated / GIB,
        "overhead_gib": e.overhead / GIB,
        "total_gib": e.total / GIB,
        "fits": fits,
        "headroom_gib": (budget - e.total) / GIB,
        "peak_other_checkpointing_gib": other.total / GIB,
        "suggestions": [] if fits else suggestions(shape, s, config, budget),
        "notes": e.notes,
        "nodes": nodes,
        "gpus_per_node": gpus,
        "hybrid": {"replicas": world // shard_group, "shard_size": shard_group} if hybrid else None,
        "communication": _communication(config, shape, s, nodes, gpus, hybrid, intra_node_gbps, inter_node_gbps),
    }


def _communication(config, shape, s: Settings, nodes, gpus, hybrid, intra_node_gbps, inter_node_gbps):
    """Per GPU and step, under FSDP2 over nodes x gpus; None on one GPU."""
    if nodes * gpus == 1:
        return None
    # all-gathers carry every parameter in the compute dtype; reduce-scatters the trainable ones'
    # gradients in FSDP2's reduce dtype (fp32 under mixed_precision=bf16, else the parameters')
    reduce_bytes = 4 if s.mixed_precision == "bf16" else DTYPE_BYTES[s.dtype]
    collectives = step_collectives(
        gathered_bytes=shape.params * compute_bytes(s),
        reduced_bytes=trainable_params(shape, s) * reduce_bytes,
        nodes=nodes,
        gpus_per_node=gpus,
        hybrid=hybrid,
        micro_batches=config.optim.grad_accum,
        reshard_after_forward=config.distributed.reshard_after_forward,
    )
    try:
        return communication_plan(collectives, intra_node_gbps=intra_node_gbps, inter_node_gbps=inter_node_gbps)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def gpu_memory(flag: float | None, config: Config) -> tuple[float, str]:
    """GiB per GPU and where the number came from: --gpu-memory > run.gpu_memory_gib > the
    visible GPU > DEFAULT_GPU_GIB."""
    if flag is not None:
        if not (flag > 0 and math.isfinite(flag)):
            raise ConfigError(f"--gpu-memory: must be a positive number of GiB, got {flag!r}")
        return float(flag), "--gpu-memory"
    if config.run.gpu_memory_gib is not None:  # RunConfig checked it
        return float(config.run.gpu_memory_gib), "run.gpu_memory_gib"
    visible = visible_gpu_gib()
    if visible:
        return visible, "the visible GPU"
    return DEFAULT_GPU_GIB, "the default: no GPU visible, neither --gpu-memory nor run.gpu_memory_gib"


def visible_gpu_gib() -> float | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / GIB
    except Exception:
        return None
    return None
