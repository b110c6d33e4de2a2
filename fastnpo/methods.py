"""Unlearning methods as combinations of the losses in losses.py.

A method says which example sets it reads each step (forget, retain, idk), which of them need
cached reference log-probs, and how its loss terms combine. Each term is a LOCAL mean plus
the name of what it is a mean over ("forget_examples", "retain_tokens", ...), so the trainer
can renormalise by global counts: gradient accumulation and data parallelism then give
exactly the gradient of one big batch.
"""

import copy
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import require, require_finite
from .losses import (
    ceu_token_values,
    dpo_from_logprobs,
    ga_from_logprobs,
    nll_from_logprobs,
    npo_from_logprobs,
    rmu_activation_loss,
    satimp_token_weights,
    simnpo_from_logprobs,
    undial_token_values,
    wga_token_weights,
)


@dataclass
class MethodConfig:
    """name: finetune | ga | graddiff | npo | npo_rt | npo_kl | simnpo | idkdpo | wga | satimp | ceu | rmu | undial.

    forget_coeff scales the forget term (GradDiff's gamma, NPO+RT's npo_coeff); retain_coeff
    the retain NLL (GradDiff's alpha, NPO+RT's rt_coeff, SimNPO's lambda, IdkDPO's retain
    term); kl_coeff NPO+KL's KL term. average_logprobs: NPO / IdkDPO on token-mean log-probs
    (MUSE, U2A) instead of summed ones (the NPO paper).

    SimNPO's margin, in either of its two spellings (set at most one): simnpo_gamma is the
    paper's gamma in -(2/beta) log sigmoid(-(beta/|y|) log pi - gamma); delta is open-unlearning's
    (and the SimNPO code's) in -(2/beta) log sigmoid(beta (NLL/|y| - delta)), so gamma = beta * delta.

    Per-token methods (their own parameters, so that `beta` keeps NPO's default):
    - wga (arXiv 2502.19301): token-mean of -w NLL, w = p^wga_beta detached; wga_beta = 1.
    - satimp (arXiv 2505.11953): w = p^satimp_beta1 (1 - p)^satimp_beta2 detached; 5 and 1.
    - ceu (arXiv 2503.01224): CE toward the model's own distribution with the label removed;
      ceu_ignore_first = 1 answer tokens of each example are not scored (the paper's footnote).
    - rmu (WMDP, arXiv 2403.03218): the output of decoder layer rmu_layer (7) is steered toward
      rmu_steering_coeff (20) times a fixed random unit vector on forget data and kept at the frozen
      model's on retain data (weight rmu_alpha = 100, times retain_coeff); only the parameters
      named rmu_params (["mlp.down_proj.weight"]) of the layers rmu_update_layers ([5, 6, 7]) train.
    - undial (UNDIAL, Dong et al., arXiv 2402.10052): token-mean over the forget answer tokens of
      the cross-entropy toward the reference model's distribution with the label's logit lowered by
      undial_beta (10, open-unlearning's configs/trainer/UNDIAL.yaml) before the softmax, detached;
      no retain term (open-unlearning's alpha 0). The reference comes from UndialReference (cached
      final hidden states of the forget answer tokens and the initial lm_head), not a second model.
    """

    name: str = "npo"
    beta: float = 0.1
    forget_coeff: float = 1.0
    retain_coeff: float = 1.0
    kl_coeff: float = 1.0
    simnpo_gamma: float = 0.0
    delta: float = 0.0
    average_logprobs: bool = False
    wga_beta: float = 1.0
    satimp_beta1: float = 5.0
    satimp_beta2: float = 1.0
    ceu_ignore_first: int = 1
    rmu_layer: int = 7
    rmu_update_layers: list[int] = field(default_factory=lambda: [5, 6, 7])
    rmu_params: list[str] = field(default_factory=lambda: ["mlp.down_proj.weight"])
    rmu_steering_coeff: float = 20.0
    rmu_alpha: float = 100.0
    undial_beta: float = 10.0

    def __post_init__(self):
        require_finite("method", self)
        require(self.name in METHODS, "method.name", f"must be one of {sorted(METHODS)}", self.name)
        require(self.beta > 0, "method.beta", "must be > 0", self.beta)
        for key in ("forget_coeff", "retain_coeff", "kl_coeff"):
            require(getattr(self, key) >= 0, f"method.{key}", "must be >= 0", getattr(self, key))
        both = self.simnpo_gamma != 0 and self.delta != 0
        same = "and method.simnpo_gamma are one margin (gamma = beta * delta): set one"
        require(not both, "method.delta", same, self.delta)
        for key in ("wga_beta", "satimp_beta1", "satimp_beta2", "rmu_steering_coeff", "undial_beta"):
            require(getattr(self, key) > 0, f"method.{key}", "must be > 0", getattr(self, key))
        require(self.rmu_alpha >= 0, "method.rmu_alpha", "must be >= 0", self.rmu_alpha)
        require(self.ceu_ignore_first >= 0, "method.ceu_ignore_first", "must be >= 0", self.ceu_ignore_first)
        require(self.rmu_layer >= 0, "method.rmu_layer", "must be >= 0 (a decoder layer index)", self.rmu_layer)
        layers = list(self.rmu_update_layers)
        message = f"must be a non-empty list of distinct layer indices in [0, method.rmu_layer={self.rmu_layer}]"
        fine = bool(layers) and len(set(layers)) == len(layers) and all(0 <= i <= self.rmu_layer for i in layers)
        require(fine, "method.rmu_update_layers", message, layers)
        require(bool(self.rmu_params), "method.rmu_params", "must name at least one parameter", self.rmu_params)


