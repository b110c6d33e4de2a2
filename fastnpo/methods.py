"""Unlearning methods as combinations of the losses in losses.py.

A method says which example sets it reads each step (forget, retain, idk), which of them need
cached reference log-probs, and how its loss terms combine. Each term is a LOCAL mean plus
the name of what it is a mean over ("forget_examples", "retain_tokens", ...), so the trainer
can renormalise by global counts: gradient accumulation and data parallelism then give
exactly the gradient of one big batch.
"""

from dataclasses import dataclass

import torch

from .config import require, require_finite
from .losses import (
    dpo_from_logprobs,
    ga_from_logprobs,
    nll_from_logprobs,
    npo_from_logprobs,
    simnpo_from_logprobs,
)


@dataclass
class MethodConfig:
    """name: finetune | ga | graddiff | npo | npo_rt | npo_kl | simnpo | idkdpo.

    forget_coeff scales the forget term (GradDiff's gamma, NPO+RT's npo_coeff); retain_coeff
    the retain NLL (GradDiff's alpha, NPO+RT's rt_coeff, SimNPO's lambda, IdkDPO's retain
    term); kl_coeff NPO+KL's KL term. average_logprobs: NPO / IdkDPO on token-mean log-probs
    (MUSE, U2A) instead of summed ones (the NPO paper).

    SimNPO's margin, in either of its two spellings (set at most one): simnpo_gamma is the
    paper's gamma in -(2/beta) log sigmoid(-(beta/|y|) log pi - gamma); delta is open-unlearning's
    (and the SimNPO code's) in -(2/beta) log sigmoid(beta (NLL/|y| - delta)), so gamma = beta * delta.
    """

    name: str = "npo"
    beta: float = 0.1
    forget_coeff: float = 1.0
    retain_coeff: float = 1.0
    kl_coeff: float = 1.0
    simnpo_gamma: float = 0.0
    delta: float = 0.0
    average_logprobs: bool = False

    def __post_init__(self):
        require_finite("method", self)
        require(self.name in METHODS, "method.name", f"must be one of {sorted(METHODS)}", self.name)
        require(self.beta > 0, "method.beta", "must be > 0", self.beta)
        for key in ("forget_coeff", "retain_coeff", "kl_coeff"):
            require(getattr(self, key) >= 0, f"method.{key}", "must be >= 0", getattr(self, key))
        both = self.simnpo_gamma != 0 and self.delta != 0
        same = "and method.simnpo_gamma are one margin (gamma = beta * delta): set one"
        require(not both, "method.delta", same, self.delta)


@dataclass(frozen=True)
class Method:
    sets: tuple[str, ...]  # example sets read every step
    ref_sets: tuple[str, ...]  # sets whose reference log-probs are cached
    live_reference: bool = False  # needs the reference model's full distribution (KL)


METHODS = {
    "finetune": Method(sets=("forget",), ref_sets=()),
    "ga": Method(sets=("forget",), ref_sets=()),
    "graddiff": Method(sets=("forget", "retain"), ref_sets=()),
    "npo": Method(sets=("forget",), ref_sets=("forget",)),
    "npo_rt": Method(sets=("forget", "retain"), ref_sets=("forget",)),
    "npo_kl": Method(sets=("forget", "retain"), ref_sets=("forget",), live_reference=True),
    "simnpo": Method(sets=("forget", "retain"), ref_sets=()),
    "idkdpo": Method(sets=("forget", "idk", "retain"), ref_sets=("forget", "idk")),
}


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
) -> dict[str, Term]:
    """The method's loss terms from this micro-batch's per-sequence log-probs.

    logps / counts: summed log-probs and target-token counts per set; ref_logps: the cached
    reference's summed log-probs per set in config's ref_sets; weights: per forget example;
    kl: position-mean KL(pi_ref || pi) on the retain batch (npo_kl only).
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
        npo = npo_from_logprobs(
            seq("forget", logps), seq("forget", ref_logps), beta=config.beta, weights=weights
        )
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
    else:
        method_for(name)  # raises for an unknown name
    if name in ("graddiff", "npo_rt", "simnpo", "idkdpo"):
        terms["retain_nll"] = Term(
            nll_from_logprobs(logps["retain"], counts["retain"]), "retain_tokens", config.retain_coeff
        )
    if name == "npo_kl":
        if kl is None:
            raise ValueError("method npo_kl needs the KL term on the retain batch")
        terms["kl"] = Term(kl, "retain_positions", config.kl_coeff)
    return terms
