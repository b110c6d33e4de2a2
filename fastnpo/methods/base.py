"""What every unlearning method is: the base class the registry (methods/__init__.py) holds one
instance of per `method.name`, and the pieces the methods share.

A method says which example sets it reads each step (`sets`), which of them need cached
reference log-probs (`ref_sets`), what it builds once before the first step (`prepare`: e.g. a
reference it keeps in memory, frozen layers, a steering vector), which forward it needs (the
per-sequence log-probs every method gets; per-token values of the forget rows, `token_level`;
a middle layer's activations, `capture` / `activation_terms`; the reference model's full
distribution, `live_reference`), its loss terms (`terms`), its defaults (`defaults`, for
MethodConfig's shared keys, and `parameters`, the keys only it reads), what it adds to the
memory plan (`memory`) and its label for tables and plots.

Each term is a LOCAL mean plus the name of what it is a mean over ("forget_examples",
"retain_tokens", ...), so the trainer can renormalise by global counts: gradient accumulation and
data parallelism then give exactly the gradient of one big batch.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..losses import nll_from_logprobs


@dataclass
class Term:
    value: torch.Tensor  # mean over the local examples / tokens of `normalizer`
    normalizer: str  # "<set>_examples", "<set>_tokens" (targets), "<set>_scored" or "<set>_positions" (attended)
    coeff: float


@dataclass
class TermInputs:
    """What a micro-batch's forward produced, by example set.

    logps / counts: summed log-probs and target-token counts; ref_logps: the cached reference's
    summed log-probs of the method's ref_sets; weights: per forget example (U2A); kl: position-mean
    KL(pi_ref || pi) on the retain batch (live_reference methods); token_term: a token-level
    method's forget term (Method.forget_term); activations: capture methods' terms by set
    (Method.activation_terms); state: what the method's prepare built, as after_step has left it
    (the trainer passes it; None where a caller keeps no state)."""

    logps: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]
    ref_logps: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    token_term: torch.Tensor | None = None
    activations: dict[str, torch.Tensor] | None = None
    state: object | None = None  # what Method.prepare built (and after_step updates), when the caller has it


@dataclass
class PrepareInputs:
    """What Method.prepare may use, from the initial model before any wrapping.

    forget: the forget examples (tokenized items with an "index": the example's place in whatever
    `example_index` refers to at step time); target_hidden_states(items) -> {index: [n_i, D]}:
    the model's final hidden states of each item's target tokens (refcache.item_target_hidden_states
    bound to the model); output_weight: the model's lm_head weight."""

    model: nn.Module
    seed: int
    forget: list[dict] = field(default_factory=list)
    target_hidden_states: Callable[[list[dict]], dict[int, torch.Tensor]] | None = None
    output_weight: torch.Tensor | None = None


@dataclass
class MethodMemory:
    """A method's own entries in the memory plan, counted on the meta-device model."""

    trainable: int = 0  # parameters it trains when it trains a subset (0: all)
    frozen_copy: int = 0  # parameters of frozen copies it keeps on the device
    backward_layers: int = 0  # decoder layers its backward runs through (0: all)


