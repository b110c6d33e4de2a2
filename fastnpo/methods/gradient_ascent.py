"""Gradient ascent and its relatives: ga, graddiff (GA + retain NLL), and finetune (plain NLL
on the "forget" set: how the demo builds the model it then unlearns)."""

from ..losses import ga_from_logprobs, nll_from_logprobs
from .base import Method, Term, TermInputs


class GradientAscent(Method):
    """ga: token-mean log p over the forget answers (= minus the NLL), x forget_coeff."""

    name, label = "ga", "GA"
    separable = True

    def forget_terms(self, config, x: TermInputs) -> dict[str, Term]:
        value = ga_from_logprobs(x.logps["forget"], x.counts["forget"], weights=x.weights)
        return {"ga": Term(value, "forget_tokens", config.forget_coeff)}


class GradDiff(GradientAscent):
    """graddiff: forget_coeff (gamma) x GA + retain_coeff (alpha) x retain NLL."""

    name, label = "graddiff", "GradDiff"
    sets = ("forget", "retain")
    retain_nll = True


class Finetune(Method):
    """finetune: the token-mean NLL of the "forget" set (to build a model to unlearn)."""

    name, label = "finetune", "Finetune"
    unlearns = False
    separable = True

    def forget_terms(self, config, x: TermInputs) -> dict[str, Term]:
        return {"nll": Term(nll_from_logprobs(x.logps["forget"], x.counts["forget"]), "forget_tokens", 1.0)}
