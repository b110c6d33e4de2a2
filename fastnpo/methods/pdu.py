"""PDU (primal-dual unlearning; Entesari et al. 2025, "Constrained Entropic Unlearning", arXiv
2506.05314; open-unlearning's src/trainer/unlearn/pdu.py and configs/trainer/PDU.yaml).

Minimise the forget loss subject to retain NLL <= eps, by gradient descent on the Lagrangian
    gamma x logit-margin flattening + lambda x (retain NLL - eps)
and, once per optimizer step, projected gradient ascent on the dual variable:
    lambda <- max(0, lambda + pdu_dual_lr x (retain NLL of the step - pdu_epsilon)).

- The forget loss flattens the output distribution: per labelled forget position, (max_v l_v -
  mean_v l_v)^2 over the vocabulary logits l, averaged over the positions. As open-unlearning
  writes it, the positions are those whose own label is an answer token (labels != -100, no
  shift: the logits AT the answer tokens and the EOS, which predict the token after each), not
  the positions that predict them; the count is the same (the forget target tokens). Computed
  from hidden states without full logits: the argmax in vocabulary blocks without a graph, then
  max = h . w_argmax and mean = h . mean_v w_v (the gradient of torch's max goes to the argmax).
- gamma = forget_coeff (1); lambda starts at retain_coeff (open-unlearning's alpha, 1 in
  PDU.yaml; its run.sh uses 100); pdu_dual_lr its dual_step_size (1); pdu_epsilon its
  retain_loss_eps (required in PDU.yaml; 0.3 is run.sh's TOFU value, the default here: pick a
  value above the initial model's retain NLL); pdu_warmup_steps the optimizer steps before lambda
  moves (open-unlearning counts epochs, dual_warmup_epochs 5: set steps_per_epoch x 5).
- The dual update reads the step's GLOBAL retain NLL (StepResult.term_totals: every rank gets
  the same value, so lambda cannot drift apart across ranks); open-unlearning updates it after
  every compute_loss call, i.e. per micro-batch on each process, from that micro-batch's NLL:
  the same with one process and no gradient accumulation. Its per-epoch update
  (dual_update_upon "epoch") is not offered. lambda is saved in checkpoints (state_dict)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import require
from ..losses import nll_from_logprobs
from .base import Method, Term, TermInputs, scored_positions

BLOCK_ELEMENTS = 8 * 2**20  # one fp32 [rows, vocab block] logits block of the argmax search: 32 MiB


@dataclass
class PDUState:
    """The dual variable lambda (the retain term's coefficient) and the optimizer steps seen."""

    dual: float
    steps: int = 0


class PDU(Method):
    name, label = "pdu", "PDU"
    sets = ("forget", "retain")
    token_level = True
    parameters: ClassVar[dict] = {"pdu_epsilon": 0.3, "pdu_dual_lr": 1.0, "pdu_warmup_steps": 0}

    def check(self, config) -> None:
        bound = "must be >= 0 (a bound on the retain NLL)"
        require(config.pdu_epsilon >= 0, "method.pdu_epsilon", bound, config.pdu_epsilon)
        require(config.pdu_dual_lr >= 0, "method.pdu_dual_lr", "must be >= 0", config.pdu_dual_lr)
        steps = config.pdu_warmup_steps
        ok = isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0
        require(ok, "method.pdu_warmup_steps", "must be an int >= 0", steps)

    def prepare(self, config, inputs) -> PDUState:
        return PDUState(dual=float(config.retain_coeff))

    # ------------------------------------------------------------------ the loss

    def forget_term(self, config, state, token_logps, hidden, weight, targets, owner, forget_rows, example_index=None):
        predicts = scored_positions(0, owner, forget_rows)  # the positions predicting a forget answer token
        labelled = torch.zeros_like(predicts)
        labelled[:, 1:] = predicts[:, :-1]  # ... shifted onto the answer tokens themselves
        margins = logit_margins(hidden[labelled], weight)
        return margins.sum() / max(1, margins.numel())

    def terms(self, config, x: TermInputs) -> dict[str, Term]:
        if x.state is None:
            raise ValueError(f"method {self.name} needs its dual variable (the trainer's method state)")
        terms = self.forget_terms(config, x)
        nll = nll_from_logprobs(x.logps["retain"], x.counts["retain"])
        terms["retain_nll"] = Term(nll, "retain_tokens", x.state.dual)
        return terms

    # ------------------------------------------------------------------ the dual variable

    def after_step(self, config, state: PDUState, result) -> None:
        state.steps += 1
        if state.steps <= config.pdu_warmup_steps:
            return
        violation = result.term_totals["retain_nll"] - config.pdu_epsilon
        state.dual = max(0.0, state.dual + config.pdu_dual_lr * violation)

    def state_dict(self, state: PDUState) -> dict:
        return {"dual": state.dual, "steps": state.steps}

    def load_state_dict(self, state: PDUState, saved: dict) -> None:
        if "dual" not in saved:
            raise ValueError(f"method {self.name}: the checkpoint holds no dual variable")
        state.dual, state.steps = float(saved["dual"]), int(saved["steps"])


def logit_margins(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(max_v l_v - mean_v l_v)^2 per row of hidden [N, D], l = hidden @ weight.T ([V, D]), in
    fp32, without the [N, V] logits: the argmax over vocabulary blocks (no graph), then the max
    logit from the argmax's weight row and the mean logit from the mean weight row."""
    n, vocab = hidden.shape[0], weight.shape[0]
    with torch.no_grad():
        best = torch.full((n,), -torch.inf, device=hidden.device)
        where = torch.zeros(n, dtype=torch.long, device=hidden.device)
        block = max(256, BLOCK_ELEMENTS // max(n, 1))
        for v0 in range(0, vocab, block):
            top, index = (hidden @ weight[v0 : v0 + block].T).float().max(dim=-1)
            better = top > best
            best, where = torch.where(better, top, best), torch.where(better, index + v0, where)
    h = hidden.float()
    top = (h * weight[where].float()).sum(-1)
    mean = h @ weight.mean(0, dtype=torch.float32)
    return (top - mean) ** 2
