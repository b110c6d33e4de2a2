"""AltPO (alternate preference optimization; Mekala et al. 2024, arXiv 2409.13474; open-unlearning's
community/methods/AltPO: its DPO trainer, src/trainer/unlearn/dpo.py, over generated alternate
answers): DPO with the forget question's alternate answer (a plausible answer with other facts) as
the winner and the forget answer as the loser,
    -(2/beta) log sigmoid(beta [(logp_alt - ref_alt) - (logp_forget - ref_forget)]),
on summed answer log-probs, times forget_coeff (open-unlearning's gamma, 1), + retain_coeff (alpha,
1) x retain NLL; beta 0.1 (configs/trainer/DPO.yaml). No NLL on the alternate answer (open-unlearning
adds none). Reads the forget set, its alternates ("alternate": data.alternate, a table that
`fastnpo.data.make_alternates` writes from the model's own greedy answers, or the forget set's own
`alternate` column) and the retain set; the reference log-probs of forget and alternate are cached."""

from ..losses import dpo_from_logprobs
from .base import Method, Term, TermInputs, sequence_values


class AltPO(Method):
    name, label = "altpo", "AltPO"
    sets = ("forget", "alternate", "retain")
    ref_sets = ("forget", "alternate")
    retain_nll = True

    def forget_terms(self, config, x: TermInputs) -> dict[str, Term]:
        value = dpo_from_logprobs(
            sequence_values(config, x.logps, x.counts, "alternate"),
            sequence_values(config, x.logps, x.counts, "forget"),
            sequence_values(config, x.ref_logps, x.counts, "alternate"),
            sequence_values(config, x.ref_logps, x.counts, "forget"),
            beta=config.beta,
            weights=x.weights,
        )
        return {"altpo": Term(value, "forget_examples", config.forget_coeff)}
