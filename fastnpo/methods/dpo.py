"""IdkDPO (the NPO paper's baseline, arXiv 2404.05868): DPO with an "I don't know" answer as the
winner and the forget answer as the loser, -(2/beta) log sigmoid(beta [(logp_w - ref_w) -
(logp_l - ref_l)]), beta 0.1, + retain_coeff x retain NLL. Reads the forget set, its refusals
("idk", data.idk_*) and the retain set; the reference log-probs of forget and idk are cached."""

from ..losses import dpo_from_logprobs
from .base import Method, Term, TermInputs, sequence_values


class IdkDPO(Method):
    name, label = "idkdpo", "IdkDPO"
    sets = ("forget", "idk", "retain")
    ref_sets = ("forget", "idk")
    retain_nll = True

    def forget_terms(self, config, x: TermInputs) -> dict[str, Term]:
        value = dpo_from_logprobs(
            sequence_values(config, x.logps, x.counts, "idk"),
            sequence_values(config, x.logps, x.counts, "forget"),
            sequence_values(config, x.ref_logps, x.counts, "idk"),
            sequence_values(config, x.ref_logps, x.counts, "forget"),
            beta=config.beta,
            weights=x.weights,
        )
        return {"dpo": Term(value, "forget_examples", config.forget_coeff)}
