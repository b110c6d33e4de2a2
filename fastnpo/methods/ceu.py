"""CE-U (Cross-Entropy Unlearning; Yang 2025, arXiv 2503.01224): the token-mean over the forget
answer tokens of the cross-entropy toward the model's own distribution with the label removed
(detached), from hidden states without full logits (ops.ce_u_token_losses). The first
ceu_ignore_first (1: the paper's footnote, open-unlearning's default) answer tokens of each
example are not scored, so the term is a mean over the "scored" tokens. No retain term. The
one-pass design computes the per-token losses and their gradient from its row statistics
(one_pass_token_values "ce_u"), so CE-U is token_separable."""

from typing import ClassVar

import torch

from ..config import require
from ..ops import IGNORE_INDEX, ce_u_token_losses
from .base import Method


class CEU(Method):
    name, label = "ceu", "CE-U"
    token_level = True
    token_unit = "scored"
    token_separable = True
    one_pass_token_values = "ce_u"
    parameters: ClassVar[dict] = {"ceu_ignore_first": 1}

    def check(self, config) -> None:
        require(config.ceu_ignore_first >= 0, "method.ceu_ignore_first", "must be >= 0", config.ceu_ignore_first)

    def skipped_targets(self, config) -> int:
        return config.ceu_ignore_first

    def token_values(self, config, token_logps, hidden, weight, targets, scored, reference=None):
        return ceu_token_values(hidden, weight, targets, scored)

    def one_pass_values(self, config, token_values, scored):
        return token_values  # the one-pass design's "ce_u" values are the per-token losses themselves


# ----------------------------------------------------------------------------- the loss


def ceu_token_values(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor):
    """CE-U's per-token loss at the `scored` positions of aligned targets (0 elsewhere):
    hidden [..., D], weight [V, D], targets and scored [...]."""
    return ce_u_token_losses(hidden, weight, targets.masked_fill(~scored, IGNORE_INDEX), ignore_index=IGNORE_INDEX)
