"""One optimisation step.

The step's global batch is split into grad_accum x world_size micro-batches; this rank runs
its grad_accum of them, each as ONE forward over all the sets the method reads. Every loss term
is a local mean that is rescaled by its share of the step's GLOBAL example / token count (times
world_size, since FSDP averages gradients over ranks), so the summed gradient is the one of a
single big batch however the step is split.
"""

import math
from dataclasses import dataclass, field
from functools import partial

import torch

from ..data import collate, collate_packed
from ..distributed import ProcessInfo
from ..losses import kl_from_logits
from ..methods import Method, TermInputs, example_of_positions, scored_count
from ..ops import IGNORE_INDEX
from .config import Config, ConfigError
from .optimizers import StepInBackward
from .setup import TrainModel

__all__ = ["StepContext", "StepResult", "TrainingDiverged", "example_of_positions", "train_step"]


class TrainingDiverged(ValueError):
    """A step whose loss or gradient is not finite (the update is not applied)."""


@dataclass
class StepContext:
    """What every step reads and no step changes."""

    config: Config
    method: Method
    info: ProcessInfo
    model: TrainModel
    tokenizer: object
    ref: object | None  # the cached reference log-probs (refcache), when the method has ref_sets
    example_weights: torch.Tensor | None  # by forget example index (run.example_weights)
    state: object | None = None  # what the method built once (Method.prepare), e.g. frozen layers
    in_backward: StepInBackward | None = None  # optim.in_backward: the optimizer steps inside the backward

    @property
    def micro_per_step(self) -> int:
        return self.config.optim.grad_accum * self.info.world_size


@dataclass
class StepResult:
    """This rank's part of a step's statistics (summed over ranks for the log)."""

    global_counts: dict[str, int]  # "<set>_examples" / "_tokens" / "_positions" of the whole step
    term_totals: dict[str, float] = field(default_factory=dict)  # each term's share of its global mean
    coeffs: dict[str, float] = field(default_factory=dict)
    logp_sums: dict[str, float] = field(default_factory=dict)  # summed log-probs per set
    tokens: int = 0  # input tokens, padding excluded
    grad_norm: torch.Tensor = field(default_factory=lambda: torch.tensor(0.0))


def split_micro_batches(items: list[dict] | None, parts: int) -> list[list[dict] | None]:
    if items is None:
        return [None] * parts
    size = math.ceil(len(items) / parts)
    return [items[i * size : (i + 1) * size] for i in range(parts)]


def target_tokens(items: list[dict]) -> int:
    # labels[0] is always a prompt token; after the shift the targets are labels[1:].
    return sum(_targets(item) for item in items)


def _targets(item: dict) -> int:
    return sum(1 for label in item["labels"][1:] if label != IGNORE_INDEX)


def scored_tokens(items: list[dict], method_config) -> int:
    """Target tokens a per-token method scores (CE-U skips the first answer tokens of each example)."""
    return sum(scored_count(_targets(item), method_config) for item in items)


