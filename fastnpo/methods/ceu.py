"""CE-U (Cross-Entropy Unlearning; Yang 2025, arXiv 2503.01224): the token-mean over the forget
answer tokens of the cross-entropy toward the model's own distribution with the label removed
(detached), from hidden states without full logits (ops.ce_u_token_losses). The first
ceu_ignore_first (1: the paper's footnote, open-unlearning's default) answer tokens of each
example are not scored, so the term is a mean over the "scored" tokens. No retain term."""

from typing import ClassVar

import torch

from ..config import require
from ..ops import IGNORE_INDEX, aligned_labels, ce_u_token_losses
from ..ops.checks import check_hidden_and_weight, check_labels
from .base import Method


class CEU(Method):
    name, label = "ceu", "CE-U"
    token_level = True
    token_unit = "scored"
    parameters: ClassVar[dict] = {"ceu_ignore_first": 1}

    def check(self, config) -> None:
        require(config.ceu_ignore_first >= 0, "method.ceu_ignore_first", "must be >= 0", config.ceu_ignore_first)

    def skipped_targets(self, config) -> int:
        return config.ceu_ignore_first

    def token_values(self, config, token_logps, hidden, weight, targets, scored, reference=None):
        return ceu_token_values(hidden, weight, targets, scored)


# ----------------------------------------------------------------------------- the loss


def ceu_scored_targets(targets: torch.Tensor, ignore_first: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Bool [B, T]: the aligned targets of each row except its first `ignore_first` ones (CE-U's
    paper skips the first answer token; each row is one example)."""
    mask = targets != ignore_index
    return mask & (mask.long().cumsum(dim=-1) > ignore_first)


def ceu_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    shift: bool = True,
    ignore_index: int = IGNORE_INDEX,
    ignore_first: int = 1,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """CE-U (Cross-Entropy Unlearning; Yang 2025, arXiv 2503.01224): the token-mean cross-entropy
    toward the model's own distribution with the label's logit set to -inf (detached),
    LSE(l) - sum_{v != y} softmax_{v != y}(l)_v l_v per token, from hidden states without full
    logits (ops.ce_u_token_losses). ignore_first: the first answer tokens of each row that are
    not scored (1, the paper's footnote and open-unlearning's default; 0 scores every target).
    hidden [B, T, D], labels [B, T] as in sequence_logprobs."""
    check_hidden_and_weight(hidden, weight, exact_dim=3)
    check_labels(labels, hidden.shape[:-1], hidden.device, weight.shape[0], ignore_index)
    if isinstance(ignore_first, bool) or not isinstance(ignore_first, int) or ignore_first < 0:
        raise ValueError(f"ignore_first must be an integer >= 0, got {ignore_first!r}")
    targets = aligned_labels(labels, shift, ignore_index)
    scored = ceu_scored_targets(targets, ignore_first, ignore_index)
    if not bool(scored.any()):
        raise ValueError(f"labels has no target token to score (after skipping the first {ignore_first} of each row)")
    tokens = ce_u_token_losses(
        hidden, weight, targets.masked_fill(~scored, ignore_index), ignore_index=ignore_index, chunk_size=chunk_size
    )
    return tokens.sum() / int(scored.sum())


def ceu_token_values(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor):
    """CE-U's per-token loss at the `scored` positions of aligned targets (0 elsewhere):
    hidden [..., D], weight [V, D], targets and scored [...]."""
    return ce_u_token_losses(hidden, weight, targets.masked_fill(~scored, IGNORE_INDEX), ignore_index=IGNORE_INDEX)
