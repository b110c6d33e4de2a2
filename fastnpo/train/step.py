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
import torch.distributed as dist

from .. import distributed
from ..data import collate, collate_packed
from ..distributed import ProcessInfo
from ..losses import kl_from_logits
from ..methods import Method, MethodConfig, TermInputs, scored_count, scored_positions
from ..modeling import uses_one_pass
from ..ops import IGNORE_INDEX, example_of_positions, target_owner
from ..ops.checks import values_checked_by_caller
from ..ops.transfer import to_device
from .config import ConfigError
from .optimizers import StepInBackward
from .setup import TrainModel

__all__ = ["StepContext", "StepResult", "TrainingDiverged", "train_step"]


class TrainingDiverged(ValueError):
    """A step whose loss or gradient is not finite (the update is not applied)."""


@dataclass
class StepContext:
    """What every step reads and no step changes."""

    method: Method
    method_config: MethodConfig
    info: ProcessInfo
    model: TrainModel
    pad_token_id: int
    grad_accum: int  # optim.grad_accum
    max_grad_norm: float  # optim.max_grad_norm (0: no clipping)
    loss_design: str  # model.loss_design
    packing: bool  # data.packing
    pack_tokens: int  # data.pack_tokens
    ref: object | None = None  # the cached reference log-probs (refcache), when the method has ref_sets
    example_weights: torch.Tensor | None = None  # by forget example index (run.example_weights)
    state: object | None = None  # what the method built once (Method.prepare), e.g. frozen layers
    in_backward: StepInBackward | None = None  # optim.in_backward: the optimizer steps inside the backward

    @property
    def micro_per_step(self) -> int:
        return self.grad_accum * self.info.world_size


