"""Per-epoch evaluation during training, and the best epoch kept (the eval section:
eval.every_epoch, eval.keep_best).

The trainer does not know what an evaluation is: fastnpo.tofu imports fastnpo.train, not the
other way round. The caller of train() passes `evaluator`, a factory

    evaluator(config, tokenizer) -> EpochEvaluator

(the TOFU one reads eval.data, eval.forget_split, eval.retain_stats, ...). It is called
on rank 0 only, before any training work; its failure stops every rank, naming the key.

After each full epoch the model is evaluated ONCE, on rank 0:
- one process: the trained Hugging Face model itself;
- FSDP: every rank takes part in gathering the full state dict (a collective); rank 0 loads it
  into an unsharded copy kept on the CPU, moves it to its device for the evaluation and back;
  the other ranks wait for rank 0's summary (all_gather_objects, which is also the barrier).
Every rank then knows the summary, so all agree on whether the epoch is the best one and enter
the export of <output_dir>/best (a collective) together; best.json names the epoch and value.
"""

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .. import distributed
from ..distributed import ProcessInfo
from ..files import atomic_write
from . import checkpoint
from .config import Config, ConfigError

__all__ = ["EpochEvaluation", "EpochEvaluator"]


@dataclass
class EpochEvaluator:
    """evaluate(hf_model) -> a flat summary {metric: float} (it may switch the model to eval
    mode; the trainer switches it back). metrics: the keys its summaries hold; eval.keep_best
    must name one of them. notes: why a key is missing (shown when eval.keep_best names it)."""

    evaluate: Callable[[nn.Module], dict]
    metrics: tuple[str, ...]
    notes: dict[str, str] = field(default_factory=dict)


class EpochEvaluation:
    """The per-epoch evaluation and the best-epoch bookkeeping of one run (every rank holds one)."""

    def __init__(self, config: Config, info: ProcessInfo, evaluator: EpochEvaluator | None, log):
        self.config, self.info, self.evaluator, self.log = config, info, evaluator, log
        self.out = Path(config.run.output_dir)
        self.keep_best = config.eval.keep_best
        self.sign = 1.0 if config.eval.keep_best_mode == "max" else -1.0
        self.best: dict | None = None  # {"epoch", "metric", "value"}
        self.copy: nn.Module | None = None  # rank 0's unsharded model under FSDP

    @classmethod
    def build(cls, config: Config, info: ProcessInfo, factory, tokenizer, log) -> "EpochEvaluation":
        """Build the evaluator on rank 0 and check eval.keep_best against its metrics; every rank
        raises if rank 0 could not (no rank is left waiting in a collective)."""
        evaluator, error = None, None
        if info.is_main:
            try:
                evaluator = factory(config, tokenizer)
                _check_keep_best(config.eval.keep_best, evaluator)
            except ConfigError as e:
                error = e
            except (OSError, ValueError, KeyError) as e:
                where = config.eval.data
                error = ConfigError(f"eval.data: the evaluation could not be set up from {where!r}: {e}")
        errors = distributed.all_gather_objects(None if error is None else str(error), info)
        if error is not None:
            raise error
        if errors[0] is not None:
            raise ConfigError(f"rank 0 refused the evaluation: {errors[0]}")
        return cls(config, info, evaluator, log)

    def prepare(self, trainee, load_copy: Callable[[], nn.Module]) -> None:
        """Under FSDP, rank 0 keeps an unsharded copy of the model on the CPU to evaluate."""
        if trainee.sharded:
            if self.config.model.lora.enabled:
                message = "not supported with model.lora under FSDP yet (run in one process)"
                raise ConfigError(f"eval.every_epoch: {message}")
            if self.info.is_main:
                self.copy = load_copy()

    def resume(self, step: int, steps_per_epoch: int) -> None:
        """A resumed run keeps the best epoch it had reached by `step` (best.json; later epochs
        were the interrupted attempt's and are evaluated again)."""
        path = self.out / "best.json"
        if self.keep_best and path.exists():
            saved = json.loads(path.read_text())
            if saved.get("metric") == self.keep_best and saved["epoch"] * steps_per_epoch <= step:
                self.best = saved

    def epoch_end(self, epoch: int, trainee, tokenizer) -> dict:
        """Evaluate once (rank 0), keep the best export; returns the summary on every rank."""
        summary = None
        if trainee.sharded:
            state = checkpoint.hf_state_dict(trainee.wrapper)  # every rank: a collective
            if self.info.is_main:
                self.copy.load_state_dict({k: state[k] for k in self.copy.state_dict()})
                self.copy.to(self.info.device)
                summary = self.evaluator.evaluate(self.copy)
                self.copy.to("cpu")
            del state
        elif self.info.is_main:
            summary = self.evaluator.evaluate(trainee.hf)
        if self.info.is_main:
            summary = {k: float(v) for k, v in summary.items()}
            shown = " ".join(f"{k}={v:.4g}" for k, v in summary.items() if "/" not in k)
            self.log(f"epoch {epoch} evaluation: {shown or summary}")
        summary = distributed.all_gather_objects(summary, self.info)[0]
        if self.keep_best and self._improves(summary):
            self._keep(epoch, summary[self.keep_best], trainee, tokenizer)
        return summary

    def _improves(self, summary: dict) -> bool:
        if self.keep_best not in summary:
            raise ConfigError(f"eval.keep_best: the evaluation's summary has no {self.keep_best!r}")
        value = summary[self.keep_best]
        if math.isnan(value):
            return False
        return self.best is None or self.sign * value > self.sign * self.best["value"]

    def _keep(self, epoch: int, value: float, trainee, tokenizer) -> None:
        lora = self.config.model.lora.enabled
        checkpoint.export_hf(trainee.wrapper, trainee.hf, tokenizer, self.out / "best", self.info, lora=lora)
        self.best = {"epoch": epoch, "metric": self.keep_best, "mode": self.config.eval.keep_best_mode, "value": value}
        if self.info.is_main:
            atomic_write(self.out / "best.json", json.dumps(self.best, indent=1).encode())
            self.log(f"best {self.keep_best}={value:.4g} at epoch {epoch}: exported {self.out / 'best'}")
        distributed.barrier(self.info)


def _check_keep_best(keep_best: str, evaluator: EpochEvaluator) -> None:
    if keep_best and keep_best not in evaluator.metrics:
        note = evaluator.notes.get(keep_best)
        known = ", ".join(evaluator.metrics)
        raise ConfigError(f"eval.keep_best: {note or 'unknown metric'}, got {keep_best!r} (known: {known})")
