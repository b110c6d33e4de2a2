"""NPO and its relatives: npo, npo_rt (+ retain NLL), npo_kl (+ KL to the reference on retain
data), and simnpo (no reference, length-normalised).

- NPO (arXiv 2404.05868): (2/beta) softplus(beta (log pi - log pi_ref)) per forget example, on
  summed answer log-probs (the NPO paper's code) or, with method.average_logprobs, token-mean
  ones (MUSE, U2A). beta 0.1.
- NPO+RT: forget_coeff (npo_coeff) x NPO + retain_coeff (rt_coeff) x retain NLL.
- NPO+KL: NPO + kl_coeff x KL(pi_ref || pi) per attended retain position over the full
  vocabulary: the reference's whole distribution, so a frozen copy of the model is kept
  (live_reference) and full logits of the retain rows are built.
- SimNPO (arXiv 2410.07163): -(2/beta) log sigmoid(-(beta/|y|) log pi - gamma) + lambda
  (retain_coeff) x retain NLL, no reference. beta 2.5 (losses.SIMNPO_BETA: the paper's TOFU
  forget05 setting). Its
  margin in either of its two spellings (set at most one): simnpo_gamma is the paper's gamma;
  delta is open-unlearning's (and the SimNPO code's) in -(2/beta) log sigmoid(beta (NLL/|y| -
  delta)), so gamma = beta * delta.
"""

from typing import ClassVar

from ..config import require
from ..losses import SIMNPO_BETA, npo_from_logprobs, simnpo_from_logprobs
from .base import Method, Term, TermInputs, sequence_values


class NPO(Method):
    name, label = "npo", "NPO"
    ref_sets = ("forget",)
    separable = True

    def forget_terms(self, config, x: TermInputs) -> dict[str, Term]:
        logps = sequence_values(config, x.logps, x.counts, "forget")
        ref = sequence_values(config, x.ref_logps, x.counts, "forget")
        value = npo_from_logprobs(logps, ref, beta=config.beta, weights=x.weights)
        return {"npo": Term(value, "forget_examples", config.forget_coeff)}


class NPOWithRetain(NPO):
    name, label = "npo_rt", "NPO+RT"
    sets = ("forget", "retain")
    retain_nll = True


class NPOWithKL(NPO):
    name, label = "npo_kl", "NPO+KL"
    sets = ("forget", "retain")
    live_reference = True
    separable = False  # the KL term reads the reference's full distribution

    def terms(self, config, x: TermInputs) -> dict[str, Term]:
        terms = self.forget_terms(config, x)
        if x.kl is None:
            raise ValueError(f"method {self.name} needs the KL term on the retain batch")
        terms["kl"] = Term(x.kl, "retain_positions", config.kl_coeff)
        return terms


class SimNPO(Method):
    name, label = "simnpo", "SimNPO"
    sets = ("forget", "retain")
    retain_nll = True
    separable = True
    defaults: ClassVar[dict] = {"beta": SIMNPO_BETA}
    parameters: ClassVar[dict] = {"simnpo_gamma": 0.0, "delta": 0.0}

    def check(self, config) -> None:
        both = config.simnpo_gamma != 0 and config.delta != 0
        same = "and method.simnpo_gamma are one margin (gamma = beta * delta): set one"
        require(not both, "method.delta", same, config.delta)

    @staticmethod
    def gamma(config) -> float:
        """The margin gamma from either spelling (at most one is set)."""
        return config.simnpo_gamma + config.beta * config.delta

    def forget_terms(self, config, x: TermInputs) -> dict[str, Term]:
        value = simnpo_from_logprobs(
            x.logps["forget"], x.counts["forget"], beta=config.beta, gamma=self.gamma(config), weights=x.weights
        )
        return {"simnpo": Term(value, "forget_examples", config.forget_coeff)}
