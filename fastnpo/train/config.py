"""The trainer's config tree: each component's dataclass (DataConfig in data/, MethodConfig in
methods.py, LoraConfig in modeling.py, DistributedConfig in sharding.py) plus the model, optimizer
and run sections, loaded through fastnpo.config and checked here."""

from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, load_structured, require, to_yaml
from ..data import DataConfig
from ..methods import METHODS, MethodConfig
from ..modeling import LoraConfig
from ..ops import IMPLS
from .sharding import DistributedConfig

__all__ = ["Config", "ConfigError", "ModelConfig", "OptimConfig", "RunConfig", "load_config", "to_yaml"]


@dataclass
class ModelConfig:
    """name_or_path: a hub name or a local folder of a causal LM (from_pretrained).
    random_init: build the architecture from its config.json with fresh random weights
    (benchmarks). tokenizer: defaults to name_or_path."""

    name_or_path: str = ""
    tokenizer: str = ""
    random_init: bool = False
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    impl: str = "auto"
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up over warmup_epochs, then linear decay to 0 at the last step.
    Steps: epochs x batches per epoch, or max_steps when > 0. The global batch is
    data.batch_size x processes x grad_accum."""

    lr: float = 1e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    epochs: float = 10.0
    max_steps: int = 0
    warmup_epochs: float = 1.0
    grad_accum: int = 1
    max_grad_norm: float = 1.0


@dataclass
class RunConfig:
    """output_dir holds checkpoints/, metrics.jsonl, config.yaml, run_info.json and final/.
    cache_dir: the reference log-prob cache ("" = <output_dir>/../ref-cache, shared by runs
    beside each other). resume: continue from the newest complete checkpoint in output_dir.
    example_weights: a JSON list of per-forget-example weights (U2A), by example index."""

    output_dir: str = "runs/unlearn"
    seed: int = 0
    device: str = "auto"
    log_every: int = 1
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = True
    overwrite: bool = False
    cache_dir: str = ""
    verify_cache: int = 0
    tensorboard: bool = False
    progress: bool = True
    export: bool = True
    example_weights: str = ""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    run: RunConfig = field(default_factory=RunConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- `key=value` overrides, checked; raises ConfigError naming the key."""
    config = load_structured(Config, path, overrides)
    check_config(config)
    return config


def check_config(config: Config) -> None:
    m, d, o, r, t = config.model, config.data, config.optim, config.run, config.method
    require(bool(m.name_or_path), "model.name_or_path", "is required", m.name_or_path)
    require(
        m.dtype in ("float32", "bfloat16", "float16"),
        "model.dtype",
        "must be float32, bfloat16 or float16",
        m.dtype,
    )
    require(m.impl in IMPLS, "model.impl", f"must be one of {IMPLS}", m.impl)
    require(t.name in METHODS, "method.name", f"must be one of {sorted(METHODS)}", t.name)
    require(t.beta > 0, "method.beta", "must be > 0", t.beta)
    for key in ("forget_coeff", "retain_coeff", "kl_coeff"):
        require(getattr(t, key) >= 0, f"method.{key}", "must be >= 0", getattr(t, key))
    require(bool(d.forget), "data.forget", "is required (a file, a folder or a hub dataset name)", d.forget)
    needs_retain = "retain" in METHODS[t.name].sets
    require(bool(d.retain) or not needs_retain, "data.retain", f"is required by method {t.name}", d.retain)
    require(d.max_length > 1, "data.max_length", "must be > 1", d.max_length)
    require(d.batch_size >= 1, "data.batch_size", "must be >= 1", d.batch_size)
    require(d.retain_batch_size >= 1, "data.retain_batch_size", "must be >= 1", d.retain_batch_size)
    require(o.lr > 0, "optim.lr", "must be > 0", o.lr)
    require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0", o.weight_decay)
    require(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        "optim.betas",
        "must be two numbers in [0, 1)",
        o.betas,
    )
    require(
        o.epochs > 0 or o.max_steps > 0, "optim.epochs", "must be > 0 (or set optim.max_steps)", o.epochs
    )
    require(o.max_steps >= 0, "optim.max_steps", "must be >= 0", o.max_steps)
    require(o.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0", o.warmup_epochs)
    require(o.grad_accum >= 1, "optim.grad_accum", "must be >= 1", o.grad_accum)
    require(
        o.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0 (0 disables clipping)", o.max_grad_norm
    )
    require(bool(r.output_dir), "run.output_dir", "is required", r.output_dir)
    require(
        r.checkpoint_every >= 0,
        "run.checkpoint_every",
        "must be >= 0 (0: only at the end)",
        r.checkpoint_every,
    )
    require(r.log_every >= 0, "run.log_every", "must be >= 0 (0: no per-step lines)", r.log_every)
    require(
        config.distributed.fsdp in ("auto", "on", "off"),
        "distributed.fsdp",
        "must be auto, on or off",
        config.distributed.fsdp,
    )
    require(
        config.distributed.mixed_precision in ("none", "bf16"),
        "distributed.mixed_precision",
        "must be none or bf16",
        config.distributed.mixed_precision,
    )
    if m.lora.enabled:
        require(m.lora.r >= 1, "model.lora.r", "must be >= 1", m.lora.r)
        require(
            bool(m.lora.target_modules),
            "model.lora.target_modules",
            "must name at least one module",
            m.lora.target_modules,
        )


# Sections and keys that change the training trajectory: a checkpoint saved under other
# values cannot be resumed. (Logging, checkpoint frequency and the like may change.)
TRAJECTORY_KEYS = (
    "model",
    "data",
    "method",
    "optim",
    "distributed.mixed_precision",
    "run.seed",
    "run.example_weights",
)


def trajectory_differences(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between two config dicts, within TRAJECTORY_KEYS."""

    def flatten(tree, prefix=""):
        if isinstance(tree, dict):
            for key, value in tree.items():
                yield from flatten(value, f"{prefix}{key}.")
        else:
            yield prefix[:-1], tree

    old, new = dict(flatten(saved)), dict(flatten(current))
    keys = sorted(set(old) | set(new))
    relevant = [k for k in keys if any(k == t or k.startswith(t + ".") for t in TRAJECTORY_KEYS)]
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in relevant if old.get(k) != new.get(k)]
