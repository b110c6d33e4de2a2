"""DPO on the forget questions: the forget answer is the loser, another answer of the same question
the winner, -(2/beta) log sigmoid(beta [(logp_w - ref_w) - (logp_l - ref_l)]) on summed (or, with
method.average_logprobs, token-mean) answer log-probs, beta 0.1, times forget_coeff, + retain_coeff
x retain NLL. The reference log-probs of both answers are cached. Two methods differ only in the
winner:

- IdkDPO (the NPO paper's baseline, arXiv 2404.05868): an "I don't know" answer ("idk", data.idk_*).
- AltPO (alternate preference optimization; Mekala et al. 2024, arXiv 2409.13474; open-unlearning's
  community/methods/AltPO: its DPO trainer, src/trainer/unlearn/dpo.py, over generated alternate
  answers): the question's alternate answer, a plausible answer with other facts ("alternate":
  data.alternate, a table that `fastnpo make-alternates` / `fastnpo.data.make_alternates` writes
  from the model's own greedy answers, or the forget set's own `alternate` column); forget_coeff
  is open-unlearning's gamma (1), retain_coeff its alpha (1), beta 0.1 (configs/trainer/DPO.yaml);
  no NLL on the alternate answer (open-unlearning adds none).

Each DPO term couples a forget example with its winner, so the loss is a sum of per-PAIR terms
(`pairs`): the one-pass design computes it chunk by chunk over whole pairs (Method.example_groups).
"""

from typing import ClassVar

from ..losses import dpo_from_logprobs
from .base import Method, Term, TermInputs, sequence_values


class ForgetAnswerDPO(Method):
    """The family's base: DPO of the `winner` set's answers over the forget answers."""

    winner: ClassVar[str] = ""
    retain_nll = True

    def forget_terms(self, config, x: TermInputs) -> dict[str, Term]:
        value = dpo_from_logprobs(
            sequence_values(config, x.logps, x.counts, self.winner),
            sequence_values(config, x.logps, x.counts, "forget"),
            sequence_values(config, x.ref_logps, x.counts, self.winner),
            sequence_values(config, x.ref_logps, x.counts, "forget"),
            beta=config.beta,
            weights=x.weights,
        )
        return {self.term: Term(value, "forget_examples", config.forget_coeff)}


class IdkDPO(ForgetAnswerDPO):
    name, label, term, winner = "idkdpo", "IdkDPO", "dpo", "idk"
    pairs = ("forget", "idk")
    sets = ("forget", "idk", "retain")
    ref_sets = ("forget", "idk")


class AltPO(ForgetAnswerDPO):
    name, label, term, winner = "altpo", "AltPO", "altpo", "alternate"
    pairs = ("forget", "alternate")
    sets = ("forget", "alternate", "retain")
    ref_sets = ("forget", "alternate")
