"""The trainer: the model, its optimizer and schedule, the data and what the method reads, ready
for step() -- what train() runs, and what tests and benchmarks time and measure.

    trainer = Trainer.build(config, info, resume_from=..., evaluator=..., log=...)
    while trainer.steps_done < trainer.total_steps:
        result = trainer.step(trainer.batches.next_items())
    trainer.export(folder)

Trainer.build loads everything from the config (tokenizer, data, the cached reference log-probs,
what the method builds once, the wrapped model, optimizer, schedule, a resume). Trainer.around_model
wraps a model the caller built (random weights drawn on the device, a test's micro model) with
the same wrapping, optimizer and step, and no data: the caller hands step() its global batches.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import set_seed

from ..data import PairedBatches
from ..distributed import ProcessInfo
from ..methods import Method, method_for
from . import checkpoint
from .config import Config, ConfigError
from .evaluation import EpochEvaluation
from .optimizers import StepInBackward
from .setup import (
    TrainModel,
    build_optimizer,
    cached_reference_logprobs,
    frozen_reference,
    load_data,
    load_example_weights,
    load_model,
    load_tokenizer,
    prepare_method,
    wrap_model,
)
from .step import StepContext, StepResult, TrainingDiverged, train_step

__all__ = ["Trainer"]


@dataclass
class Trainer:
    """One run's model, optimizer, schedule and step inputs; `steps_done` counts the optimizer
    steps taken (a resume starts it at the checkpoint's step)."""

    config: Config
    info: ProcessInfo
    method: Method
    model: TrainModel
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    batches: PairedBatches | None = None  # build()'s; None around_model
    steps_done: int = 0
    ref: object | None = None  # the cached reference log-probs (refcache), when the method has ref_sets
    example_weights: torch.Tensor | None = None  # by forget example index (run.example_weights)
    state: object | None = None  # what the method built once (Method.prepare), e.g. frozen layers
    evaluation: EpochEvaluation | None = None  # eval.every_epoch
    run_info: dict = field(default_factory=dict)  # run_info.json
    in_backward: StepInBackward | None = field(init=False, default=None)
    context: StepContext = field(init=False)

    def __post_init__(self) -> None:
        # After any resume: loading the optimizer's state replaces the param groups the hooks narrow.
        if self.config.optim.in_backward:
            self.in_backward = StepInBackward(self.model.parameters, self.optimizer)
        self.context = StepContext(
            method=self.method,
            method_config=self.config.method,
            info=self.info,
            model=self.model,
            pad_token_id=self.tokenizer.pad_token_id,
            grad_accum=self.config.optim.grad_accum,
            max_grad_norm=self.config.optim.max_grad_norm,
            loss_design=self.config.model.loss_design,
            packing=self.config.data.packing,
            pack_tokens=self.config.data.pack_tokens,
            ref=self.ref,
            example_weights=self.example_weights,
            state=self.state,
            in_backward=self.in_backward,
        )

    @classmethod
    def build(
        cls,
        config: Config,
        info: ProcessInfo,
        *,
        resume_from: Path | None = None,
        evaluator: Callable | None = None,
        log: Callable[[str], None] = print,
    ) -> "Trainer":
        """Everything from the config, each input checked before the model loads: tokenizer,
        evaluation (eval.every_epoch, from evaluator(config, tokenizer)), data, example weights;
        then the model, the reference pass (refcache), Method.prepare, wrapping, optimizer and
        schedule, and the state of the checkpoint `resume_from` (its newest intact one)."""
        method = method_for(config.method.name)
        set_seed(config.run.seed)
        tokenizer = load_tokenizer(config)
        evaluation = None
        if config.eval.every_epoch:  # refuses bad evaluation input before any work
            evaluation = EpochEvaluation.build(config, info, evaluator, tokenizer, log)
            set_seed(config.run.seed)  # whatever the evaluator drew, the run starts from the seed
        micro_per_step = config.optim.grad_accum * info.world_size
        sets, batches = load_data(config, tokenizer, method, micro_per_step)  # raises on bad data, before any work
        example_weights = load_example_weights(config, sets["forget"])

        model = load_model(config, info.device)
        reference = frozen_reference(config, model) if method.live_reference else None
        ref, cache_hit = None, None
        if method.ref_sets:
            ref, cache_hit = cached_reference_logprobs(config, model, tokenizer, sets, method.ref_sets, info, log)
        state = prepare_method(config, method, model, sets["forget"], tokenizer.pad_token_id)  # before any wrapping
        if method.describe(state):
            log(method.describe(state))
        trainee = wrap_model(config, model, reference, info)
        steps_per_epoch = len(batches)
        if evaluation is not None:
            evaluation.prepare(trainee, lambda: load_model(config, "cpu"))
        optimizer, scheduler, total_steps = build_optimizer(config, trainee.parameters, steps_per_epoch)
        steps_done = 0
        if resume_from is not None:
            resume_from, steps_done = checkpoint.resume_run_state(
                resume_from,
                trainee.wrapper,
                optimizer,
                scheduler,
                batches,
                info,
                log,
                load_method=lambda saved: method.load_state_dict(state, saved),
            )
            log(f"resumed from {resume_from} at step {steps_done}")
        if evaluation is not None:
            evaluation.resume(steps_done, steps_per_epoch)
        run_info = {
            "reference_cache_hit": cache_hit,
            "world_size": info.world_size,
            "fsdp": trainee.sharded,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "resumed_from_step": steps_done,
            "cache_key": ref.key if ref is not None else None,
        }
        return cls(
            config,
            info,
            method,
            trainee,
            tokenizer,
            optimizer,
            scheduler,
            total_steps,
            batches=batches,
            steps_done=steps_done,
            ref=ref,
            example_weights=example_weights,
            state=state,
            evaluation=evaluation,
            run_info=run_info,
        )

    @classmethod
    def around_model(
        cls,
        config: Config,
        info: ProcessInfo,
        model: nn.Module,
        tokenizer,
        *,
        ref=None,
        state=None,
        steps_per_epoch: int = 1,
    ) -> "Trainer":
        """A trainer for a Hugging Face model the caller built (its weights, dtype and device are
        the caller's), wrapped and given an optimizer and schedule as build() does, for
        `steps_per_epoch`. Nothing is loaded: no data (step() takes the caller's global batches,
        each set's items as data.tokenize makes them), no reference pass (`ref`: an object whose
        lookup(set, index) gives what the method's cached reference log-probs would), no
        Method.prepare (`state`: what it would build, made before this call since it may freeze
        parameters), no frozen reference copy (a live_reference method needs build()). `tokenizer`
        needs only pad_token_id to step."""
        method = method_for(config.method.name)
        if method.live_reference:  # refused before any wrapping: the step would need the frozen copy
            raise ConfigError(
                f"method.name: {config.method.name} needs a frozen reference model, which only "
                "Trainer.build makes; Trainer.around_model cannot run it"
            )
        trainee = wrap_model(config, model, None, info)
        optimizer, scheduler, total_steps = build_optimizer(config, trainee.parameters, steps_per_epoch)
        return cls(config, info, method, trainee, tokenizer, optimizer, scheduler, total_steps, ref=ref, state=state)

    def step(self, global_batch: dict[str, list[dict]]) -> StepResult:
        """One optimizer step on the step's global batch (every rank passes the same one: each
        set's tokenized items); its statistics summed over ranks."""
        try:
            result = train_step(self.context, global_batch, self.optimizer, self.scheduler)
        except TrainingDiverged as error:
            raise TrainingDiverged(f"step {self.steps_done + 1}: {error}") from None
        self.steps_done += 1
        return result

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save_checkpoint(self, directory: Path, *, keep: int) -> None:
        """directory/step_<steps_done>: weights, optimizer, schedule, data position, the method's
        state and RNG, which build(resume_from=...) restores bit-exactly; `keep` newest kept."""
        checkpoint.save_run_state(
            directory,
            self.steps_done,
            self.model.wrapper,
            self.optimizer,
            self.scheduler,
            self.batches,
            self.info,
            keep=keep,
            method_state=self.method.state_dict(self.state),
        )

    def export(self, folder: Path) -> None:
        """The trained model as a Hugging Face folder (the LoRA adapter with model.lora)."""
        lora = self.config.model.lora.enabled
        checkpoint.export_hf(self.model.wrapper, self.model.hf, self.tokenizer, folder, self.info, lora=lora)

    def close(self) -> None:
        """Removes the optim.in_backward hooks (the model then trains as any other)."""
        if self.in_backward is not None:
            self.in_backward.remove()