class Method:
    """Base: one forget term, optionally a retain NLL. Subclasses set the class attributes and
    override `forget_terms` (and the hooks their forward needs)."""

    name: str = ""
    label: str = ""
    unlearns: bool = True  # False: a training method with no place in unlearning tables (finetune)
    sets: tuple[str, ...] = ("forget",)
    ref_sets: tuple[str, ...] = ()
    retain_nll: bool = False  # adds retain_coeff x the retain set's token-mean NLL
    live_reference: bool = False  # needs the reference model's full distribution (a frozen copy)
    token_level: bool = False  # the forget term is a mean of per-token values (forget_term)
    token_unit: str = "tokens"  # what a token-level forget term is a mean over ("tokens" or "scored")
    captures_activations: bool = False  # reads a middle layer's activations (capture, activation_terms)
    keeps_reference_head: bool = False  # prepare keeps a copy of the initial lm_head on the device
    prepares_examples: bool = False  # prepare keeps per-forget-example state, looked up by example_index
    prepared_what: str = "per-example state"  # what that state is, for messages
    lora_conflict: str = ""  # why the method cannot train LoRA adapters ("" if it can)
    # Its loss is a sum of per-example terms of the per-sequence log-probs alone (the cached
    # reference's and the example weights included): the one-pass design (model.loss_design) can
    # compute its gradients chunk by chunk. Not so for activations or a live reference's
    # distribution; pairs of examples coupled in one term (IdkDPO, AltPO) are `pairs`.
    separable: bool = False
    # Two sets whose i-th examples one term couples (DPO's loser and winner), the rest of the loss
    # separable: the one-pass design then chunks whole pairs (example_groups), so both log-probs of
    # a pair are complete when its gradient is taken.
    pairs: tuple[str, str] | None = None
    # A token-level method whose per-token values the one-pass design's row statistics give (the rest
    # of its loss separable): elementwise in the token log-probs alone, weights detached (WGA,
    # SatImp), or CE-U's per-token loss (one_pass_token_values "ce_u": two more row statistics).
    # Each chunk's tokens then add their own gradient (token_forget_term). Not UNDIAL (its values
    # read the reference model's distribution).
    token_separable: bool = False
    one_pass_token_values: str = "logprob"  # what the one-pass design hands token_forget_term (ops.TOKEN_VALUES)
    # MethodConfig: the shared keys this method resolves its own way, and the keys only it reads.
    defaults: ClassVar[dict] = {"beta": 0.1}
    parameters: ClassVar[dict] = {}

    # ------------------------------------------------------------------ config

    def check(self, config) -> None:
        """Refuse bad values of this method's own `parameters` (called for every method: a key
        is checked whichever method runs)."""

    def skipped_targets(self, config) -> int:
        """Answer tokens at the start of each forget example that the forget term does not score."""
        return 0

    def for_layers(self, layers: int) -> dict:
        """MethodConfig values for a small model of `layers` decoder layers (the demo's tiny one)
        where the defaults assume a deeper one; {}: the defaults fit any."""
        return {}

    # ------------------------------------------------------------------ what it builds once

    def prepare(self, config, inputs: PrepareInputs):
        """What the method builds once before the first step (None: nothing)."""
        return None

    def describe(self, state) -> str | None:
        """One log line about what prepare built (None: nothing to say)."""
        return None

    # ------------------------------------------------------------------ the forward

    def capture(self, state, model: nn.Module):
        """A context for the forward (capture methods record activations in it)."""
        return nullcontext()

    def activation_terms(self, state, owner: torch.Tensor, rows: dict[str, slice], labels: torch.Tensor):
        """Capture methods: their terms by set after the forward; owner [R, L] the micro-batch
        example of each attended position (-1 on padding), rows each set's examples, labels [R, L]
        the batch's labels (-100 on prompt and padding). None otherwise."""
        return None

    def forget_term(self, config, state, token_logps, hidden, weight, targets, owner, forget_rows, example_index=None):
        """Token-level methods: the mean over the scored forget positions of token_values.

        token_logps [R, L] log-probs of the aligned targets (differentiable); hidden [R, L, D] and
        weight [V, D]; owner [R, L]: the micro-batch example of each target (-1 elsewhere);
        forget_rows: the forget examples' places in the micro-batch; example_index [E]: each
        micro-batch example's index in its set (prepares_examples methods look their state up by it)."""
        scored = scored_positions(self.skipped_targets(config), owner, forget_rows)
        reference = self.reference_rows(state, owner, scored, example_index)
        values = self.token_values(config, token_logps, hidden, weight, targets, scored, reference)
        return masked_token_mean(values, scored)

    @property
    def one_pass(self) -> bool:
        """Whether the one-pass design can compute this method's loss (separable, token_separable or
        separable over `pairs`)."""
        return self.separable or self.token_separable or self.pairs is not None

    def example_groups(self, rows: dict[str, slice]) -> torch.Tensor | None:
        """The one-pass design's chunk units (ops.example_loss's groups), int64 [examples] on the host:
        the i-th examples of the two `pairs` sets share group i, every other example a group of its
        own after them; None when nothing is coupled. rows: each set's examples in the micro-batch."""
        if self.pairs is None:
            return None
        loser, winner = (rows[name] for name in self.pairs)
        count = loser.stop - loser.start
        if winner.stop - winner.start != count:
            raise ValueError(
                f"method {self.name}: its {self.pairs[0]} and {self.pairs[1]} examples must be paired one to "
                f"one, got {count} and {winner.stop - winner.start} in a micro-batch"
            )
        total = max(r.stop for r in rows.values())
        groups = torch.full((total,), -1, dtype=torch.long)
        groups[loser] = groups[winner] = torch.arange(count)
        alone = groups < 0
        groups[alone] = torch.arange(count, count + int(alone.sum()))
        return groups

    def token_forget_term(self, config, token_values, scored, scored_count: int) -> torch.Tensor:
        """forget_term for a token_separable method from the per-token values the one-pass design
        gives (one_pass_token_values: the token log-probs, or CE-U's per-token losses), the scored
        positions and their number found once by the caller (the one-pass design evaluates the
        loss once per chunk: counting them here would be a device sync each time)."""
        values = self.one_pass_values(config, token_values, scored)
        return torch.where(scored, values, 0.0).sum() / max(1, scored_count)

    def one_pass_values(self, config, token_values, scored) -> torch.Tensor:
        """token_values from what the one-pass design gives: by default the token log-probs alone."""
        return self.token_values(config, token_values, None, None, None, scored)

    def one_pass_loss(self, config, rows, ref_logps, weights, combine, *, state=None, scored=None, scored_count=0):
        """(loss_of, seen) for the one-pass design (one_pass methods): loss_of(logps [E], counts [E]
        [, token_logps [R, L] when `scored` is given]) -> combine(the method's terms), the closure
        the design evaluates once per chunk and last on the complete log-probs; `seen` keeps that
        last call's "terms" and "logps" by set. rows: each set's examples; scored / scored_count: a
        token_separable method's scored forget positions and their number (token_forget_term)."""
        seen = {}

        def loss_of(logps_all: torch.Tensor, counts_all: torch.Tensor, token_logps=None) -> torch.Tensor:
            logps = {name: logps_all[r] for name, r in rows.items()}
            counts = {name: counts_all[r] for name, r in rows.items()}
            token_term = None if scored is None else self.token_forget_term(config, token_logps, scored, scored_count)
            inputs = TermInputs(logps, counts, ref_logps, weights, token_term=token_term, state=state)
            terms = self.terms(config, inputs)
            seen.update(terms=terms, logps=logps)
            return combine(terms)

        return loss_of, seen

    def reference_rows(self, state, owner, scored, example_index):
        """What token_values needs of `state` for the scored positions (None: nothing)."""
        return None

    def token_values(self, config, token_logps, hidden, weight, targets, scored, reference=None):
        raise ValueError(f"method {self.name} has no per-token forget term")

    # ------------------------------------------------------------------ the loss

    def forget_terms(self, config, x: TermInputs) -> dict[str, Term]:
        if not self.token_level:
            raise NotImplementedError(f"method {self.name}: forget_terms")
        if x.token_term is None:
            raise ValueError(f"method {self.name} needs its per-token forget term (forget_token_term)")
        return {self.name: Term(x.token_term, f"forget_{self.token_unit}", config.forget_coeff)}

    def terms(self, config, x: TermInputs) -> dict[str, Term]:
        """The method's loss terms from one micro-batch's forward."""
        terms = self.forget_terms(config, x)
        if self.retain_nll:
            value = nll_from_logprobs(x.logps["retain"], x.counts["retain"])
            terms["retain_nll"] = Term(value, "retain_tokens", config.retain_coeff)
        return terms

    # ------------------------------------------------------------------ state across steps

    def after_step(self, config, state, result) -> None:
        """Called by the trainer once per optimizer step, after StepResult.collect: result.term_totals
        hold each term's GLOBAL mean over the step as host floats (the same on every rank), so a
        method may update `state` from them (e.g. a dual variable) without a device sync and without
        the ranks drifting apart. config: the method section. Nothing by default."""

    def state_dict(self, state) -> dict:
        """What of `state` changes during training and a resume must restore (JSON-able; saved in
        each checkpoint's trainer.json). {} by default: prepare rebuilds the rest."""
        return {}

    def load_state_dict(self, state, saved: dict) -> None:
        """Restore what state_dict gave, into the `state` prepare has just rebuilt."""

    # ------------------------------------------------------------------ the memory plan

    def memory(self, config, model: nn.Module, layers: nn.ModuleList) -> MethodMemory:
        """Its own entries in the memory plan (model built on the meta device, its decoder layers)."""
        return MethodMemory()

    def __repr__(self) -> str:
        return f"<method {self.name}>"