@dataclass(frozen=True)
class Method:
    sets: tuple[str, ...]  # example sets read every step
    ref_sets: tuple[str, ...]  # sets whose reference log-probs are cached
    live_reference: bool = False  # needs the reference model's full distribution (KL)
    token_term: bool = False  # the forget term is a per-token function of hidden states (forget_token_term)
    activations: bool = False  # RMU: a middle layer's activations (RMUState)
    reference_hidden: bool = False  # UNDIAL: the reference's final hidden states of the forget answers


METHODS = {
    "finetune": Method(sets=("forget",), ref_sets=()),
    "ga": Method(sets=("forget",), ref_sets=()),
    "graddiff": Method(sets=("forget", "retain"), ref_sets=()),
    "npo": Method(sets=("forget",), ref_sets=("forget",)),
    "npo_rt": Method(sets=("forget", "retain"), ref_sets=("forget",)),
    "npo_kl": Method(sets=("forget", "retain"), ref_sets=("forget",), live_reference=True),
    "simnpo": Method(sets=("forget", "retain"), ref_sets=()),
    "idkdpo": Method(sets=("forget", "idk", "retain"), ref_sets=("forget", "idk")),
    "wga": Method(sets=("forget", "retain"), ref_sets=(), token_term=True),
    "satimp": Method(sets=("forget", "retain"), ref_sets=(), token_term=True),
    "ceu": Method(sets=("forget",), ref_sets=(), token_term=True),
    "rmu": Method(sets=("forget", "retain"), ref_sets=(), activations=True),
    "undial": Method(sets=("forget",), ref_sets=(), token_term=True, reference_hidden=True),
}

# The unit of each per-token method's forget term: CE-U skips the first answer tokens.
TOKEN_TERM_UNITS = {"wga": "tokens", "satimp": "tokens", "ceu": "scored", "undial": "tokens"}


def simnpo_gamma(config: MethodConfig) -> float:
    """SimNPO's margin gamma from either spelling (at most one is set)."""
    return config.simnpo_gamma + config.beta * config.delta


def method_for(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method.name must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]


@dataclass
class Term:
    value: torch.Tensor  # mean over the local examples / tokens of `normalizer`
    normalizer: str  # "<set>_examples", "<set>_tokens" (targets) or "<set>_positions" (attended)
    coeff: float


