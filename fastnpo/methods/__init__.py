"""The unlearning methods: the registry of `method.name`s and the flat user config.

One module per method or family (base.py holds what they share):

  gradient_ascent.py  ga, graddiff, finetune
  npo.py              npo, npo_rt, npo_kl, simnpo
  dpo.py              idkdpo, altpo
  token_weighted.py   wga, satimp
  ceu.py              ceu
  rmu.py              rmu
  undial.py           undial
  pdu.py              pdu

A method object (base.Method) says which sets it reads, which need cached reference log-probs,
what it builds once (prepare), the forward it needs, its loss terms with their normalisation
units, its defaults, its memory needs and its label; the trainer, the Hugging Face trainer, the
planner and the demo ask it (method_for(name)) rather than branching on names.
"""

import copy
import dataclasses
from dataclasses import dataclass

import torch

from ..config import reading_defaults, require, require_finite
from .base import (
    Method,
    MethodMemory,
    PrepareInputs,
    Term,
    TermInputs,
    masked_token_mean,
    scored_positions,
    target_ranks,
)
from .ceu import CEU
from .dpo import AltPO, IdkDPO
from .gradient_ascent import Finetune, GradDiff, GradientAscent
from .npo import NPO, NPOWithKL, NPOWithRetain, SimNPO
from .pdu import PDU
from .rmu import RMU, RMUState, rmu_control_vector, rmu_trainable_pattern
from .token_weighted import WGA, SatImp
from .undial import Undial, UndialReference

__all__ = [
    "BASELINES",
    "METHODS",
    "METHOD_FIELDS",
    "Method",
    "MethodConfig",
    "MethodMemory",
    "PrepareInputs",
    "RMUState",
    "Term",
    "TermInputs",
    "UndialReference",
    "forget_token_term",
    "loss_terms",
    "method_for",
    "rmu_control_vector",
    "rmu_trainable_pattern",
    "scored_count",
    "scored_targets",
    "skipped_targets",
    "target_ranks",
]

# Registry order: the tables' and plots' order (finetune last: it does not unlearn).
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        GradientAscent(),
        GradDiff(),
        NPO(),
        NPOWithRetain(),
        SimNPO(),
        IdkDPO(),
        AltPO(),
        NPOWithKL(),
        WGA(),
        SatImp(),
        CEU(),
        RMU(),
        Undial(),
        PDU(),
        Finetune(),
    )
}

# The methods of the TOFU reference results (open-unlearning's reproduction, plus NPO): the
# demo's default set.
BASELINES = ("ga", "graddiff", "npo", "npo_rt", "simnpo", "idkdpo")


def _parameters() -> dict:
    """Every method's own keys with its defaults (a key belongs to one method)."""
    owned: dict = {}
    for method in METHODS.values():
        for key, value in method.parameters.items():
            if key in owned:
                raise RuntimeError(f"method {method.name}: MethodConfig key {key!r} already belongs to another method")
            owned[key] = value
    return owned


PARAMETERS = _parameters()


def method_for(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method.name must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]


@dataclass
class MethodConfig:
    """The `method:` section, flat for users: name (one of METHODS; each method's formula,
    paper and defaults are in its module's docstring and in docs/methods.md) and the values the
    methods read.

    forget_coeff scales the forget term (GradDiff's gamma, NPO+RT's npo_coeff); retain_coeff
    the retain term (GradDiff's alpha, NPO+RT's rt_coeff, SimNPO's lambda, IdkDPO's and AltPO's
    retain NLL, RMU's alongside rmu_alpha; PDU's dual variable starts there); kl_coeff NPO+KL's KL
    term. average_logprobs: the NPO family, IdkDPO and AltPO on token-mean log-probs (MUSE, U2A)
    instead of summed ones (the NPO paper).

    A key left null takes the method's default when the section is built, so a printed or saved
    config shows the value the run uses: beta is 0.1 (NPO, IdkDPO, AltPO) or the method's own
    (SimNPO: 2.5); every other null key is one method's own parameter (simnpo_gamma and delta:
    SimNPO's margin; wga_beta; satimp_beta1/2; ceu_ignore_first; rmu_*, rmu_positions "attended"
    or "labelled" among them; undial_beta; pdu_epsilon, pdu_dual_lr and pdu_warmup_steps: PDU's
    constraint bound, dual step size and dual warm-up) and gets that method's default whichever
    method runs.
    """

    name: str = "npo"
    beta: float | None = None
    forget_coeff: float = 1.0
    retain_coeff: float = 1.0
    kl_coeff: float = 1.0
    simnpo_gamma: float | None = None
    delta: float | None = None
    average_logprobs: bool = False
    wga_beta: float | None = None
    satimp_beta1: float | None = None
    satimp_beta2: float | None = None
    ceu_ignore_first: int | None = None
    rmu_layer: int | None = None
    rmu_update_layers: list[int] | None = None
    rmu_params: list[str] | None = None
    rmu_steering_coeff: float | None = None
    rmu_alpha: float | None = None
    rmu_positions: str | None = None
    undial_beta: float | None = None
    pdu_epsilon: float | None = None
    pdu_dual_lr: float | None = None
    pdu_warmup_steps: int | None = None

    def __post_init__(self):
        if reading_defaults():  # load_structured's schema: resolved once method.name is known
            return
        require(self.name in METHODS, "method.name", f"must be one of {sorted(METHODS)}", self.name)
        for key, value in {**PARAMETERS, **METHODS[self.name].defaults}.items():
            if getattr(self, key) is None:
                setattr(self, key, copy.deepcopy(value))
        require_finite("method", self)
        require(self.beta > 0, "method.beta", "must be > 0", self.beta)
        for key in ("forget_coeff", "retain_coeff", "kl_coeff"):
            require(getattr(self, key) >= 0, f"method.{key}", "must be >= 0", getattr(self, key))
        for method in METHODS.values():  # every key is checked, whichever method runs
            method.check(self)


METHOD_FIELDS = tuple(f.name for f in dataclasses.fields(MethodConfig))


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
    """The method's loss terms from one micro-batch (see TermInputs): method_for(config.name).terms."""
    inputs = TermInputs(logps, counts, ref_logps, weights, kl, token_term, activations)
    return method_for(config.name).terms(config, inputs)


def skipped_targets(config: MethodConfig) -> int:
    """Answer tokens at the start of each forget example that the method does not score."""
    return method_for(config.name).skipped_targets(config)


def scored_count(target_count: int, config: MethodConfig) -> int:
    """How many of an example's target tokens the per-token forget term scores."""
    return max(0, target_count - skipped_targets(config))


def scored_targets(config: MethodConfig, example_of_target: torch.Tensor, forget_rows: slice) -> torch.Tensor:
    """Bool [R, L]: the target positions of the forget examples that the forget term scores."""
    return scored_positions(skipped_targets(config), example_of_target, forget_rows)


def forget_token_term(
    config: MethodConfig,
    token_logps: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    scored: torch.Tensor,
    reference: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """A token-level method's forget term: the mean over the `scored` positions of its token values
    (Method.token_values; reference: what the method's state gives for those positions, e.g. the
    reference hidden states in row-major order and the reference lm_head). 0 when no position is
    scored."""
    values = method_for(config.name).token_values(config, token_logps, hidden, weight, targets, scored, reference)
    return masked_token_mean(values, scored)