@dataclass
class StepResult:
    """A step's statistics for the log. The micro-batches add this rank's device tensors
    (add_term, add_logps); `collect` sums them over ranks and brings them to the host with the
    gradient norm in ONE copy, the step's only sync with the device."""

    global_counts: dict[str, int]  # "<set>_examples" / "_tokens" / "_positions" of the whole step
    term_totals: dict[str, float] = field(default_factory=dict)  # each term's share of its global mean
    coeffs: dict[str, float] = field(default_factory=dict)
    logp_sums: dict[str, float] = field(default_factory=dict)  # summed log-probs per set
    tokens: int = 0  # input tokens, padding excluded (this rank's until collect, then all ranks')
    grad_norm: float = 0.0

    def add_term(self, key: str, value: torch.Tensor, coeff: float) -> None:
        self.term_totals[key] = self.term_totals.get(key, 0.0) + value.double()
        self.coeffs[key] = coeff

    def add_logps(self, name: str, total: torch.Tensor) -> None:
        self.logp_sums[name] = self.logp_sums[name] + total.double()

    def collect(self, grad_norm: torch.Tensor, info: ProcessInfo) -> None:
        """The statistics summed over ranks (one all-reduce) and the gradient norm (already
        global), as floats in ONE device-to-host copy. Host numbers enter by a fill, not a
        copy (a host-to-device copy waits for the device)."""
        keys, names = sorted(self.term_totals), sorted(self.logp_sums)
        stats = [*(self.term_totals[k] for k in keys), *(self.logp_sums[n] for n in names), float(self.tokens)]
        # nccl reduces only device tensors; gloo takes CPU ones.
        device = info.device if not info.distributed or dist.get_backend() == "nccl" else torch.device("cpu")

        def on_device(value) -> torch.Tensor:
            if isinstance(value, torch.Tensor):
                return value.to(device, torch.float64).reshape(())
            return torch.full((), value, dtype=torch.float64, device=device)

        summed = distributed.all_reduce_sum(torch.stack([on_device(v) for v in stats]), info)
        host = torch.cat([on_device(grad_norm).reshape(1), summed]).tolist()
        self.grad_norm = host[0]
        self.term_totals = dict(zip(keys, host[1 : 1 + len(keys)], strict=True))
        self.logp_sums = dict(zip(names, host[1 + len(keys) : -1], strict=True))
        self.tokens = int(host[-1])


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
        counts[f"{name}_scored"] = scored_tokens(global_batch[name], ctx.method_config)
    result = StepResult(global_counts=counts, logp_sums={name: 0.0 for name in sets})
    per_set = {name: split_micro_batches(global_batch.get(name), ctx.micro_per_step) for name in sets}
    for micro in range(ctx.grad_accum):
        slot = micro * ctx.info.world_size + ctx.info.rank
        parts = {name: per_set[name][slot] for name in sets}
        # A ragged last batch can leave this micro-batch without some set (or without any). It
        # still runs a forward and backward, so every rank enters the same FSDP collectives; an
        # empty set is stood in for by one example of the step whose terms get a zero share.
        stand_ins = {name: [global_batch[name][0]] for name in sets if not parts[name]}
        micro_batch_backward(ctx, {**parts, **stand_ins}, result, empty=set(stand_ins))

    if ctx.in_backward is not None:  # every parameter has stepped already, inside the backward
        result.collect(ctx.in_backward.finish(), ctx.info)
        if not math.isfinite(result.grad_norm):
            raise TrainingDiverged(
                f"the gradient norm is {result.grad_norm}: training diverged. With optim.in_backward "
                "the parameters whose gradients came before the non-finite one were already updated; nothing "
                "is exported and the last checkpoint (if any) is kept. Lower optim.lr, raise method.beta or "
                "check the data."
            )
        scheduler.step()
        ctx.method.after_step(ctx.method_config, ctx.state, result)
        return result
    # max_grad_norm 0 measures without clipping (an infinite limit scales by exactly 1).
    limit = ctx.max_grad_norm or math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(ctx.model.parameters, limit)
    result.collect(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm, ctx.info)
    # The norm is global (reduced across ranks), so every rank takes this branch together.
    if not math.isfinite(result.grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(
            f"the gradient norm is {result.grad_norm}: training diverged. The parameters were not "
            "updated and nothing is exported; the last checkpoint (if any) is kept. Lower optim.lr, "
            "raise method.beta or check the data."
        )
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    ctx.method.after_step(ctx.method_config, ctx.state, result)  # host floats after collect: no device sync
    return result


def micro_batch_backward(
    ctx: StepContext, parts: dict[str, list[dict]], result: StepResult, empty: set[str] = frozenset()
) -> None:
    """One forward over the concatenation of `parts` (the sets in method order), the method's
    loss terms renormalised by the step's global counts, backward; adds to `result`. The sets in
    `empty` hold a stand-in example: they count as zero examples and zero tokens."""
    sets, method = ctx.method.sets, ctx.method
    rows, start = {}, 0
    for name in sets:
        rows[name] = slice(start, start + len(parts[name]))
        start += len(parts[name])
    host = collate_micro_batch([it for name in sets for it in parts[name]], ctx)
    batch = to_device(host, ctx.info.device)
    # Input tokens (padding excluded) of the real examples, for tokens/s.
    result.tokens += sum(len(it["input_ids"]) for name in sets if name not in empty for it in parts[name])
    index = host["index"]
    ref_logps = {name: ctx.ref.lookup(name, index[rows[name]])[0] for name in method.ref_sets}
    weights = forget_weights(ctx.example_weights, index[rows["forget"]]) if ctx.example_weights is not None else None
    ref_logps, weights = to_device((ref_logps, weights), ctx.info.device)
    # Each term's share of the step's global count, from the tokenized examples (host values).
    local = {}
    for name in sets:
        items = [] if name in empty else parts[name]
        local[name] = {unit: local_count(unit, items, ctx.method_config) for unit in UNITS}

    def share(term) -> float:
        set_name, unit = term.normalizer.split("_")
        return local[set_name][unit] / max(1, result.global_counts[term.normalizer])

    def step_loss(terms) -> torch.Tensor:
        """The terms' sum, each scaled by its share of the step's global count (x world_size:
        FSDP averages gradients over ranks)."""
        return sum(term.coeff * term.value * share(term) * ctx.info.world_size for term in terms.values())

    autocast = torch.autocast(ctx.info.device.type, dtype=torch.bfloat16, enabled=ctx.model.autocast)
    with values_checked_by_caller(), autocast:
        if uses_one_pass(ctx.loss_design, ctx.info.device, method.one_pass):
            batch["target_owner"] = target_owner(host)  # stays on the host: the op's rows without a sync
            scored = local["forget"][method.token_unit] if method.token_separable else None
            loss, terms, logps = one_pass_forward(ctx, batch, rows, ref_logps, weights, step_loss, scored)
        else:
            terms, logps = two_call_forward(ctx, batch, rows, ref_logps, weights)
            loss = step_loss(terms)
    loss.backward()
    for key, term in terms.items():
        result.add_term(key, term.value.detach() * share(term), term.coeff)
    for name in sets:
        if name not in empty:
            result.add_logps(name, logps[name].detach().sum())


UNITS = ("examples", "tokens", "positions", "scored")


def one_pass_forward(
    ctx: StepContext, batch: dict, rows: dict[str, slice], ref_logps: dict, weights, step_loss, scored_count=None
):
    """(loss, terms, log-probs by set) from ONE call of the one-pass design (ops.example_loss): the
    logits, the loss and both gradients chunk by chunk, inside the wrapper's forward; the loss
    carries them to the backward. The closure is evaluated once per chunk and last on the
    complete log-probs: the terms and log-probs kept are that last call's. scored_count: a
    token_separable method's number of scored forget targets in this micro-batch (host): its
    forget term then comes from the token log-probs, each chunk's tokens adding their gradient."""
    method, config = ctx.method, ctx.method_config
    scored = None
    if scored_count is not None:  # where the forget term scores, found once on the host
        skip = method.skipped_targets(config)
        scored = to_device(scored_positions(skip, batch["target_owner"], rows["forget"]), ctx.info.device)
    loss_of, seen = method.one_pass_loss(
        config, rows, ref_logps, weights, step_loss, state=ctx.state, scored=scored, scored_count=scored_count
    )
    if scored is None:
        loss = ctx.model.wrapper(batch, sequence_loss=loss_of, example_groups=method.example_groups(rows))
    else:
        loss = ctx.model.wrapper(batch, token_loss=loss_of, token_values=method.one_pass_token_values)
    return loss, seen["terms"], seen["logps"]


def two_call_forward(ctx: StepContext, batch: dict, rows: dict[str, slice], ref_logps: dict, weights):
    """The method's terms from the log-probs of the forward (token_logprobs: the backward computes
    the gradients), with what else the method's forward needs (per-token terms, activations, KL)."""
    method, state = ctx.method, ctx.state
    logits_rows = rows["retain"] if ctx.model.reference is not None else None
    token_term = logits = None
    with method.capture(state, ctx.model.hf):
        if method.token_level:  # the forget term from per-token values, inside the wrapper's forward
            term = partial(
                method.forget_term, ctx.method_config, state, forget_rows=rows["forget"], example_index=batch["index"]
            )
            logps_all, counts_all, token_term = ctx.model.wrapper(batch, token_term=term)
        else:
            logps_all, counts_all, logits = ctx.model.wrapper(batch, logits_rows=logits_rows)
    activations = method.activation_terms(state, example_of_positions(batch), rows, batch["labels"])
    logps = {name: logps_all[r].float() for name, r in rows.items()}
    counts = {name: counts_all[r] for name, r in rows.items()}
    kl = None
    if ctx.model.reference is not None:
        with torch.no_grad():
            _, _, ref_logits = ctx.model.reference(batch, logits_rows=logits_rows)
        attended = batch["segment_ids"] >= 0 if "segment_ids" in batch else batch["attention_mask"] > 0
        kl = kl_from_logits(logits, ref_logits, attended[logits_rows])
    inputs = TermInputs(logps, counts, ref_logps, weights, kl, token_term, activations, state)
    return method.terms(ctx.method_config, inputs), logps


def local_count(unit: str, items: list[dict], method_config) -> int:
    """This micro-batch's count of what a term is a mean over (0 for a stand-in set), from the
    tokenized examples."""
    if unit == "examples":
        return len(items)
    if unit == "positions":
        return sum(len(item["input_ids"]) for item in items)
    if unit == "scored":
        return scored_tokens(items, method_config)
    return target_tokens(items)


def collate_micro_batch(items: list[dict], ctx: StepContext) -> dict:
    if ctx.packing:
        return collate_packed(items, ctx.pack_tokens, ctx.pad_token_id)
    return collate(items, ctx.pad_token_id)


def forget_weights(weights_by_index: torch.Tensor, forget_index: torch.Tensor) -> torch.Tensor:
    if int(forget_index.max()) >= len(weights_by_index):
        raise ConfigError(f"run.example_weights has {len(weights_by_index)} entries, forget set needs more")
    return weights_by_index[forget_index]