def loss_terms(
    config: MethodConfig,
    logps: dict[str, torch.Tensor],
    counts: dict[str, torch.Tensor],
    ref_logps: dict[str, torch.Tensor],
    *,
    weights: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    token_term: torch.Tensor | None = None,
    activations: dict[str, torch.Tensor] | None = None,
) -> dict[str, Term]:
    """The method's loss terms from this micro-batch's per-sequence log-probs.

    logps / counts: summed log-probs and target-token counts per set; ref_logps: the cached
    reference's summed log-probs per set in config's ref_sets; weights: per forget example;
    kl: position-mean KL(pi_ref || pi) on the retain batch (npo_kl only); token_term: the
    per-token methods' forget term (forget_token_term); activations: RMU's position-mean
    "forget" and "retain" terms (RMUState.terms).
    """
    name = config.name

    def seq(set_name, table):
        values = table[set_name]
        return values / counts[set_name].clamp(min=1) if config.average_logprobs else values

    terms: dict[str, Term] = {}
    if name == "finetune":
        terms["nll"] = Term(nll_from_logprobs(logps["forget"], counts["forget"]), "forget_tokens", 1.0)
    elif name in ("ga", "graddiff"):
        terms["ga"] = Term(
            ga_from_logprobs(logps["forget"], counts["forget"], weights=weights),
            "forget_tokens",
            config.forget_coeff,
        )
    elif name in ("npo", "npo_rt", "npo_kl"):
        npo = npo_from_logprobs(seq("forget", logps), seq("forget", ref_logps), beta=config.beta, weights=weights)
        terms["npo"] = Term(npo, "forget_examples", config.forget_coeff)
    elif name == "simnpo":
        simnpo = simnpo_from_logprobs(
            logps["forget"], counts["forget"], beta=config.beta, gamma=simnpo_gamma(config), weights=weights
        )
        terms["simnpo"] = Term(simnpo, "forget_examples", config.forget_coeff)
    elif name == "idkdpo":
        dpo = dpo_from_logprobs(
            seq("idk", logps),
            seq("forget", logps),
            seq("idk", ref_logps),
            seq("forget", ref_logps),
            beta=config.beta,
            weights=weights,
        )
        terms["dpo"] = Term(dpo, "forget_examples", config.forget_coeff)
    elif name in TOKEN_TERM_UNITS:
        if token_term is None:
            raise ValueError(f"method {name} needs its per-token forget term (forget_token_term)")
        terms[name] = Term(token_term, f"forget_{TOKEN_TERM_UNITS[name]}", config.forget_coeff)
    elif name == "rmu":
        if activations is None:
            raise ValueError("method rmu needs the steered layer's activation terms (RMUState.terms)")
        terms["rmu_forget"] = Term(activations["forget"], "forget_positions", config.forget_coeff)
        terms["rmu_retain"] = Term(activations["retain"], "retain_positions", config.rmu_alpha * config.retain_coeff)
    else:
        method_for(name)  # raises for an unknown name
    if name in ("graddiff", "npo_rt", "simnpo", "idkdpo", "wga", "satimp"):
        terms["retain_nll"] = Term(
            nll_from_logprobs(logps["retain"], counts["retain"]), "retain_tokens", config.retain_coeff
        )
    if name == "npo_kl":
        if kl is None:
            raise ValueError("method npo_kl needs the KL term on the retain batch")
        terms["kl"] = Term(kl, "retain_positions", config.kl_coeff)
    return terms


# ----------------------------------------------------------------------------- per-token methods


def skipped_targets(config: MethodConfig) -> int:
    """Answer tokens at the start of each forget example that the method does not score."""
    return config.ceu_ignore_first if config.name == "ceu" else 0


def scored_count(target_count: int, config: MethodConfig) -> int:
    """How many of an example's target tokens the per-token forget term scores."""
    return max(0, target_count - skipped_targets(config))


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


def scored_targets(config: MethodConfig, example_of_target: torch.Tensor, forget_rows: slice) -> torch.Tensor:
    """Bool [R, L]: the target positions of the forget examples that the forget term scores."""
    in_forget = (example_of_target >= forget_rows.start) & (example_of_target < forget_rows.stop)
    skip = skipped_targets(config)
    return in_forget & (target_ranks(example_of_target) > skip) if skip else in_forget