# ----------------------------------------------------------------------------- shared helpers


def sequence_values(config, table: dict[str, torch.Tensor], counts: dict[str, torch.Tensor], set_name: str):
    """A set's per-sequence log-probs, summed or (method.average_logprobs) token-mean."""
    values = table[set_name]
    return values / counts[set_name].clamp(min=1) if config.average_logprobs else values


def masked_token_mean(values: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Mean of values over the scored positions; 0 when none is (a stand-in set, or a method
    that skips the only answer token)."""
    return torch.where(scored, values, 0.0).sum() / max(1, int(scored.sum()))


def target_ranks(example_of_target: torch.Tensor) -> torch.Tensor:
    """1-based rank of each target among its example's targets; example_of_target [R, L] holds
    the example index of each target position (-1 elsewhere). Works for padded rows (one example
    a row) and packed rows (examples contiguous within a row)."""
    is_target = (example_of_target >= 0).reshape(-1)
    running = (example_of_target >= 0).long().cumsum(dim=1).reshape(-1)
    examples = example_of_target.reshape(-1).clamp(min=0)
    first = running.new_full((int(examples.max()) + 1 if examples.numel() else 1,), running.numel() + 1)
    first = first.scatter_reduce(0, examples[is_target], running[is_target], "amin")
    ranks = running - first[examples] + 1
    return torch.where(is_target, ranks, 0).view(example_of_target.shape)


def scored_positions(skip: int, example_of_target: torch.Tensor, forget_rows: slice) -> torch.Tensor:
    """Bool [R, L]: the target positions of the forget examples that the forget term scores
    (all but the first `skip` of each example)."""
    in_forget = (example_of_target >= forget_rows.start) & (example_of_target < forget_rows.stop)
    return in_forget & (target_ranks(example_of_target) > skip) if skip else in_forget