def train_step(ctx: StepContext, global_batch: dict, optimizer, scheduler) -> StepResult:
    """Forward and backward of this rank's micro-batches, clipping, one optimizer step."""
    sets = ctx.method.sets
    counts = {}
    for name in sets:
        counts[f"{name}_examples"] = len(global_batch[name])
        counts[f"{name}_tokens"] = target_tokens(global_batch[name])
        counts[f"{name}_positions"] = sum(len(item["input_ids"]) for item in global_batch[name])
        counts[f"{name}_scored"] = scored_tokens(global_batch[name], ctx.config.method)
    result = StepResult(global_counts=counts, logp_sums={name: 0.0 for name in sets})
    per_set = {name: split_micro_batches(global_batch.get(name), ctx.micro_per_step) for name in sets}
    for micro in range(ctx.config.optim.grad_accum):
        slot = micro * ctx.info.world_size + ctx.info.rank
        parts = {name: per_set[name][slot] for name in sets}
        # A ragged last batch can leave this micro-batch without some set (or without any). It
        # still runs a forward and backward, so every rank enters the same FSDP collectives; an
        # empty set is stood in for by one example of the step whose terms get a zero share.
        stand_ins = {name: [global_batch[name][0]] for name in sets if not parts[name]}
        micro_batch_backward(ctx, {**parts, **stand_ins}, result, empty=set(stand_ins))

    if ctx.in_backward is not None:  # every parameter has stepped already, inside the backward
        result.grad_norm = ctx.in_backward.finish()
        if not bool(torch.isfinite(result.grad_norm)):
            raise TrainingDiverged(
                f"the gradient norm is {float(result.grad_norm)}: training diverged. With optim.in_backward "
                "the parameters whose gradients came before the non-finite one were already updated; nothing "
                "is exported and the last checkpoint (if any) is kept. Lower optim.lr, raise method.beta or "
                "check the data."
            )
        scheduler.step()
        return result
    # max_grad_norm 0 measures without clipping (an infinite limit scales by exactly 1).
    limit = ctx.config.optim.max_grad_norm or math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(ctx.model.parameters, limit)
    result.grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    # The norm is global (reduced across ranks), so every rank takes this branch together.
    if not bool(torch.isfinite(result.grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(
            f"the gradient norm is {float(result.grad_norm)}: training diverged. The parameters were not "
            "updated and nothing is exported; the last checkpoint (if any) is kept. Lower optim.lr, "
            "raise method.beta or check the data."
        )
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return result


def micro_batch_backward(
    ctx: StepContext, parts: dict[str, list[dict]], result: StepResult, empty: set[str] = frozenset()
) -> None:
    """One forward over the concatenation of `parts` (the sets in method order), the method's
    loss terms renormalised by the step's global counts, backward; adds to `result`. The sets in
    `empty` hold a stand-in example: they count as zero examples and zero tokens."""
    sets, device = ctx.method.sets, ctx.info.device
    rows, start = {}, 0
    for name in sets:
        rows[name] = slice(start, start + len(parts[name]))
        start += len(parts[name])
    lengths = {name: 0 if name in empty else len(parts[name]) for name in sets}
    batch = collate_micro_batch([it for name in sets for it in parts[name]], ctx.config, ctx.tokenizer)
    batch = {k: v.to(device) for k, v in batch.items()}
    # Input tokens (padding excluded) of the real examples, for tokens/s.
    result.tokens += sum(len(it["input_ids"]) for name in sets if name not in empty for it in parts[name])
    logits_rows = rows["retain"] if ctx.model.reference is not None else None
    method, state = ctx.method, ctx.state
    token_term = logits = None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=ctx.model.autocast):
        with method.capture(state, ctx.model.hf):
            if method.token_level:  # the forget term from per-token values, inside the wrapper's forward
                term = partial(
                    method.forget_term,
                    ctx.config.method,
                    state,
                    forget_rows=rows["forget"],
                    example_index=batch["index"],
                )
                logps_all, counts_all, token_term = ctx.model.wrapper(batch, token_term=term)
            else:
                logps_all, counts_all, logits = ctx.model.wrapper(batch, logits_rows=logits_rows)
        activations = method.activation_terms(state, example_of_positions(batch), rows, batch["labels"])
    logps = {name: logps_all[r].float() for name, r in rows.items()}
    counts = {name: counts_all[r] for name, r in rows.items()}
    index = batch["index"].cpu()
    ref_logps = {name: ctx.ref.lookup(name, index[rows[name]])[0].to(device) for name in method.ref_sets}
    weights = None
    if ctx.example_weights is not None:
        weights = forget_weights(ctx.example_weights, index[rows["forget"]]).to(device)
    kl = None
    if ctx.model.reference is not None:
        with torch.no_grad():
            _, _, ref_logits = ctx.model.reference(batch, logits_rows=logits_rows)
        attended = batch["segment_ids"] >= 0 if "segment_ids" in batch else batch["attention_mask"] > 0
        kl = kl_from_logits(logits, ref_logits, attended[logits_rows])
    terms = method.terms(ctx.config.method, TermInputs(logps, counts, ref_logps, weights, kl, token_term, activations))

    loss = logps_all.new_zeros(())
    for key, term in terms.items():
        set_name, unit = term.normalizer.split("_")
        local = local_count(unit, lengths[set_name], counts[set_name], parts[set_name], ctx.config.method)
        share = local / max(1, result.global_counts[term.normalizer])
        loss = loss + term.coeff * term.value * share * ctx.info.world_size
        result.term_totals[key] = result.term_totals.get(key, 0.0) + float(term.value.detach()) * share
        result.coeffs[key] = term.coeff
    loss.backward()
    for name in sets:
        if lengths[name]:
            result.logp_sums[name] += float(logps[name].detach().sum())


def local_count(unit: str, examples: int, target_counts: torch.Tensor, items: list[dict], method_config=None) -> int:
    """This micro-batch's count of what a term is a mean over (0 for a stand-in set)."""
    if unit == "examples" or not examples:
        return examples
    if unit == "positions":
        return sum(len(item["input_ids"]) for item in items)
    if unit == "scored":
        return scored_tokens(items, method_config)
    return int(target_counts.sum())


def collate_micro_batch(items: list[dict], config: Config, tokenizer) -> dict:
    if config.data.packing:
        return collate_packed(items, config.data.pack_tokens, tokenizer.pad_token_id)
    return collate(items, tokenizer.pad_token_id)


def forget_weights(weights_by_index: torch.Tensor, forget_index: torch.Tensor) -> torch.Tensor:
    if int(forget_index.max()) >= len(weights_by_index):
        raise ConfigError(f"run.example_weights has {len(weights_by_index)} entries, forget set needs more")
    return weights_by_index[forget_index]