def forget_token_term(
    config: MethodConfig,
    token_logps: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    scored: torch.Tensor,
    reference: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """A per-token method's forget term: the mean over the `scored` positions of its token loss.

    token_logps [R, L]: log-probs of the aligned targets (differentiable); hidden [R, L, D] and
    weight [V, D] (CE-U and UNDIAL, which need the whole distribution); scored [R, L] bool.
    reference (UNDIAL only): (the reference's final hidden states of the scored positions in
    row-major order [K, D], the reference lm_head [V, D]), from UndialReference.gather. 0 when no
    position is scored (a stand-in set, or CE-U on one-token answers)."""
    name = config.name
    if name == "wga":
        values = wga_token_weights(token_logps, beta=config.wga_beta) * token_logps
    elif name == "satimp":
        weights = satimp_token_weights(token_logps, beta1=config.satimp_beta1, beta2=config.satimp_beta2)
        values = weights * token_logps
    elif name == "ceu":
        values = ceu_token_values(hidden, weight, targets, scored)
    elif name == "undial":
        if reference is None:
            raise ValueError("method undial needs the reference hidden states and lm_head (UndialReference.gather)")
        values = undial_token_values(hidden, weight, targets, scored, *reference, beta=config.undial_beta)
    else:
        raise ValueError(f"method {name} has no per-token forget term")
    return torch.where(scored, values, 0.0).sum() / max(1, int(scored.sum()))


# ----------------------------------------------------------------------------- RMU


def rmu_control_vector(dim: int, steering_coeff: float, seed: int) -> torch.Tensor:
    """RMU's target c * u: u uniform in [0, 1)^dim, normalised (as in the WMDP code), drawn from its
    own generator so that every rank and every resumed run steers toward the same vector."""
    generator = torch.Generator().manual_seed(int(seed))
    u = torch.rand(dim, generator=generator, dtype=torch.float64)
    return (u / u.norm() * steering_coeff).float()


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    get = getattr(model, "get_decoder", None)
    body = get() if callable(get) else None
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"method rmu: cannot find the decoder layers of {type(model).__name__} (get_decoder().layers)")
    return layers


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _to_dtype(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_to_dtype(v, dtype) for v in value)
    return value


def rmu_trainable_pattern(config: MethodConfig) -> re.Pattern:
    """The parameter names RMU trains: rmu_params of the decoder layers rmu_update_layers."""
    layers = "|".join(str(i) for i in sorted(config.rmu_update_layers))
    params = "|".join(re.escape(p) for p in config.rmu_params)
    return re.compile(rf"(^|.*\.)layers\.({layers})\.({params})$")


