"""CE-U's per-token loss (Cross-Entropy Unlearning, Yang 2025, arXiv 2503.01224) without full logits.

With logits l = hidden @ weight.T and the label y, CE-U's target is the model's own distribution
with the label's logit set to -inf, detached: q_v = softmax_{v != y}(l)_v, q_y = 0. The loss of a
row is the cross-entropy toward it,

    loss = -sum_v q_v log softmax(l)_v = LSE(l) - sum_{v != y} q_v l_v,

a function of per-row sums over the vocabulary: LSE(l), the log-sum-exp without the label and
the exp-weighted sum of the other logits: soft_target.py's cross-entropy toward a detached target
with target logits t = l, t_y = -inf. With q detached, d loss / d l_v = p_v - q_v for v != y and
p_y for v = y (p = softmax(l)). Never [tokens x vocab].
"""

import torch

from .checks import check_hidden_and_weight, check_labels
from .soft_target import label_columns, soft_target_token_losses


def check_ce_u_vocabulary(weight: torch.Tensor) -> None:
    """CE-U's target is the distribution over the tokens other than the label: it needs V >= 2."""
    if weight.shape[0] < 2:
        raise ValueError(f"weight must have a vocabulary of at least 2 tokens for CE-U, got {weight.shape[0]}")


class _OwnDistributionWithoutLabel:
    """CE-U's target logits: the block's own logits with the label's set to -inf."""

    def __init__(self, labels: torch.Tensor):
        self.labels = labels
        self.rows = torch.arange(labels.shape[0], device=labels.device)

    def __call__(self, logits: torch.Tensor, v0: int) -> torch.Tensor:
        inside, local = label_columns(self.labels, v0, logits.shape[1])
        excluded = logits.clone()
        excluded[self.rows[inside], local[inside]] = float("-inf")
        return excluded


def ce_u_token_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """CE-U's loss per token, LSE(l) - sum_{v != y} q_v l_v, q = softmax over v != y of l (detached).

    hidden [..., D], weight [V, D] (V >= 2), labels [...] aligned with hidden (no shift). Returns
    fp32 [...], exactly 0.0 where labels == ignore_index; differentiable w.r.t. hidden and weight.
    chunk_size: vocabulary columns per block (default: about 16 MiB of fp32 logits per block).
    """
    check_hidden_and_weight(hidden, weight)
    check_labels(labels, hidden.shape[:-1], hidden.device, weight.shape[0], ignore_index)
    check_ce_u_vocabulary(weight)
    return soft_target_token_losses(
        hidden,
        weight,
        labels,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        make_target=lambda kept, kept_labels: _OwnDistributionWithoutLabel(kept_labels),
    )
