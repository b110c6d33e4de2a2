"""The unlearning trainer: config, setup, the step, the loop, logging, checkpoints, sharding.

config.py      the run config tree, loaded from YAML + overrides and checked
output.py      the output folder: fresh run, resume, restart, refusal, safe replacement
setup.py       what a run builds before its first step: data, model, optimizer
trainer.py     Trainer: built from a config (or around a caller's model), step(), checkpoint, export
step.py        one optimisation step, globally renormalised across micro-batches and ranks
loop.py        train(): the run top to bottom; build_reference_cache (`fastnpo cache-ref`)
logging.py     metrics.jsonl, TensorBoard, progress bar, console lines, run files
checkpoint.py  DCP checkpoints, bit-exact resume, the Hugging Face export
sharding.py    FSDP2 (one unit per decoder layer + the root)
optimizers.py  KahanAdamW (optim.name=adamw_kahan): bf16 parameters, compensated update;
               StepInBackward (optim.in_backward): each parameter steps inside the backward
memory_plan.py the per-GPU peak of a run from its config, for `fastnpo plan` (memory_estimate.py: the formulas)
"""

from .config import Config, ConfigError, load_config
from .loop import TrainingInterrupted, build_reference_cache, train
from .trainer import Trainer

__all__ = ["Config", "ConfigError", "Trainer", "TrainingInterrupted", "build_reference_cache", "load_config", "train"]