class RMUState:
    """What RMU needs beside the model being trained (WMDP, Li et al. 2024, arXiv 2403.03218).

    RMU trains a few weights so that decoder layer L's output moves to c*u on forget data and
    stays at the frozen model's on retain data. No frozen copy of the whole model is kept: the
    layers below the first updated one never change, so the frozen model's layer-L output is the
    frozen copies of layers [first updated .. L] applied to what enters the first updated layer in
    the live forward (captured by a hook). Memory: those (L - first + 1) layers, e.g. 3 of 32.
    """

    def __init__(self, config: MethodConfig, model: nn.Module, *, seed: int):
        layers = _decoder_layers(model)
        if config.rmu_layer >= len(layers):
            raise ValueError(f"method.rmu_layer: the model has {len(layers)} decoder layers, got {config.rmu_layer}")
        self.config = config
        self.layer = config.rmu_layer
        self.first = min(config.rmu_update_layers)
        self.frozen = nn.ModuleList(copy.deepcopy(layers[i]) for i in range(self.first, self.layer + 1))
        self.frozen.eval().requires_grad_(False)
        dim = getattr(getattr(model, "config", None), "hidden_size", None)
        if dim is None:
            raise ValueError(f"method rmu: {type(model).__name__}.config has no hidden_size")
        self.control = rmu_control_vector(dim, config.rmu_steering_coeff, seed)
        self._captured: dict = {}

    def select_trainable(self, model: nn.Module) -> list[str]:
        """Freeze every parameter but rmu_params of rmu_update_layers; returns the trainable names."""
        pattern = rmu_trainable_pattern(self.config)
        names = []
        for name, parameter in model.named_parameters():
            chosen = bool(pattern.match(name))
            parameter.requires_grad_(chosen)
            if chosen:
                names.append(name)
        if not names:
            raise ValueError(
                f"method.rmu_params: no parameter {self.config.rmu_params} in decoder layers "
                f"{self.config.rmu_update_layers} of {type(model).__name__}"
            )
        return names

    @contextmanager
    def capture(self, model: nn.Module):
        """Within the block, a forward of `model` records what enters the first updated layer and
        the output of layer rmu_layer; the layers above get that output detached (their graph is
        never needed)."""
        layers = _decoder_layers(model)
        self._captured = {}

        def before(module, args, kwargs):
            if "input" not in self._captured:
                hidden = args[0] if args else kwargs["hidden_states"]
                self._captured["input"] = hidden.detach()
                self._captured["args"] = args[1:]
                self._captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

        def after(module, args, output):
            if "output" not in self._captured:
                self._captured["output"] = _first(output)
            if isinstance(output, (tuple, list)):
                return type(output)([output[0].detach(), *output[1:]])
            return output.detach()

        handles = [
            layers[self.first].register_forward_pre_hook(before, with_kwargs=True),
            layers[self.layer].register_forward_hook(after),
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def frozen_output(self) -> torch.Tensor:
        """The frozen model's layer-rmu_layer output for the captured forward."""
        c = self._captured
        dtype = next(self.frozen.parameters()).dtype
        device = c["input"].device
        if next(self.frozen.parameters()).device != device:
            self.frozen.to(device)
        hidden = c["input"].to(dtype)
        args, kwargs = _to_dtype(c["args"], dtype), _to_dtype(c["kwargs"], dtype)
        for layer in self.frozen:
            hidden = _first(layer(hidden, *args, **kwargs))
        return hidden

    def terms(self, forget: torch.Tensor, retain: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """RMU's forget and retain terms (position means) for the captured forward; forget and
        retain are bool [R, L] masks of the attended positions of each set."""
        if "output" not in self._captured:
            raise RuntimeError("RMUState.terms: no forward ran inside RMUState.capture")
        output = self._captured["output"]
        control = self.control.to(output.device)
        terms = {"forget": _masked_term(output, control, forget)}
        if retain is not None:
            terms["retain"] = _masked_term(output, self.frozen_output().to(output.dtype), retain)
        return terms


def _masked_term(activations, target, mask) -> torch.Tensor:
    if not bool(mask.any()):  # a stand-in set: a zero that still reaches the graph
        return activations.sum() * 0.0
    return rmu_activation_loss(activations, target, mask)


# ----------------------------------------------------------------------------- UNDIAL


class UndialReference:
    """What UNDIAL needs of the reference model (Dong et al., arXiv 2402.10052) without keeping it:
    the initial model's final hidden states (after the final norm) of every forget example's answer
    tokens, and one copy of the initial lm_head weight. The reference distribution at a forget
    token is then softmax(h_ref @ W_ref.T), computed vocabulary chunk by chunk in the loss
    (ops.undial_token_losses). Memory: answer tokens x D x 2 bytes (bf16 model; kept on the CPU,
    a micro-batch's rows moved to the device per step) + V x D x 2 bytes (on the device); e.g.
    TOFU forget10 at 7B (about 16k answer tokens, D 4096, V 32000): 134 MB + 262 MB.

    hidden [T, D]: the examples' target rows concatenated; start / count [E] by example index
    (count 0 for an index without an example); weight [V, D].
    """

    def __init__(self, hidden: torch.Tensor, start: torch.Tensor, count: torch.Tensor, weight: torch.Tensor):
        self.hidden, self.start, self.count, self.weight = hidden, start.long(), count.long(), weight

    @classmethod
    def from_rows(cls, rows: dict[int, torch.Tensor], weight: torch.Tensor) -> "UndialReference":
        """From each example's target rows {example index: [n_i, D]} (the reference pass's output)
        and the lm_head weight (copied: training must not move it)."""
        count = torch.zeros(max(rows, default=-1) + 1, dtype=torch.long)
        for index, value in rows.items():
            count[index] = value.shape[0]
        empty = torch.zeros((0, weight.shape[1]), dtype=weight.dtype)
        hidden = torch.cat([rows[i].cpu() for i in sorted(rows)]) if rows else empty
        return cls(hidden, count.cumsum(0) - count, count, weight.detach().clone())

    @property
    def nbytes(self) -> int:
        return self.hidden.numel() * self.hidden.element_size() + self.weight.numel() * self.weight.element_size()

    def gather(self, example_index: torch.Tensor, rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reference hidden states [K, D] on the weight's device, the weight) of K target
        positions: example_index [K] (the example's index in the forget set) and rank [K] (1-based
        rank of the target among the example's targets)."""
        example_index, rank = example_index.cpu().long(), rank.cpu().long()
        known = (example_index >= 0) & (example_index < len(self.count))
        count = torch.where(known, self.count[example_index.clamp(0, max(0, len(self.count) - 1))], 0)
        bad = ~known | (rank < 1) | (rank > count)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"method undial: forget example {int(example_index[i])} has {int(count[i])} cached reference "
                f"answer tokens, but target {int(rank[i])} was asked for (did the data change after the "
                "reference pass?)"
            )
        rows = self.hidden.index_select(0, self.start[example_index] + rank - 1)
        return rows.to(self.weight.device, non_blocking=True), self.weight
