"""The trainer's config tree, loaded from YAML + overrides and checked.

Each section's dataclass checks its own values in __post_init__ (DataConfig in data/,
MethodConfig in methods/, LoraConfig in modeling.py, DistributedConfig in sharding.py; the
model, optimizer, run and eval sections here), so a rule is written once, next to its field.
OmegaConf.to_object builds the dataclasses, so a bad value stops load_config with a
ConfigError naming its dotted key. What a lone section cannot know (a key the method requires,
a value every run must set) is checked on the whole tree by check_config. load_config also
refuses a key that moved (RENAMED_KEYS, naming the new one) and resolves run.cache_dir's
default, so what is printed and saved is what the run uses.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from ..config import ConfigError, load_structured, require, require_finite, to_yaml
from ..data import DataConfig
from ..methods import METHODS, MethodConfig
from ..modeling import DTYPES, LOSS_DESIGNS, LoraConfig
from ..ops import IMPLS
from .optimizers import OPTIMIZERS, STATE_DTYPES
from .sharding import DistributedConfig

__all__ = [
    "Config",
    "ConfigError",
    "EpochEvalConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "default_cache_dir",
    "load_config",
    "to_yaml",
]


@dataclass
class ModelConfig:
    """name_or_path: a hub name or a local folder of a causal LM (from_pretrained).
    random_init: build the architecture from its config.json with fresh random weights
    (benchmarks). tokenizer: defaults to name_or_path. dtype: the parameters' dtype; "auto" (the
    default): the one the model's config.json names (bfloat16 for most hub LLMs), else float32;
    `fastnpo train` and `fastnpo plan` resolve it the same way and say what they chose.
    loss_design: how a step computes the loss's gradients. "two_call": the fused token log-probs,
    then autograd through the method's loss (any method). "one_pass": ONE call computes the
    logits, the loss and both gradients chunk by chunk (ops.example_loss: 6NDV FLOPs, no
    recompute), for the methods whose loss is a sum of per-example terms (Method.separable) or
    also of per-token terms the design's row statistics give (Method.token_separable: WGA,
    SatImp, CE-U) or of per-pair terms (Method.pairs: IdkDPO, AltPO; the list is in
    docs/trainer.md) on padded or packed batches. "auto" (the default):
    one_pass on CUDA where the method allows, else two_call."""

    name_or_path: str = ""
    tokenizer: str = ""
    random_init: bool = False
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    impl: str = "auto"
    loss_design: str = "auto"
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self):
        dtypes = ("auto", *DTYPES)
        require(self.dtype in dtypes, "model.dtype", f"must be one of {dtypes}", self.dtype)
        require(self.impl in IMPLS, "model.impl", f"must be one of {IMPLS}", self.impl)
        require(
            self.loss_design in LOSS_DESIGNS, "model.loss_design", f"must be one of {LOSS_DESIGNS}", self.loss_design
        )
        # LoraConfig is shared with other routes; its values only matter here when it is on.
        if self.lora.enabled:
            require(self.lora.r >= 1, "model.lora.r", "must be >= 1", self.lora.r)
            targets = self.lora.target_modules
            require(bool(targets), "model.lora.target_modules", "must name at least one module", targets)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up over warmup_epochs, then linear decay to 0 at the last step.
    Steps: epochs x batches per epoch, or max_steps when > 0. The global batch is
    data.batch_size x processes x grad_accum.
    name: "adamw" (torch.optim.AdamW; its state in the parameters' dtype), "adamw_kahan"
    (bf16 parameters with no fp32 master copy, a Kahan-compensated update and the moments in
    state_dtype: "float32" or "bfloat16"; needs model.dtype=bfloat16) or "adamw_8bit" (torchao's
    AdamW8bit: 8-bit moments, stochastic rounding of bf16 parameters; fastnpo[lean]); see
    optimizers.py.
    in_backward: step each parameter as soon as its gradient is ready and free that gradient,
    so the whole set of gradients never exists at once (optimizers.StepInBackward); needs
    grad_accum=1 and max_grad_norm=0 (no clipping).
    offload: keep the parameters, gradients and optimizer state in CPU memory and step there
    (FSDP2's CPUOffloadPolicy, over one process too); the GPU holds only the layers in use, their
    gradients until they are reduced, and the activations. Needs a CUDA GPU and FSDP
    (distributed.fsdp auto or on); adamw steps with torch's fused CPU AdamW. Not with in_backward
    (the gradients are in CPU memory already) or adamw_8bit (its state is 2 bytes per parameter)."""

    name: str = "adamw"
    state_dtype: str = "float32"
    in_backward: bool = False
    offload: bool = False

    lr: float = 1e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    epochs: float = 10.0
    max_steps: int = 0
    warmup_epochs: float = 1.0
    grad_accum: int = 1
    max_grad_norm: float = 1.0

    def __post_init__(self):
        require_finite("optim", self)
        require(self.name in OPTIMIZERS, "optim.name", f"must be one of {OPTIMIZERS}", self.name)
        dtypes = tuple(STATE_DTYPES)
        require(self.state_dtype in dtypes, "optim.state_dtype", f"must be one of {dtypes}", self.state_dtype)
        kahan_only = self.state_dtype == "float32" or self.name == "adamw_kahan"
        message = "bfloat16 applies to optim.name=adamw_kahan (adamw keeps the parameters' dtype)"
        require(kahan_only, "optim.state_dtype", message, self.state_dtype)
        require(self.lr > 0, "optim.lr", "must be > 0", self.lr)
        require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0", self.weight_decay)
        betas_ok = len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)
        require(betas_ok, "optim.betas", "must be two numbers in [0, 1)", self.betas)
        has_length = self.epochs > 0 or self.max_steps > 0
        require(has_length, "optim.epochs", "must be > 0 (or set optim.max_steps)", self.epochs)
        require(self.max_steps >= 0, "optim.max_steps", "must be >= 0", self.max_steps)
        require(self.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0", self.warmup_epochs)
        require(self.grad_accum >= 1, "optim.grad_accum", "must be >= 1", self.grad_accum)
        clip = self.max_grad_norm
        require(clip >= 0, "optim.max_grad_norm", "must be >= 0 (0 disables clipping)", clip)
        if self.in_backward:
            message = (
                "the optimizer steps each parameter as its gradient is ready, so gradients cannot add up over "
                "micro-batches: set optim.grad_accum=1 (a bigger data.batch_size gives the same global batch)"
            )
            require(self.grad_accum == 1, "optim.in_backward", message, f"optim.grad_accum={self.grad_accum}")
            message = (
                "clipping scales every gradient by the global norm, known only after the whole backward, when "
                "the first parameters have already stepped: set optim.max_grad_norm=0 (no clipping)"
            )
            require(clip == 0, "optim.in_backward", message, f"optim.max_grad_norm={clip}")
        if self.offload:
            message = (
                "the gradients go to CPU memory as each layer's are reduced and the step runs there, so "
                "stepping inside the backward saves no GPU memory: set optim.in_backward=false"
            )
            require(not self.in_backward, "optim.offload", message, "optim.in_backward=true")
            message = (
                "adamw_8bit's state is 2 bytes per parameter on the GPU and its step a torch.compile'd GPU "
                "kernel: offload applies to adamw and adamw_kahan"
            )
            require(self.name != "adamw_8bit", "optim.offload", message, f"optim.name={self.name}")


@dataclass
class RunConfig:
    """output_dir holds checkpoints/, metrics.jsonl, config.yaml, run_info.json and final/.
    cache_dir: the reference log-prob cache; "" (the default) is <output_dir>/../ref-cache, shared
    by runs beside each other, and load_config writes that path in (resolved against the working
    directory), so `--print-config` and the run's config.yaml show the folder used. resume:
    continue from the newest complete checkpoint in output_dir.
    example_weights: a JSON list of per-forget-example weights (U2A), by example index.
    gpu_memory_gib: the memory per GPU, in GiB, this run is meant for: `fastnpo plan` plans
    against it (its --gpu-memory flag overrides it; null: the visible GPU's, else 80). Training
    does not read it. (The per-epoch evaluation keys, once run.eval_* / run.keep_best*, are
    the eval section: EpochEvalConfig.)"""

    output_dir: str = "runs/unlearn"
    seed: int = 0
    device: str = "auto"
    log_every: int = 1
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = True
    overwrite: bool = False
    cache_dir: str = ""
    tensorboard: bool = False
    progress: bool = True
    export: bool = True
    example_weights: str = ""
    gpu_memory_gib: float | None = None

    def __post_init__(self):
        gib = self.gpu_memory_gib
        message = "must be a positive number of GiB per GPU (or null: the visible GPU's)"
        require(gib is None or (math.isfinite(gib) and gib > 0), "run.gpu_memory_gib", message, gib)
        every = self.checkpoint_every
        require(every >= 0, "run.checkpoint_every", "must be >= 0 (0: only at the end)", every)
        require(self.log_every >= 0, "run.log_every", "must be >= 0 (0: no per-step lines)", self.log_every)


def default_cache_dir(output_dir: str) -> str:
    """run.cache_dir's meaning when empty: ref-cache/ beside the output folder (shared by runs
    beside each other), as an absolute path (the output folder resolved against the working
    directory)."""
    return str(Path(output_dir).resolve().parent / "ref-cache")


@dataclass
class EpochEvalConfig:
    """The evaluation during training (evaluation.py), the `eval` section.
    every_epoch: evaluate the model once after each full epoch (rank 0; the caller supplies the
    evaluator, see evaluation.py) and append its summary to epochs.jsonl. data: a folder of
    TOFU-schema files or a hub name; forget_split: the forget split evaluated; retain_stats: a
    `fastnpo eval --out` JSON of the retain model (enables forget_quality); max_examples /
    max_new_tokens / generate: as fastnpo.tofu's EvalConfig (generate off: no ROUGE, no
    model_utility). keep_best: a summary key (forget_quality, model_utility,
    forget/probability, ...): the epoch with the best value is exported to <output_dir>/best,
    and best.json names it; keep_best_mode: max (higher is better) or min. None of these keys
    changes the training trajectory (TRAJECTORY_KEYS)."""

    every_epoch: bool = False
    data: str = ""
    forget_split: str = "forget10"
    retain_stats: str = ""
    max_examples: int = 300
    max_new_tokens: int = 48
    generate: bool = True
    keep_best: str = ""
    keep_best_mode: str = "max"

    def __post_init__(self):
        mode = self.keep_best_mode
        require(mode in ("max", "min"), "eval.keep_best_mode", "must be max or min", mode)
        message = "needs eval.every_epoch=true (the best epoch is chosen among the evaluated ones)"
        require(not self.keep_best or self.every_epoch, "eval.keep_best", message, self.keep_best)
        if self.every_epoch:
            require(self.max_examples >= 1, "eval.max_examples", "must be >= 1", self.max_examples)
            require(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1", self.max_new_tokens)


# The keys that moved: an old one in a YAML file or an override is refused naming the new one.
RENAMED_KEYS = {
    "run.eval_every_epoch": "eval.every_epoch",
    "run.eval_data": "eval.data",
    "run.eval_forget_split": "eval.forget_split",
    "run.retain_stats": "eval.retain_stats",
    "run.eval_max_examples": "eval.max_examples",
    "run.eval_max_new_tokens": "eval.max_new_tokens",
    "run.eval_generate": "eval.generate",
    "run.keep_best": "eval.keep_best",
    "run.keep_best_mode": "eval.keep_best_mode",
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EpochEvalConfig = field(default_factory=EpochEvalConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- `key=value` overrides, checked; raises ConfigError naming the key
    (an old key of RENAMED_KEYS: naming its new one). An empty run.cache_dir is resolved here to
    the folder it means (default_cache_dir), so the printed and saved config show it."""
    config = load_structured(Config, path, overrides, renamed=RENAMED_KEYS)
    check_config(config)
    if not config.run.cache_dir:
        config.run.cache_dir = default_cache_dir(config.run.output_dir)
    return config


def check_config(config: Config) -> None:
    """The rules no section can check alone: values with no usable default (the defaults are
    built too, so __post_init__ cannot require them) and what the method asks of the data."""
    m, d, r = config.model, config.data, config.run
    require(bool(m.name_or_path), "model.name_or_path", "is required", m.name_or_path)
    require(bool(d.forget), "data.forget", "is required (a file, a folder or a hub dataset name)", d.forget)
    needs_retain = "retain" in METHODS[config.method.name].sets
    require(bool(d.retain) or not needs_retain, "data.retain", f"is required by method {config.method.name}", d.retain)
    if m.loss_design == "one_pass":
        separable = [name for name, method in METHODS.items() if method.one_pass]
        message = (
            f"needs a loss that is a sum of per-example or per-token terms ({', '.join(separable)}); "
            "use auto or two_call"
        )
        require(
            METHODS[config.method.name].one_pass,
            "model.loss_design",
            message,
            f"one_pass with method.name={config.method.name}",
        )
    # DataConfig (data/) does not check its own values yet.
    require(bool(r.output_dir), "run.output_dir", "is required", r.output_dir)
    if config.optim.offload:
        message = "offload is FSDP2's CPUOffloadPolicy: set distributed.fsdp=auto or on (one process is a group of one)"
        require(config.distributed.fsdp != "off", "optim.offload", message, "distributed.fsdp=off")
    e = config.eval
    if e.every_epoch:
        message = "is required by eval.every_epoch (a folder of TOFU-schema files or a hub name)"
        require(bool(e.data), "eval.data", message, e.data)
        stats = e.retain_stats
        require(not stats or Path(stats).is_file(), "eval.retain_stats", "file not found", stats)


# Sections and keys that change the training trajectory: a checkpoint saved under other
# values cannot be resumed. (Logging, checkpoint frequency, the eval section and the like may
# change; a config.yaml saved before the eval section, with run.eval_* / run.keep_best* keys,
# resumes: those keys are not compared.)
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
    # A key that did not exist when the checkpoint was saved ran with what is now its default.
    defaults = dict(flatten(OmegaConf.to_container(OmegaConf.structured(Config))))
    old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
    keys = sorted(set(old) | set(new))
    relevant = [k for k in keys if any(k == t or k.startswith(t + ".") for t in TRAJECTORY_KEYS)]
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in relevant if old.get(k) != new.get(k)]
